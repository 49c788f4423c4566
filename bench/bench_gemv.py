"""The weight-streaming GEMV (layers/weight_stream.py) at decode: Llama-3-8B's projections, M = 1..16 rows, for
bf16, FP8 (W8A16), Q4_K and Q8_0 weights [N, K], against the read-bandwidth limit and cuBLAS bf16.

    python -m bench.bench_gemv [--ms 1,2,4,8,16] [--shapes qkv,o,gate_up,down,lm_head] [--formats ...]
                               [--rows-per-warp 2] [--repeat 10] [--json gemv.json]

Each figure is the median GPU time of CUDA-graph replays (bench_decode_attention.graph_ms) over enough copies of
the weight (>= 256 MiB in all) that the L2 cache (50 MiB) holds none of them between calls: what a decode step
sees, where every layer's weight is read once. The limit is the weight bytes at the copy bandwidth measured in
the same run (bench_decode_attention.copy_bandwidth); `of limit` is that time over the measured one. cuBLAS bf16
is timed on the model's layout before issue 20 ([K, N], NN) and on [N, K] (b_transposed, TN); `fp8_cublaslt` is
fp8_linear's path above its GEMV_MAX_ROWS (x quantized per token, cuBLASLt FP8 GEMM, scaling): with `fp8`, the
FP8 switch point; `bf16` against `cublas_tn`, the dense one.
"""

from __future__ import annotations

import json
import math

import click
import numpy as np

from bench.bench_decode_attention import copy_bandwidth, graph_ms

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}  # (N, K) of Llama-3-8B
FORMATS = ("bf16", "fp8", "Q4_K", "Q8_0", "cublas_nn", "cublas_tn", "fp8_cublaslt")
COLD_BYTES = 256 << 20


