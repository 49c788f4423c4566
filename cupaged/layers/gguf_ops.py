"""Products and embedding lookups with GGUF-quantized weights (quant.QuantizedLinear), on the host or the GPU.

On the host (NumPy blocks) the weight is dequantized by quant.py's reference and multiplied: what the GPU path
is tested against. On the GPU (CuPy blocks), by the kernels of cuda/gguf_matmul.cu:
- up to GEMV_MAX_ROWS activation rows (decode batches): the weight-streaming GEMV (layers/weight_stream.py),
  which reads every weight byte once; one launch per part of a fused projection, each writing its own output
  columns. Q8_0 and Q4_K have streaming functors of their own (wide loads, then decoding); the other formats go
  through their 8-value dequantizers (`Legacy`);
- more rows (prefill, large batches): each part is dequantized, at most SCRATCH_ELEMENTS values at a time, into
  a buffer kept for the process, and multiplied there by cuBLAS (tensor cores). The buffer is bounded so that it
  costs a fixed 64 MiB (bf16), not a copy of the largest matrix (the LM head of a 128k vocabulary is 1 GiB in bf16).
Both are plain kernel launches and cuBLAS calls on the current stream with no allocation but the output, so CUDA
graphs capture them. The threshold of 16 rows is unmeasured: the GEMV's cost grows with the rows while
dequantize + GEMM costs about one extra write and read of the weight in bf16.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from cupaged.device import array_module
from cupaged.layers import weight_stream
from cupaged.quant import KERNEL_FORMATS, QuantizedLinear, QuantizedWeight

Array = Any
GEMV_MAX_ROWS = weight_stream.GEMV_MAX_ROWS
SCRATCH_ELEMENTS = 1 << 25
# formats with a streaming functor of their own: (functor, the row alignment its loads need)
STREAM_FUNCTORS = {"Q8_0": ("cupaged::stream::Q8_0", 2), "Q4_K": ("cupaged::stream::Q4_K", 16)}


def matmul(x: Array, w: QuantizedLinear, out_dtype: Any = None, out: Array | None = None) -> Array:
    """x [M, K] @ W^T, W [N, K] the parts of `w` stacked: [M, N] in out_dtype (x's if None), into `out` if given."""
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"quantized matmul: x of shape {tuple(x.shape)} does not match a weight of "
                         f"{w.in_features} inputs")
    out_dtype = np.dtype(out.dtype if out is not None else out_dtype or x.dtype)
    xp = array_module(w.parts[0].blocks)
    if out is None:
        out = xp.empty((x.shape[0], w.out_features), dtype=out_dtype)
    elif tuple(out.shape) != (x.shape[0], w.out_features):
        raise ValueError(f"quantized matmul: out of shape {tuple(out.shape)}, expected "
                         f"{(x.shape[0], w.out_features)}")
    if xp is np:
        col = 0
        for p in w.parts:
            out[:, col:col + p.shape[0]] = np.asarray(x, np.float32) @ p.dequantize().T
            col += p.shape[0]
        return out
    return _cuda_matmul(x, w, out)


def embedding(w: QuantizedLinear, ids: Array, dtype: Any) -> Array:
    """Rows `ids` of the (single-part) weight, dequantized: [len(ids), K] of dtype."""
    if len(w.parts) != 1:
        raise ValueError("quantized embedding: the table must be one tensor")
    p = w.parts[0]
    xp = array_module(p.blocks)
    if xp is np:
        return p.dequantize()[np.asarray(ids)].astype(dtype)
    import cupy

    ids = cupy.ascontiguousarray(ids, dtype=cupy.int32)
    out = cupy.empty((ids.shape[0], p.shape[1]), dtype=dtype)
    _dequantize_rows(p, ids, ids.shape[0], out)
    return out


# ------------------------------------------------------------------------------------------------------ GPU
def _cuda_matmul(x: Array, w: QuantizedLinear, out: Array) -> Array:
    import cupy

    m = x.shape[0]
    if m == 0:
        return out
    x = weight_stream.streamable(x)
    if m <= GEMV_MAX_ROWS:
        col = 0
        for p in w.parts:
            rows, cols = p.shape
            row_bytes = p.blocks.shape[1]
            legacy = f"cupaged::stream::Legacy<cupaged::gguf::{p.format}>"
            functor, align = STREAM_FUNCTORS.get(p.format, (legacy, 1))
            functor = legacy if (p.blocks.data.ptr | row_bytes) % align else functor
            weight_stream.gemv(functor, p.blocks, row_bytes, rows, cols, x, out, col)
            col += rows
        return out
    from cupaged.layers import cublas

    scratch = _scratch(x.dtype.name, cupy.cuda.Device().id)
    col = 0
    for p in w.parts:
        rows, cols = p.shape
        step = max(1, SCRATCH_ELEMENTS // cols)
        for first in range(0, rows, step):
            n = min(step, rows - first)
            buf = scratch[:n * cols].reshape(n, cols)
            _dequantize_rows(p, None, n, buf, first)
            cublas.handle().matmul(x, buf, out[:, col + first:col + first + n], b_transposed=True)
        col += rows
    return out


def _dequantize_rows(p: QuantizedWeight, ids: Array | None, n: int, out: Array, first: int = 0) -> None:
    """out [n, K] = rows ids (or first .. first + n) of p, dequantized."""
    from cupaged.kernels import ctype

    if n == 0:
        return
    threads = 128
    blocks = p.blocks[first:]
    _dequantize(p.format, ctype(out.dtype))(
        (-(-(p.shape[1] // 8) // threads), min(n, 65535)), (threads,),
        (blocks, np.int64(p.blocks.shape[1]), ids if ids is not None else np.uint64(0), np.int32(n),
         np.int32(p.shape[1]), out, np.int64(out.strides[0] // out.itemsize)))


@functools.cache
def _dequantize(fmt: str, out_type: str) -> Any:
    from cupaged.kernels import module

    names = tuple(f"gguf_dequantize<cupaged::gguf::{f}, {out_type}>" for f in KERNEL_FORMATS)
    return module("gguf_matmul.cu", names).get_function(f"gguf_dequantize<cupaged::gguf::{fmt}, {out_type}>")


@functools.cache
def _scratch(dtype: str, device_id: int) -> Array:
    """The buffer the larger-M path dequantizes into: one per device and dtype, for the process (outside any
    graph's memory pool, since captured graphs keep writing it)."""
    from cupaged.device import lasting_empty

    return lasting_empty(SCRATCH_ELEMENTS, dtype)


class QuantizedEmbedding:
    """An embedding table kept quantized: `table[ids]` dequantizes just those rows, into `dtype`. It stands where
    the model's embedding array would (indexing, .shape, .dtype); a tied LM head multiplies by `weight`."""

    def __init__(self, weight: QuantizedLinear, dtype: Any):
        self.weight, self.dtype = weight, np.dtype(dtype)
        self.shape = (weight.out_features, weight.in_features)

    def __getitem__(self, ids: Array) -> Array:
        return embedding(self.weight, ids, self.dtype)
