"""FP8 weights (quantization="fp8"): linear layers as e4m3 codes with one float32 scale per output channel.

The linear layers (q|k|v, o, gate|up, down) are stored as codes [out, in] (K-major, cuBLASLt's FP8 "TN" format)
and scales [out]; embeddings, norms and the LM head stay in the model dtype. A product x @ w quantizes x per
token (row) with a dynamic scale, multiplies the codes, and scales the result by the outer product of the token
and channel scales:
- GPU (sm_89+), more than GEMV_MAX_ROWS rows of x: cuda/fp8_quant.cu quantizes the rows, layers/cublaslt.py
  multiplies, fp8_quant.cu scales.
- GPU, up to GEMV_MAX_ROWS rows (decode): the weight-streaming GEMV (layers/weight_stream.py) reads the codes once,
  converts them in registers and multiplies by x as it is (bf16/fp16, not quantized), fp32 accumulation, the
  channel scale applied once per output: W8A16, so its results are closer to x @ w than the W8A8 path's.
- CPU: the same quantization in NumPy (fp8.encode_e4m3's exact rounding, the GPU kernels' reference), then the
  product of the dequantized float32 values.
Scales are amax / 448 (float, not a power of two): the full e4m3 range is used, and the division by them happens
once per row. A row is x ~= decode(codes) * scale with relative error at most 2^-4 per value (3 mantissa bits).

Weights reach the model as Fp8Weight parts (a checkpoint already in FP8, checkpoint.py) or QuantizeAtLoad parts
(a bf16/fp16 checkpoint with quantization="fp8": quantized on the device they are uploaded to); Fp8Linear.fuse
makes one linear of the parts (q, k, v -> q|k|v), which per-channel scales make the same as quantizing the
fused matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cupaged.device import array_module
from cupaged.fp8 import E4M3_MAX, decode_e4m3, encode_e4m3

Array = Any

QUANTIZATIONS = ("fp8",)
LINEAR_SUFFIXES = tuple(f"{p}.weight" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
MIN_AMAX = np.float32(1e-30)  # fp8_quant.cu's FP8_MIN_AMAX: a zero row gets a finite scale
K_MULTIPLE = 16  # cuBLASLt FP8: leading dimensions (K bytes) multiples of 16; N too, for 16-byte output rows
# Up to this many rows of x, the W8A16 GEMV instead of quantize + cuBLASLt + scale (three launches). Measured on
# an H200 (bench/bench_gemv.py, Llama-3-8B shapes, fraction of the read limit, GEMV vs cuBLASLt path): at M = 2
# qkv 0.59 vs 0.49, o 0.45 vs 0.38, gate_up 0.84 vs 0.87, down 0.73 vs 0.57; at M = 4 the GEMV loses (its FMAs
# run on CUDA cores): qkv 0.40 vs 0.48, gate_up 0.58 vs 0.86. At M = 1 the bench's first cell of a shape is
# unsteady (gate_up 0.37 in one run and 0.85 in the next, down 0.25 and 0.15, while M = 2 gave 0.84 and 0.73 both
# times); batch-1 decode of the Llama-3-8B shape was 293 and 282 tok/s in those two runs.
GEMV_MAX_ROWS = 2
GEMV_FUNCTOR = "cupaged::stream::Fp8"


def resolve_quantization(quantization: str | None) -> str | None:
    """None or "fp8"; ValueError naming the option otherwise."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    return quantization


def check_device(device: str, dtype: np.dtype) -> None:
    """Refuse FP8 GEMMs on a GPU without FP8 tensor cores (compute capability < 8.9), or writing float32, by name."""
    if device != "cuda":
        return
    if np.dtype(dtype).name not in ("bfloat16", "float16"):
        raise ValueError(f"quantization='fp8' on the GPU needs dtype bfloat16 or float16 (the FP8 GEMM's output), "
                         f"got {np.dtype(dtype).name}")
    import cupy

    cc = int(cupy.cuda.Device().compute_capability)
    if cc < 89:
        raise ValueError(f"quantization='fp8' needs FP8 tensor cores (compute capability 8.9 or newer: Ada, "
                         f"Hopper); this GPU is sm_{cc}. Leave quantization unset, or run on the CPU")


@dataclass
class Fp8Weight:
    """One linear weight in FP8: codes uint8 [out, in] (e4m3), scales float32 [out]; w ~= codes * scales[:, None]."""
    codes: Array
    scales: Array


@dataclass
class QuantizeAtLoad:
    """A plain weight [out, in] that Fp8Linear.fuse quantizes on the device it uploads it to."""
    weight: Array


def quantize_rows(x: Array) -> tuple[Array, Array]:
    """x [rows, cols] -> (uint8 e4m3 codes [rows, cols], float32 scales [rows]): per-row amax / 448 scales.
    NumPy, or on the GPU cuda/fp8_quant.cu's kernel (bit-identical: the same IEEE divide and multiply)."""
    if array_module(x) is not np:
        return _quantize_rows_gpu(x)
    x = np.asarray(x, dtype=np.float32)
    amax = np.maximum(np.fmax.reduce(np.abs(x), axis=-1, initial=0.0).astype(np.float32), MIN_AMAX)
    inv = (np.float32(E4M3_MAX) / amax).astype(np.float32)
    return encode_e4m3(x * inv[:, None]), (amax / np.float32(E4M3_MAX)).astype(np.float32)


def dequantize_rows(codes: Array, scales: Array) -> np.ndarray:
    """float32 values of quantize_rows' output (NumPy)."""
    return decode_e4m3(codes) * np.asarray(scales, dtype=np.float32)[:, None]


