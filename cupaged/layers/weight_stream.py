"""The weight-streaming GEMV of cuda/gguf_matmul.cu (`weight_gemv`), shared by every weight format at decode.

out[:, col:col + N] = x [M, K] @ W^T for W [N, K] stored row by row (each output row's K weights contiguous:
GGUF blocks, FP8 codes with a float32 scale per row, bf16/fp16 values), M <= GEMV_MAX_ROWS. The kernel reads
each weight byte once for all M rows of x, so at decode it costs the weight bytes over the memory bandwidth;
more rows are cheaper through a tensor-core GEMM (the callers' other path).

A functor names the format (`cupaged::stream::Fp8`, `cupaged::stream::Dense<__nv_bfloat16>`, ...). Kernels are
compiled per functor and pair of x and output types, every row tile at once (decode graphs capture them all):
the unrolled bodies make NVRTC slow (nvcc on 2 cores: 10 s for Q4_K's five, 3 s for FP8's), so a model compiles
only the formats it holds.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

Array = Any
GEMV_MAX_ROWS = 16  # see the callers' switch points (gguf_ops, fp8_linear, dense_linear)
TILES = (1, 2, 4, 8, 16)  # the kernel's activation rows MT: a call uses the smallest one >= its rows
ROWS_PER_WARP = 2  # output rows a warp streams together (R): its loads in flight, x reused R times
WARPS_PER_BLOCK = 4
FLOATS = ("float32", "float16", "bfloat16")


def streamable(x: Array) -> Array:
    """x as the kernel reads it: a float type, unit column stride, 16-byte aligned rows (a copy if needed)."""
    import cupy

    if x.dtype.name not in FLOATS or x.strides[1] != x.itemsize or x.strides[0] % 16 or x.data.ptr % 16:
        return cupy.ascontiguousarray(x, dtype=x.dtype if x.dtype.name in FLOATS else cupy.float32)
    return x


def gemv(functor: str, w: Array, row_bytes: int, rows: int, cols: int, x: Array,
         out: Array, col: int = 0, row_scales: Array | None = None, rows_per_warp: int = ROWS_PER_WARP) -> None:
    """out[:, col:col + rows] = (x @ W^T) * row_scales (if given), W `rows` rows of `row_bytes` at w's address.
    x: streamable(), at most GEMV_MAX_ROWS rows; out: unit column stride. One launch on the current stream."""
    from cupaged.kernels import ctype

    m = x.shape[0]
    if m == 0:
        return
    if m > GEMV_MAX_ROWS or out.strides[1] != out.itemsize:
        raise ValueError(f"weight_gemv: {m} rows (at most {GEMV_MAX_ROWS}), out strides {out.strides}")
    tile = next(t for t in TILES if t >= m)
    per_block = WARPS_PER_BLOCK * rows_per_warp
    kernels_of(functor, ctype(x.dtype), ctype(out.dtype), rows_per_warp)[tile](
        (-(-rows // per_block),), (32 * WARPS_PER_BLOCK,),
        (w, np.int64(row_bytes), row_scales if row_scales is not None else np.uint64(0), x,
         np.int64(x.strides[0] // x.itemsize), np.uint64(out.data.ptr + col * out.strides[1]),
         np.int64(out.strides[0] // out.itemsize), np.int32(rows), np.int32(cols), np.int32(m)))


@functools.cache
def kernels_of(functor: str, x_type: str, out_type: str, rows_per_warp: int) -> dict[int, Any]:
    """tile -> the compiled kernel of the functor, every tile (one NVRTC run)."""
    from cupaged.kernels import module

    names = {t: f"weight_gemv<{functor}, {x_type}, {out_type}, {t}, {rows_per_warp}>" for t in TILES}
    mod = module("gguf_matmul.cu", tuple(names.values()))
    return {t: mod.get_function(name) for t, name in names.items()}
