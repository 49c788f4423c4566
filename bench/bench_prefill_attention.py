"""Causal prefill attention over the paged cache: TFLOP/s against the matmul ceiling, torch flash SDPA as peer.

    python -m bench.bench_prefill_attention --json prefill.json

Llama-3-8B heads (32 query, 8 KV, head_dim 128), bf16, block size 16, random block tables (a shuffled
permutation of physical blocks). At each length L a batch of max(1, tokens // L) sequences of L new tokens each
(no cached prefix): one sequence at 16k, 32 at 512 with the default 16,384 tokens.
Causal FLOPs = 2 * B * Hq * L^2 * D (the two matmuls, 2 flops per multiply-add, half the square).
The ceiling is a bf16 cupy.matmul 8192^3 measured in the same run. The peer is torch's
scaled_dot_product_attention with the flash backend (is_causal=True) on the same data made contiguous
([B, H, L, D], no paging to pay for), where torch is installed; its output also checks ours (max relative error
per run). Every tile configuration of the kernel (`--configs`) is timed; the table shows the default one.
Times are CUDA-event medians after warm-up.
"""

from __future__ import annotations

import json
import sys

import click
import numpy as np

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def median_ms(fn, repeat: int, warmup: int = 3, torch_events: bool = False) -> float:
    """Median of `repeat` CUDA-event timings of fn() after `warmup` calls; torch's events for torch's work."""
    if torch_events:
        import torch

        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        elapsed = lambda: start.elapsed_time(stop)  # noqa: E731
    else:
        import cupy

        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        elapsed = lambda: cupy.cuda.get_elapsed_time(start, stop)  # noqa: E731
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(elapsed())
    return float(np.median(times))


def matmul_tflops(repeat: int) -> float:
    import cupy

    from cupaged.device import resolve_dtype

    n = 8192
    a = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(resolve_dtype("bfloat16"))
    b = cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(a.dtype)
    c = cupy.empty_like(a)
    ms = median_ms(lambda: cupy.matmul(a, b, out=c), repeat)
    return 2 * n ** 3 / ms / 1e9


def to_torch(x):
    """A torch bf16 tensor sharing a cupy bf16 array's memory (through a uint16 view: dlpack-safe)."""
    import torch

    return torch.from_dlpack(x.view(np.uint16)).view(torch.bfloat16)