class Fp8Linear:
    """A linear layer in FP8 on its device: codes [N, K] (out, in) and scales [N]; `x @ self` is matmul's."""

    def __init__(self, codes: Array, scales: Array):
        self.codes, self.scales = codes, scales
        self.shape = (codes.shape[1], codes.shape[0])  # [in, out], as the plain weights' `x @ w`
        if array_module(codes) is not np and (codes.shape[1] % K_MULTIPLE or codes.shape[0] % K_MULTIPLE):
            raise ValueError(f"quantization='fp8': a linear layer of {codes.shape[1]} inputs and {codes.shape[0]} "
                             f"outputs; cuBLASLt's FP8 GEMM needs both multiples of {K_MULTIPLE}")

    @classmethod
    def fuse(cls, parts: list[tuple[str, Fp8Weight | QuantizeAtLoad | Array]], xp: ModuleType,
             check: Callable[[str, Array], None] | None = None) -> "Fp8Linear":
        """One linear of named parts stacked along the outputs, uploaded to xp; a plain array among FP8 parts
        (a checkpoint that left that one unquantized) is quantized like a QuantizeAtLoad. Each uploaded tensor
        goes to `check` (checkpoint.FiniteCheck.add: NaN/Inf refused by name)."""
        codes, scales = [], []
        for name, part in parts:
            if isinstance(part, Fp8Weight):
                q, s = xp.asarray(part.codes), xp.asarray(part.scales, dtype=xp.float32)
                if check is not None:
                    check(name + "_scale", s)
            else:
                w = xp.asarray(part.weight if isinstance(part, QuantizeAtLoad) else part)
                if check is not None:
                    check(name, w)
                q, s = quantize_rows(w)
                del w
            codes.append(q)
            scales.append(s)
        if len(parts) == 1:
            return cls(xp.ascontiguousarray(codes[0]), scales[0])
        return cls(xp.concatenate(codes), xp.concatenate(scales))

    def dequantize(self) -> np.ndarray:
        """float32 [in, out] (NumPy): the weight these codes stand for, transposed like the plain weights."""
        from cupaged.device import to_numpy

        return dequantize_rows(to_numpy(self.codes), to_numpy(self.scales)).T


def matmul(x: Array, w: Fp8Linear, out_dtype: Any = None, out: Array | None = None) -> Array:
    """x [M, K] @ w ([K, N] in FP8), in out_dtype (x's if None), into `out` if given: x quantized per token."""
    out_dtype = np.dtype(out.dtype if out is not None else out_dtype or x.dtype)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8 matmul: x {x.shape} does not fit a weight of {w.shape[0]} inputs")
    if array_module(x) is not np:
        return _matmul_gpu(x, w, out_dtype, out)
    xq, xs = quantize_rows(x)
    result = (dequantize_rows(xq, xs) @ dequantize_rows(w.codes, w.scales).T).astype(out_dtype)
    if out is not None:
        out[...] = result
        return out
    return result


# ---------------------------------------------------------------------------------------------------- GPU
_THREADS = 256


def _quantize_rows_gpu(x: Array) -> tuple[Array, Array]:
    import cupy

    from cupaged.kernels import ctype, kernel

    rows, cols = x.shape
    if cols % 8 or x.strides[1] != x.itemsize or (x.strides[0] // x.itemsize) % 8 or x.data.ptr % 16:
        x = cupy.ascontiguousarray(x)
        if cols % 8:
            raise ValueError(f"fp8 quantize: rows of {cols} values; the kernel needs a multiple of 8")
    codes, scales = cupy.empty((rows, cols), dtype=cupy.uint8), cupy.empty(rows, dtype=cupy.float32)
    if rows:
        kernel("fp8_quant.cu", f"quantize_rows_fp8<{ctype(x.dtype)}>")(
            (rows,), (_THREADS,), (x, codes, scales, np.int32(cols), np.int64(x.strides[0] // x.itemsize)))
    return codes, scales


def _matmul_gpu(x: Array, w: Fp8Linear, out_dtype: np.dtype, out: Array | None) -> Array:
    import cupy

    from cupaged.layers import weight_stream

    if out_dtype.name not in ("bfloat16", "float16"):
        raise ValueError(f"fp8 matmul on the GPU writes float16 or bfloat16, not {out_dtype.name}")
    m, n = x.shape[0], w.shape[1]
    result = out if out is not None and out.flags.c_contiguous else cupy.empty((m, n), dtype=out_dtype)
    if 0 < m <= GEMV_MAX_ROWS and w.codes.data.ptr % 16 == 0:
        weight_stream.gemv(GEMV_FUNCTOR, w.codes, w.codes.shape[1], n, w.codes.shape[1],
                           weight_stream.streamable(x), result, row_scales=w.scales)
    elif m:
        matmul_cublaslt(x, w, result)
    if out is not None and result is not out:
        out[...] = result
        return out
    return result


def matmul_cublaslt(x: Array, w: Fp8Linear, result: Array) -> None:
    """result (contiguous [M, N], bf16/fp16) = x @ w with x quantized per token: quantize, cuBLASLt, scale."""
    from cupaged.kernels import ctype, kernel
    from cupaged.layers import cublaslt

    m, n = result.shape
    xq, xs = _quantize_rows_gpu(x)
    cublaslt.handle().matmul_fp8(xq, w.codes, result)
    kernel("fp8_quant.cu", f"scale_fp8_output<{ctype(result.dtype)}>")(
        (math.ceil(m * n // 8 / _THREADS),), (_THREADS,), (result, xs, w.scales, np.int32(m), np.int32(n)))
