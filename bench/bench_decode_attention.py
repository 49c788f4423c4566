"""Paged decode attention: achieved bandwidth against the device's copy bandwidth, with torch SDPA as peer.

    python -m bench.bench_decode_attention --json decode.json

Llama-3-8B heads (32 query, 8 KV, head_dim 128), bf16, block size 16, random block tables (a shuffled
permutation of physical blocks). Bytes moved = K and V of every sequence read once + q read + output written.
The copy bandwidth is a large device-to-device copy (bytes read + written) measured in the same run. The peer is
torch's scaled_dot_product_attention on the same K/V made contiguous (no paging to pay for), flash and cuDNN
backends, where torch is installed. Times are CUDA-event medians after warm-up.
"""

from __future__ import annotations

import json
import sys

import click
import numpy as np

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def median_ms(fn, repeat: int = 30, warmup: int = 5) -> float:
    import cupy

    for _ in range(warmup):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def copy_bandwidth() -> float:
    import cupy

    src = cupy.ones(1 << 30, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    ms = median_ms(lambda: dst.__setitem__(Ellipsis, src), repeat=20)
    return 2 * src.nbytes / ms / 1e6  # GB/s


def torch_peer(q_np, k, v, batch: int, ctx: int) -> dict:
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    import cupy

    out = {}
    tq = torch.from_dlpack(q_np).view(batch, HEADS, 1, HEAD_DIM)
    tk = torch.from_dlpack(k).view(batch, KV_HEADS, ctx, HEAD_DIM)
    tv = torch.from_dlpack(v).view(batch, KV_HEADS, ctx, HEAD_DIM)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)  # noqa
                fn()
                torch.cuda.synchronize()
                out[name] = median_ms(fn)
        except Exception as exc:  # a backend that does not take these shapes
            out[name] = None
            print(f"torch {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    cupy.cuda.Device().synchronize()
    return out


@click.command()
@click.option("--batches", default="1,8,64,256", show_default=True)
@click.option("--contexts", default="512,2048,8192,32768", show_default=True)
@click.option("--max-gb", default=17.5, show_default=True,
              help="Skip cells whose K/V exceeds this (the peer needs a contiguous copy too).")
@click.option("--json", "json_path", default=None)
def main(batches: str, contexts: str, max_gb: float, json_path: str | None) -> None:
    import cupy

    from cupaged import device
    from cupaged.device import resolve_dtype
    from cupaged.kv_cache import AttentionMetadata
    from cupaged.layers import cuda_ops

    device.set_device("cuda")
    bf16 = resolve_dtype("bfloat16")
    copy_gbs = copy_bandwidth()
    cells = [(b, c) for b in map(int, batches.split(",")) for c in map(int, contexts.split(","))
             if 2 * b * c * KV_HEADS * HEAD_DIM * 2 / 1e9 <= max_gb]
    rows = []
    rng = np.random.default_rng(0)
    with click.progressbar(cells, label="decode attention", file=sys.stderr) as bar:
        for batch, ctx in bar:
            blocks_per_seq = ctx // BLOCK
            num_blocks = batch * blocks_per_seq
            k_cache = cupy.random.standard_normal((num_blocks, KV_HEADS, BLOCK, HEAD_DIM), dtype=cupy.float32)
            k_cache = k_cache.astype(bf16)
            v_cache = cupy.random.standard_normal(k_cache.shape, dtype=cupy.float32).astype(k_cache.dtype)
            tables = rng.permutation(num_blocks).reshape(batch, blocks_per_seq)
            meta = AttentionMetadata.build([1] * batch, [ctx] * batch, tables.tolist(), BLOCK, cupy)
            q = cupy.random.standard_normal((batch, HEADS, HEAD_DIM), dtype=cupy.float32).astype(k_cache.dtype)
            out = cupy.empty_like(q)
            fn = lambda: cuda_ops.paged_decode_attention(out, q, k_cache, v_cache, meta.block_tables,  # noqa
                                                         meta.seq_lens, ctx, HEAD_DIM ** -0.5)
            ms = median_ms(fn)
            nbytes = k_cache.nbytes + v_cache.nbytes + q.nbytes + out.nbytes
            row = {"batch": batch, "context": ctx, "kv_gb": (k_cache.nbytes + v_cache.nbytes) / 1e9, "ms": ms,
                   "gb_s": nbytes / ms / 1e6, "fraction_of_copy": nbytes / ms / 1e6 / copy_gbs}
            # the peer reads the same K/V laid out contiguously per sequence
            order = cupy.asarray(tables.reshape(-1))
            k_contig = cupy.ascontiguousarray(k_cache[order].reshape(batch, blocks_per_seq, KV_HEADS, BLOCK,
                                              HEAD_DIM).transpose(0, 2, 1, 3, 4))
            v_contig = cupy.ascontiguousarray(v_cache[order].reshape(batch, blocks_per_seq, KV_HEADS, BLOCK,
                                              HEAD_DIM).transpose(0, 2, 1, 3, 4))
            peer = torch_peer(q, k_contig, v_contig, batch, ctx)
            for name, t in peer.items():
                row[f"torch_{name}_ms"] = t
                row[f"torch_{name}_fraction"] = nbytes / t / 1e6 / copy_gbs if t else None
            rows.append(row)
            del k_cache, v_cache, k_contig, v_contig
            cupy.get_default_memory_pool().free_all_blocks()
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"copy_gb_s": copy_gbs, "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                       "rows": rows}, f, indent=2)
    click.echo(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    click.echo(f"{'batch':>5} {'ctx':>6} {'KV GB':>7} {'ms':>8} {'GB/s':>7} {'of copy':>8} {'flash':>7} {'cudnn':>7}")
    for r in rows:
        flash, cudnn = r.get("torch_flash_fraction"), r.get("torch_cudnn_fraction")
        click.echo(f"{r['batch']:>5} {r['context']:>6} {r['kv_gb']:>7.3f} {r['ms']:>8.4f} {r['gb_s']:>7.0f} "
                   f"{r['fraction_of_copy']:>8.2f} {flash if flash is None else f'{flash:.2f}':>7} "
                   f"{cudnn if cudnn is None else f'{cudnn:.2f}':>7}")


if __name__ == "__main__":
    main()