def torch_peer(q, k_contig, v_contig, batch: int, length: int, repeat: int) -> tuple[float | None, object, str]:
    """(median ms, output [B, H, L, D] as torch tensor, note) of torch flash SDPA, or (None, None, why)."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None, None, "torch not installed"
    tq = to_torch(q).view(batch, length, HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    tk, tv = to_torch(k_contig), to_torch(v_contig)  # [B, Hkv, L, D]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    note = "enable_gqa"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fn = lambda: sdpa(tq, tk, tv, is_causal=True, enable_gqa=True)  # noqa: E731
            out = fn()
            torch.cuda.synchronize()
            ms = median_ms(fn, repeat, torch_events=True)
    except Exception as exc:  # flash backend without GQA: give it the K/V heads repeated
        print(f"torch flash with enable_gqa: {type(exc).__name__}: {exc}; retrying with repeated K/V heads",
              file=sys.stderr)
        group = HEADS // KV_HEADS
        tk, tv = tk.repeat_interleave(group, dim=1), tv.repeat_interleave(group, dim=1)
        note = "repeat_kv"
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                fn = lambda: sdpa(tq, tk, tv, is_causal=True)  # noqa: E731
                out = fn()
                torch.cuda.synchronize()
                ms = median_ms(fn, repeat, torch_events=True)
        except Exception as exc2:
            print(f"torch flash: {type(exc2).__name__}: {exc2}", file=sys.stderr)
            return None, None, f"failed: {type(exc2).__name__}"
    return ms, out, note


def parse_config(text: str) -> tuple[int, int, int]:
    warps, m_tiles, keys = (int(x) for x in text.lower().split("x"))
    return warps, m_tiles, keys


def measure(length: int, tokens: int, cfgs, default, repeat: int, rng, ceiling: float, bar) -> tuple[dict, list]:
    """Time every config at one length, then the torch peer; (the default config's row, per-config rows)."""
    import cupy

    from cupaged.device import resolve_dtype
    from cupaged.kv_cache import AttentionMetadata
    from cupaged.layers import flash_prefill as fp

    bf16 = resolve_dtype("bfloat16")
    scale = HEAD_DIM ** -0.5
    batch = max(1, tokens // length)
    blocks_per_seq = -(-length // BLOCK)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, KV_HEADS, BLOCK, HEAD_DIM)
    k_cache = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(bf16)
    v_cache = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(bf16)
    tables = rng.permutation(num_blocks).reshape(batch, blocks_per_seq)
    meta = AttentionMetadata.build([length] * batch, [length] * batch, tables.tolist(), BLOCK, cupy)
    q = cupy.random.standard_normal((batch * length, HEADS, HEAD_DIM), dtype=cupy.float32).astype(bf16)
    out = cupy.full(q.shape, np.nan, dtype=q.dtype)
    flops = 2.0 * batch * HEADS * length ** 2 * HEAD_DIM
    times, per_config = {}, []
    for cfg in cfgs:
        def run(cfg=cfg):
            fp.flash_prefill_attention(q, k_cache, v_cache, meta, scale, out=out, config=cfg)

        times[cfg] = median_ms(run, repeat)
        per_config.append({"length": length, "batch": batch, "config": "x".join(map(str, cfg)), "ms": times[cfg],
                           "tflops": flops / times[cfg] / 1e9})
        bar.update(1)
    out[...] = np.nan
    fp.flash_prefill_attention(q, k_cache, v_cache, meta, scale, out=out, config=default)
    # the peer reads the same K/V laid out contiguously, [B, Hkv, L, D]
    order = cupy.asarray(tables.reshape(-1))

    def contiguous(cache):
        blocks = cache[order].reshape(batch, blocks_per_seq, KV_HEADS, BLOCK, HEAD_DIM)
        return cupy.ascontiguousarray(blocks.transpose(0, 2, 1, 3, 4).reshape(
            batch, KV_HEADS, blocks_per_seq * BLOCK, HEAD_DIM)[:, :, :length])

    torch_ms, torch_out, note = torch_peer(q, contiguous(k_cache), contiguous(v_cache), batch, length, repeat)
    err = None
    if torch_out is not None:
        import torch

        ours = to_torch(out).view(batch, length, HEADS, HEAD_DIM).transpose(1, 2).float()
        ref = torch_out.float()
        err = float((ours - ref).norm() / ref.norm()) if bool(torch.isfinite(ours).all()) else float("nan")
    ms = times[default]
    bar.update(1)
    return {"length": length, "batch": batch, "config": "x".join(map(str, default)), "ms": ms,
            "tflops": flops / ms / 1e9, "fraction_of_matmul": flops / ms / 1e9 / ceiling,
            "torch_flash_ms": torch_ms, "torch_note": note,
            "torch_flash_tflops": flops / torch_ms / 1e9 if torch_ms else None,
            "torch_over_ours": torch_ms / ms if torch_ms else None, "rel_err_vs_torch": err}, per_config


@click.command()
@click.option("--lengths", default="512,1024,2048,4096,8192,16384", show_default=True)
@click.option("--tokens", default=16384, show_default=True, help="Batch max(1, tokens // L) sequences per length.")
@click.option("--configs", default="all", show_default=True,
              help="'all', 'default', or tile configs warps x m-tiles x keys, e.g. 4x2x64,4x2x32.")
@click.option("--repeat", default=20, show_default=True, help="Timed runs per cell (median reported).")
@click.option("--json", "json_path", default=None)
def main(lengths: str, tokens: int, configs: str, repeat: int, json_path: str | None) -> None:
    import cupy

    from cupaged import device
    from cupaged.layers import flash_prefill as fp

    device.set_device("cuda")
    repeat = max(repeat, 10)
    default = fp.config_for(HEAD_DIM)
    if configs == "all":
        cfgs = [default] + [c for c in fp.CONFIGS if c != default]
    elif configs == "default":
        cfgs = [default]
    else:
        cfgs = [parse_config(c) for c in configs.split(",")]
    ceiling = matmul_tflops(repeat)
    click.echo(f"bf16 matmul 8192^3: {ceiling:.0f} TFLOP/s", err=True)
    rows, variants = [], []
    rng = np.random.default_rng(0)
    cells = [int(x) for x in lengths.split(",")]
    with click.progressbar(length=len(cells) * (len(cfgs) + 1), label="prefill attention", file=sys.stderr) as bar:
        for length in cells:
            row, per_config = measure(length, tokens, cfgs, default, repeat, rng, ceiling, bar)
            rows.append(row)
            variants.extend(per_config)
            cupy.get_default_memory_pool().free_all_blocks()
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": name, "matmul_tflops": ceiling, "heads": HEADS, "kv_heads": KV_HEADS,
                       "head_dim": HEAD_DIM, "block_size": BLOCK, "tokens": tokens, "rows": rows,
                       "variants": variants}, f, indent=2)
    click.echo(f"{name}; bf16 matmul 8192^3 ceiling {ceiling:.0f} TFLOP/s; Hq {HEADS}, Hkv {KV_HEADS}, "
               f"D {HEAD_DIM}, block {BLOCK}")
    if len(cfgs) > 1:
        click.echo("TFLOP/s by tile config (warps x m16 tiles per warp x keys per tile):")
        click.echo(f"{'L':>6} " + " ".join(f"{'x'.join(map(str, c)):>8}" for c in cfgs))
        for length in cells:
            per = {v["config"]: v["tflops"] for v in variants if v["length"] == length}
            click.echo(f"{length:>6} " + " ".join(f"{per['x'.join(map(str, c))]:>8.0f}" for c in cfgs))
    click.echo(f"default config {'x'.join(map(str, default))}:")
    click.echo(f"{'L':>6} {'B':>3} {'ms':>8} {'TFLOP/s':>8} {'of mm':>6} {'torch ms':>9} {'torch/us':>8} {'err':>8}")
    for r in rows:
        t, ratio, err = r["torch_flash_ms"], r["torch_over_ours"], r["rel_err_vs_torch"]
        click.echo(f"{r['length']:>6} {r['batch']:>3} {r['ms']:>8.3f} {r['tflops']:>8.0f} "
                   f"{r['fraction_of_matmul']:>6.2f} {'-' if t is None else f'{t:.3f}':>9} "
                   f"{'-' if ratio is None else f'{ratio:.2f}':>8} {'-' if err is None else f'{err:.1e}':>8}")


if __name__ == "__main__":
    main()
