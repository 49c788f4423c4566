"""Causal prefill attention over the paged cache: TFLOP/s against the matmul ceiling, torch SDPA (flash and
cuDNN backends) as peers.

    python -m bench.bench_prefill_attention --json prefill.json [--heads 16,8] [--prefix 4096]

Llama-3-8B heads by default (32 query, 8 KV, head_dim 128; --heads 16,8 for Qwen3-0.6B's), bf16, block size 16,
random block tables (a shuffled permutation of physical blocks). At each length L a batch of max(1, tokens // L)
sequences of L new tokens each, after --prefix cached tokens (0: whole prompts; else chunked prefill over a paged
prefix): one sequence at 16k, 32 at 512 with the default 16,384 tokens.
Causal FLOPs = 4 * B * Hq * D * (sum over rows of the keys each sees) (the two matmuls, 2 flops per
multiply-add), i.e. 2 * B * Hq * L^2 * D without a prefix.
The ceiling is a bf16 cupy.matmul 8192^3 measured in the same run. The peers are torch's
scaled_dot_product_attention with the flash and the cuDNN backends (causal, aligned bottom-right with a prefix) on
the same data made contiguous ([B, H, L, D], no paging to pay for), where torch is installed; the flash output
also checks ours (relative error). Every tile configuration of the FlashAttention-2 kernel (`--configs`) and the
sm90 (wgmma) kernels where the device has them are timed; the table shows fa2's default config and the sm90 ones.
Times are CUDA-event medians after warm-up.
"""

from __future__ import annotations

import json
import sys

import click
import numpy as np

HEAD_DIM, BLOCK = 128, 16
PEERS = ("flash", "cudnn")
SM90_KERNELS = ("sm90", "sm90-overlap")


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


