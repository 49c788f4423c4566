"""Plain (bf16/fp16/fp32) linear weights kept [N, K] (out, in): Hugging Face's own layout, so loading does not
transpose, and each output row's K weights are contiguous, the layout the weight-streaming GEMV reads at full
bandwidth.

`x @ w` (matmul below):
- GPU, up to GEMV_MAX_ROWS rows of x, bf16/fp16 weights: layers/weight_stream.py's GEMV (Dense functor), fp32
  accumulation: at decode it costs the weight bytes at the memory bandwidth, where cuBLAS at M = 1 reached 0.71
  of it on Llama-3-8B's shapes (issue 20);
- GPU, more rows: cuBLAS with b transposed (TN, tensor cores);
- CPU: x @ w.T in NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cupaged.device import array_module

Array = Any
# Up to this many rows of x, the GEMV rather than cuBLAS. Measured on an H200 (bench/bench_gemv.py, Llama-3-8B
# shapes, fraction of the read limit, GEMV vs cuBLAS TN): at M = 1 qkv 0.87 vs 0.84, o 0.73 vs 0.64, gate_up 1.05
# vs 1.07, down 0.89 vs 0.94 (even in sum; the GEMV wins on the small projections); at M = 2 cuBLAS wins
# (qkv 0.79 vs 0.83, gate_up 1.02 vs 1.06, down 0.85 vs 0.94), and the GEMV's CUDA-core FMAs lose more with each
# row (gate_up 0.58 vs 1.05 at M = 8).
GEMV_MAX_ROWS = 1
GEMV_DTYPES = ("bfloat16", "float16")


class DenseLinear:
    """A linear weight [out, in] on its device; `shape` is [in, out], as `x @ w` reads it."""

    def __init__(self, weight: Array):
        self.weight = weight
        self.shape = (weight.shape[1], weight.shape[0])
        self.dtype = weight.dtype


def matmul(x: Array, w: DenseLinear, out_dtype: Any = None, out: Array | None = None) -> Array:
    """x [M, K] @ w ([K, N] as a product; stored [N, K]) in out_dtype (x's if None), into `out` if given."""
    from cupaged.layers import reference

    if x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"dense matmul: x {tuple(x.shape)} does not fit a weight of {w.shape[0]} inputs")
    if array_module(w.weight) is np:
        return reference.matmul(x, w.weight.T, out_dtype, out)
    out_dtype = np.dtype(out.dtype if out is not None else out_dtype or x.dtype)
    return _matmul_gpu(x, w, out_dtype, out)


def _matmul_gpu(x: Array, w: DenseLinear, out_dtype: np.dtype, out: Array | None) -> Array:
    import cupy

    from cupaged.kernels import ctype
    from cupaged.layers import cublas, reference, weight_stream

    m, (k, n) = x.shape[0], w.shape
    result = out if out is not None and out.flags.c_contiguous else cupy.empty((m, n), dtype=out_dtype)
    if 0 < m <= GEMV_MAX_ROWS and w.dtype.name in GEMV_DTYPES and out_dtype.name in weight_stream.FLOATS \
            and w.weight.flags.c_contiguous and k % 8 == 0 and w.weight.data.ptr % 16 == 0:
        weight_stream.gemv(f"cupaged::stream::Dense<{ctype(w.dtype)}>", w.weight, k * w.weight.itemsize, n, k,
                           weight_stream.streamable(x), result)
    elif cublas.supported(x, w.weight, out_dtype, b_transposed=True):
        cublas.handle().matmul(x, w.weight, result, b_transposed=True)
    else:
        return reference.matmul(x, w.weight.T, out_dtype, out)
    if out is not None and result is not out:
        out[...] = result
        return out
    return result