def weight_bytes(fmt: str, n: int, k: int) -> int:
    from cupaged import quant

    if fmt in ("bf16", "cublas_nn", "cublas_tn"):
        return 2 * n * k
    if fmt in ("fp8", "fp8_cublaslt"):
        return n * k
    f = quant.FORMATS[fmt]
    return n * (k // f.block_size) * f.type_size


def make_weight(fmt: str, n: int, k: int, seed: int):
    """One random weight of the format on the GPU: (array, row_bytes, row_scales or None)."""
    import cupy

    from cupaged import quant

    rng = cupy.random.default_rng(seed)
    bf16 = _bf16()
    if fmt in ("bf16", "cublas_tn"):
        return (rng.standard_normal((n, k), dtype=cupy.float32) * k ** -0.5).astype(bf16), 2 * k, None
    if fmt == "cublas_nn":
        return (rng.standard_normal((k, n), dtype=cupy.float32) * k ** -0.5).astype(bf16), 2 * n, None
    if fmt in ("fp8", "fp8_cublaslt"):  # random codes without the two NaN ones
        codes = rng.integers(0, 0x7E, (n, k)).astype(cupy.uint8) | (rng.integers(0, 2, (n, k)).astype(cupy.uint8) << 7)
        return codes, k, (rng.random(n) * 1e-2).astype(cupy.float32)
    f = quant.FORMATS[fmt]
    blocks = rng.integers(0, 256, (n * (k // f.block_size), f.type_size)).astype(cupy.uint8)
    for offset in f.scale_offsets:  # finite fp16 scales
        scale = (rng.standard_normal(len(blocks), dtype=cupy.float32) * 0.02).astype(cupy.float16)
        blocks[:, offset:offset + 2] = scale.view(cupy.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1), (k // f.block_size) * f.type_size, None


def _bf16() -> np.dtype:
    from cupaged.device import resolve_dtype

    return resolve_dtype("bfloat16")


def call(fmt: str, weight, n: int, k: int, x, out, rows_per_warp: int):
    """A zero-argument launch of the product x @ W^T into out."""
    import cupy

    from cupaged.layers import cublas, gguf_ops, weight_stream
    from cupaged.layers.fp8_linear import GEMV_FUNCTOR, Fp8Linear, matmul_cublaslt

    w, row_bytes, scales = weight
    if fmt == "fp8_cublaslt":
        linear = Fp8Linear(w, scales)
        return lambda: matmul_cublaslt(x, linear, out)
    if fmt.startswith("cublas"):
        handle = cublas.handle()

        def run() -> None:
            handle.bind(cupy.cuda.get_current_stream().ptr)
            handle.matmul(x, w, out, b_transposed=fmt == "cublas_tn")
        return run
    functor = {"bf16": "cupaged::stream::Dense<__nv_bfloat16>", "fp8": GEMV_FUNCTOR}.get(fmt)
    functor = functor or gguf_ops.STREAM_FUNCTORS[fmt][0]
    return lambda: weight_stream.gemv(functor, w, row_bytes, n, k, x, out, row_scales=scales,
                                      rows_per_warp=rows_per_warp)


def measure(shape: str, fmt: str, ms: list[int], repeat: int, rows_per_warp: int, copy_gb_s: float) -> list[dict]:
    import cupy

    n, k = SHAPES[shape]
    nbytes = weight_bytes(fmt, n, k)
    weights = [make_weight(fmt, n, k, seed) for seed in range(max(1, math.ceil(COLD_BYTES / nbytes)))]
    rows = []
    for m in ms:
        x = cupy.random.default_rng(m).standard_normal((m, k), dtype=cupy.float32).astype(_bf16())
        out = cupy.empty((m, n), dtype=_bf16())
        ms_per_call, _ = graph_ms([call(fmt, w, n, k, x, out, rows_per_warp) for w in weights], repeat)
        limit_us = nbytes / copy_gb_s / 1e3
        rows.append({"shape": shape, "format": fmt, "M": m, "N": n, "K": k, "us": ms_per_call * 1e3,
                     "weight_bytes": nbytes, "limit_us": limit_us, "of_limit": limit_us / (ms_per_call * 1e3)})
    del weights
    cupy.get_default_memory_pool().free_all_blocks()
    return rows


@click.command()
@click.option("--ms", default="1,2,4,8,16", show_default=True, help="Activation rows (decode batch).")
@click.option("--shapes", default=",".join(SHAPES), show_default=True)
@click.option("--formats", default=",".join(FORMATS), show_default=True)
@click.option("--rows-per-warp", default=2, show_default=True, help="The GEMV's R (1, 2 or 4).")
@click.option("--repeat", default=10, show_default=True)
@click.option("--json", "json_path", default=None)
def main(ms: str, shapes: str, formats: str, rows_per_warp: int, repeat: int, json_path: str | None) -> None:
    from cupaged import device

    device.set_device("cuda")
    ceilings = copy_bandwidth(repeat)
    copy = ceilings["copy_gb_s"]
    print(f"limit: copy {copy:.0f} GB/s (bytes read + written, the kernel's 16-byte loads)", flush=True)
    ms_list = [int(m) for m in ms.split(",")]
    rows = []
    for shape in shapes.split(","):
        for fmt in formats.split(","):
            for r in measure(shape, fmt, ms_list, repeat, rows_per_warp, copy):
                rows.append(r)
                print(f"{shape:8s} {fmt:9s} M={r['M']:2d}: {r['us']:8.1f} us, limit {r['limit_us']:7.1f} us "
                      f"({r['of_limit']:.2f} of it)", flush=True)
    print(f"\nfraction of the read limit (R = {rows_per_warp}); us at M = {ms_list[0]}")
    print(f"{'shape':8s} {'format':9s} " + " ".join(f"M={m:<4d}" for m in ms_list) + "   us")
    for shape in shapes.split(","):
        for fmt in formats.split(","):
            sel = [r for r in rows if r["shape"] == shape and r["format"] == fmt]
            print(f"{shape:8s} {fmt:9s} " + " ".join(f"{r['of_limit']:6.2f}" for r in sel) + f" {sel[0]['us']:6.1f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"ceilings": ceilings, "rows_per_warp": rows_per_warp, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