def torch_peer(backend: str, q, k_contig, v_contig, heads: int, batch: int, length: int, prefix: int,
               repeat: int) -> tuple[float | None, object, str]:
    """(median ms, output [B, H, L, D] as torch tensor, note) of torch SDPA on `backend` ("flash" or "cudnn"), or
    (None, None, why). K/V heads are repeated for the query heads (not every backend takes enable_gqa)."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:
        return None, None, "torch not installed"
    tq = to_torch(q).view(batch, length, heads, HEAD_DIM).transpose(1, 2).contiguous()
    group = heads // k_contig.shape[1]
    tk = to_torch(k_contig).repeat_interleave(group, dim=1)  # [B, Hq, prefix + L, D]
    tv = to_torch(v_contig).repeat_interleave(group, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    if prefix:  # queries at the end of the key range: the causal diagonal runs bottom-right
        mask = causal_lower_right(length, prefix + length)
        fn = lambda: sdpa(tq, tk, tv, attn_mask=mask)  # noqa: E731
    else:
        fn = lambda: sdpa(tq, tk, tv, is_causal=True)  # noqa: E731
    try:
        with sdpa_kernel(which):
            out = fn()
            torch.cuda.synchronize()
            ms = median_ms(fn, repeat, torch_events=True)
    except Exception as exc:
        print(f"torch {backend}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None, None, f"failed: {type(exc).__name__}"
    return ms, out, "repeat_kv"


def parse_config(text: str) -> tuple[int, int, int]:
    warps, m_tiles, keys = (int(x) for x in text.lower().split("x"))
    return warps, m_tiles, keys


def variant_label(variant: dict) -> str:
    return variant["kernel"] if variant["kernel"] != "fa2" else "x".join(map(str, variant["config"]))


def measure(length: int, prefix: int, tokens: int, heads: tuple[int, int], variants: list[dict], repeat: int, rng,
            ceiling: float, bar) -> tuple[dict, list]:
    """Time every kernel variant at one length, then the peers; (the summary row, per-variant rows)."""
    import cupy

    from cupaged.device import resolve_dtype
    from cupaged.kv_cache import AttentionMetadata
    from cupaged.layers import flash_prefill as fp

    num_heads, kv_heads = heads
    bf16 = resolve_dtype("bfloat16")
    scale = HEAD_DIM ** -0.5
    batch = max(1, tokens // length)
    seq = prefix + length
    blocks_per_seq = -(-seq // BLOCK)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, kv_heads, BLOCK, HEAD_DIM)
    k_cache = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(bf16)
    v_cache = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(bf16)
    tables = rng.permutation(num_blocks).reshape(batch, blocks_per_seq)
    meta = AttentionMetadata.build([length] * batch, [seq] * batch, tables.tolist(), BLOCK, cupy)
    q = cupy.random.standard_normal((batch * length, num_heads, HEAD_DIM), dtype=cupy.float32).astype(bf16)
    outs = {}
    flops = 4.0 * batch * num_heads * HEAD_DIM * (length * prefix + length * (length + 1) / 2)
    times, per_variant = {}, []
    for variant in variants:
        label = variant_label(variant)
        out = outs[label] = cupy.full(q.shape, np.nan, dtype=q.dtype)

        def run(variant=variant, out=out):
            fp.flash_prefill_attention(q, k_cache, v_cache, meta, scale, out=out, **variant)

        try:
            times[label] = median_ms(run, repeat)
        except Exception as exc:  # a kernel that fails to build (e.g. NVRTC without sm_90a): the others still run
            print(f"{label}: {type(exc).__name__}: {exc}", file=sys.stderr)
            del outs[label]
            bar.update(1)
            continue
        per_variant.append({"length": length, "prefix": prefix, "batch": batch, "variant": label,
                            "ms": times[label], "tflops": flops / times[label] / 1e9})
        bar.update(1)
    # the peers read the same K/V laid out contiguously, [B, Hkv, prefix + L, D]
    order = cupy.asarray(tables.reshape(-1))

    def contiguous(cache):
        blocks = cache[order].reshape(batch, blocks_per_seq, kv_heads, BLOCK, HEAD_DIM)
        return cupy.ascontiguousarray(blocks.transpose(0, 2, 1, 3, 4).reshape(
            batch, kv_heads, blocks_per_seq * BLOCK, HEAD_DIM)[:, :, :seq])

    k_contig, v_contig = contiguous(k_cache), contiguous(v_cache)
    row = {"length": length, "prefix": prefix, "batch": batch, "flops": flops}
    for label, ms in times.items():
        row[label] = {"ms": ms, "tflops": flops / ms / 1e9, "fraction_of_matmul": flops / ms / 1e9 / ceiling}
    reference = None
    for backend in PEERS:
        ms, peer_out, note = torch_peer(backend, q, k_contig, v_contig, num_heads, batch, length, prefix, repeat)
        row[backend] = {"ms": ms, "tflops": flops / ms / 1e9 if ms else None, "note": note}
        if reference is None and peer_out is not None:
            reference = peer_out.float()
        del peer_out
    if reference is not None:
        import torch

        for label, out in outs.items():
            ours = to_torch(out).view(batch, length, num_heads, HEAD_DIM).transpose(1, 2).float()
            finite = bool(torch.isfinite(ours).all())
            err = float((ours - reference).norm() / reference.norm()) if finite else float("nan")
            row[label]["rel_err_vs_torch"] = err
    bar.update(1)
    return row, per_variant


@click.command()
@click.option("--lengths", default="512,1024,2048,4096,8192,16384", show_default=True)
@click.option("--tokens", default=16384, show_default=True, help="Batch max(1, tokens // L) sequences per length.")
@click.option("--prefix", default=0, show_default=True, help="Cached tokens before each sequence's L new ones.")
@click.option("--heads", default="32,8", show_default=True, help="Query heads, KV heads (Qwen3-0.6B: 16,8).")
@click.option("--configs", default="all", show_default=True,
              help="fa2 tile configs: 'all', 'default', or warps x m-tiles x keys, e.g. 4x2x64,4x2x32.")
@click.option("--repeat", default=20, show_default=True, help="Timed runs per cell (median reported).")
@click.option("--json", "json_path", default=None)
def main(lengths: str, tokens: int, prefix: int, heads: str, configs: str, repeat: int,
         json_path: str | None) -> None:
    import cupy

    from cupaged import device
    from cupaged.layers import flash_prefill as fp

    device.set_device("cuda")
    repeat = max(repeat, 10)
    num_heads, kv_heads = (int(x) for x in heads.split(","))
    default = fp.config_for(HEAD_DIM)
    if configs == "all":
        cfgs = [default] + [c for c in fp.CONFIGS if c != default]
    elif configs == "default":
        cfgs = [default]
    else:
        cfgs = [parse_config(c) for c in configs.split(",")]
    variants = [{"kernel": "fa2", "config": c} for c in cfgs]
    has_sm90 = fp.kernel_for("bfloat16", HEAD_DIM, kernel="sm90") == "sm90"
    if has_sm90:
        variants += [{"kernel": k} for k in SM90_KERNELS]
    ceiling = matmul_tflops(repeat)
    click.echo(f"bf16 matmul 8192^3: {ceiling:.0f} TFLOP/s", err=True)
    rows, per_variant = [], []
    rng = np.random.default_rng(0)
    cells = [int(x) for x in lengths.split(",")]
    with click.progressbar(length=len(cells) * (len(variants) + 1), label="prefill attention",
                           file=sys.stderr) as bar:
        for length in cells:
            row, per = measure(length, prefix, tokens, (num_heads, kv_heads), variants, repeat, rng, ceiling, bar)
            rows.append(row)
            per_variant.extend(per)
            cupy.get_default_memory_pool().free_all_blocks()
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": name, "matmul_tflops": ceiling, "heads": num_heads, "kv_heads": kv_heads,
                       "head_dim": HEAD_DIM, "block_size": BLOCK, "tokens": tokens, "prefix": prefix, "rows": rows,
                       "variants": per_variant}, f, indent=2)
    click.echo(f"{name}; bf16 matmul 8192^3 ceiling {ceiling:.0f} TFLOP/s; Hq {num_heads}, Hkv {kv_heads}, "
               f"D {HEAD_DIM}, block {BLOCK}, prefix {prefix}")
    if len(cfgs) > 1:
        click.echo("fa2 TFLOP/s by tile config (warps x m16 tiles per warp x keys per tile):")
        click.echo(f"{'L':>6} " + " ".join(f"{'x'.join(map(str, c)):>8}" for c in cfgs))
        for length in cells:
            per = {v["variant"]: v["tflops"] for v in per_variant if v["length"] == length}
            click.echo(f"{length:>6} " + " ".join(f"{per['x'.join(map(str, c))]:>8.0f}" for c in cfgs))
    ours = [variant_label({"kernel": "fa2", "config": default})] + (list(SM90_KERNELS) if has_sm90 else [])
    click.echo(f"TFLOP/s (fa2 = config {ours[0]}; err = relative error against torch's output; best/cudnn = "
               f"the fastest of ours over cuDNN):")
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    click.echo(f"{'L':>6} {'B':>3} " + " ".join(f"{k[:12]:>12} {'err':>7}" for k in ["fa2", *ours[1:]])
               + f" {'flash':>6} {'cudnn':>6} {'best/cudnn':>10}")
    for r in rows:
        cudnn = r["cudnn"]["tflops"]
        best = max(r[k]["tflops"] for k in ours if k in r)
        line = " ".join(f"{fmt(r.get(k, {}).get('tflops'), '.0f'):>12} "
                         f"{fmt(r.get(k, {}).get('rel_err_vs_torch'), '.0e'):>7}" for k in ours)
        click.echo(f"{r['length']:>6} {r['batch']:>3} {line} {fmt(r['flash']['tflops'], '.0f'):>6} "
                   f"{fmt(cudnn, '.0f'):>6} {fmt(best / cudnn if cudnn else None, '.2f'):>10}")


if __name__ == "__main__":
    main()
