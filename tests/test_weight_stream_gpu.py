"""The weight-streaming GEMV (cuda/gguf_matmul.cu weight_gemv, layers/weight_stream.py) for every format, at
Llama-3-8B's K, every activation row count 1..16, an odd number of output rows, against NumPy in float32.

Bounds, stated before measuring:
- float32 out: the weights are decoded exactly (GGUF, FP8 codes, bf16/fp16 values are all exact in fp32) and
  accumulated in fp32: only the summation order differs from NumPy's, ~2^-24 sqrt(K) relative: 2e-5 in relative
  L2 at K = 14336.
- 16-bit out: one rounding of the result (2^-9 relative for bf16, per element) on top: 2^-8 |want| + 1e-3 rms.
- FP8: the reference is x @ (decode(codes) * scale).T with x NOT quantized (W8A16): the cuBLASLt path (x
  quantized per token, tests/test_fp8_weights_gpu.py) is farther from it by x's e4m3 rounding.
Inputs are fresh random numbers (every GGUF bit random), outputs NaN-poisoned, the memory pool poisoned too.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from test_gguf_ops import random_weight

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_memory_pool")]

ROWS = 333  # odd: the last warp's second row and the last CTA's warps fall past N
ROW_COUNTS = list(range(1, 17))
DENSE = {"bfloat16": "cupaged::stream::Dense<__nv_bfloat16>", "float16": "cupaged::stream::Dense<__half>"}
FP8 = "cupaged::stream::Fp8"


def norm_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check(got: np.ndarray, want: np.ndarray, out_dtype: str) -> None:
    assert got.shape == want.shape and np.isfinite(got).all()
    if out_dtype == "float32":
        assert norm_error(got, want) < 2e-5
    else:
        rms = np.sqrt((want ** 2).mean())
        np.testing.assert_array_less(np.abs(got - want), 2 ** -8 * np.abs(want) + 1e-3 * rms)


def device_x(rng: np.random.Generator, m: int, k: int, dtype: str):
    """Random activations on the GPU in dtype, and the float32 values they hold."""
    import cupy

    from cupaged.device import resolve_dtype, to_numpy

    x = cupy.asarray(rng.standard_normal((m, k), dtype=np.float32)).astype(resolve_dtype(dtype))
    return x, np.asarray(to_numpy(x), np.float32)


def run_gemv(functor: str, w, row_bytes: int, k: int, x, out_dtype: str, row_scales=None):
    import cupy

    from cupaged.layers import weight_stream

    out = cupy.full((x.shape[0], ROWS), np.nan, dtype=out_dtype)
    weight_stream.gemv(functor, w, row_bytes, ROWS, k, x, out, row_scales=row_scales)
    return out


@functools.cache
def fp8_weight(k: int):
    """Codes [ROWS, k] and scales of a random float weight, on the GPU, and the float32 values they stand for."""
    import cupy

    from cupaged.layers.fp8_linear import dequantize_rows, quantize_rows

    rng = np.random.default_rng(k)
    codes, scales = quantize_rows(rng.standard_normal((ROWS, k), dtype=np.float32))
    scales = scales * rng.uniform(0.5, 2.0, ROWS).astype(np.float32)  # scales unrelated to the codes' rows too
    return cupy.asarray(codes), cupy.asarray(scales), dequantize_rows(codes, scales)


@pytest.mark.parametrize("m", ROW_COUNTS)
@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0", "Q6_K", "Q4_0"])
def test_gguf_formats(ops, fmt: str, m: int) -> None:
    """Through gguf_ops.matmul (its streaming functor or the 8-value one), float32 out."""
    import cupy

    from cupaged import quant
    from cupaged.layers import gguf_ops

    rng = np.random.default_rng(m)
    p = random_weight(rng, fmt, ROWS, 4096)
    w = quant.QuantizedLinear([quant.QuantizedWeight(fmt, p.shape, cupy.asarray(p.blocks))])
    x, xh = device_x(rng, m, 4096, "bfloat16")
    out = cupy.full((m, ROWS), np.nan, dtype=cupy.float32)
    gguf_ops.matmul(x, w, out=out)
    check(out.get(), xh @ p.dequantize().T, "float32")


@pytest.mark.parametrize("m", ROW_COUNTS)
@pytest.mark.parametrize("k", [4096, 14336])
@pytest.mark.parametrize("x_dtype, out_dtype", [("bfloat16", "bfloat16"), ("float16", "float32")])
def test_fp8(ops, m: int, k: int, x_dtype: str, out_dtype: str) -> None:
    rng = np.random.default_rng(100 * m + k)
    codes, scales, w = fp8_weight(k)
    x, xh = device_x(rng, m, k, x_dtype)
    got = run_gemv(FP8, codes, k, k, x, out_dtype, scales).get().astype(np.float32)
    check(got, xh @ w.T, out_dtype)


@pytest.mark.parametrize("m", ROW_COUNTS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("out_dtype", ["same", "float32"])
def test_dense(ops, m: int, dtype: str, out_dtype: str) -> None:
    rng = np.random.default_rng(m)
    w, wh = device_x(rng, ROWS, 4096, dtype)
    x, xh = device_x(rng, m, 4096, dtype)
    out_dtype = dtype if out_dtype == "same" else out_dtype
    got = run_gemv(DENSE[dtype], w, 2 * 4096, 4096, x, out_dtype).get().astype(np.float32)
    check(got, xh @ wh.T, out_dtype)


def test_fp8_linear_dispatch(ops) -> None:
    """fp8_linear.matmul takes the GEMV up to GEMV_MAX_ROWS rows: its result equals the kernel's bit for bit."""
    import cupy

    from cupaged.layers import fp8_linear

    rng = np.random.default_rng(5)
    codes, scales, _ = fp8_weight(4096)
    linear = fp8_linear.Fp8Linear(codes[:320], scales[:320])
    x, _ = device_x(rng, fp8_linear.GEMV_MAX_ROWS, 4096, "bfloat16")
    direct = run_gemv(FP8, codes, 4096, 4096, x, "bfloat16", scales)[:, :320]
    np.testing.assert_array_equal(fp8_linear.matmul(x, linear).get(), cupy.ascontiguousarray(direct).get())


@pytest.mark.parametrize("functor", [FP8, DENSE["bfloat16"]])
def test_graph_replay_equals_eager(ops, functor: str) -> None:
    """Captured in a CUDA graph and replayed on new x, the GEMV writes what it writes eagerly."""
    import cupy

    from cupaged.layers import weight_stream

    rng = np.random.default_rng(12)
    if functor == FP8:
        w, scales, _ = fp8_weight(4096)
        row_bytes = 4096
    else:
        (w, _), scales, row_bytes = device_x(rng, ROWS, 4096, "bfloat16"), None, 8192
    x, _ = device_x(rng, 7, 4096, "bfloat16")
    out = cupy.full((7, ROWS), np.nan, dtype="bfloat16")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        weight_stream.gemv(functor, w, row_bytes, ROWS, 4096, x, out, row_scales=scales)  # compiles
        stream.begin_capture()
        weight_stream.gemv(functor, w, row_bytes, ROWS, 4096, x, out, row_scales=scales)
        graph = stream.end_capture()
    x[...] = device_x(rng, 7, 4096, "bfloat16")[0]
    out[...] = np.nan
    graph.launch(stream)
    stream.synchronize()
    eager = cupy.full((7, ROWS), np.nan, dtype="bfloat16")
    weight_stream.gemv(functor, w, row_bytes, ROWS, 4096, x, eager, row_scales=scales)
    np.testing.assert_array_equal(out.get(), eager.get())


@pytest.mark.parametrize("m", [1, 16, 17, 64])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
def test_dense_linear_dispatch(ops, m: int, out_dtype: str) -> None:
    """DenseLinear: the GEMV up to GEMV_MAX_ROWS rows, cuBLAS TN beyond (bf16 tensor cores, fp32 accumulation: the
    same bounds), into a NaN-poisoned `out` and into a fresh array."""
    import cupy

    from cupaged.layers.dense_linear import DenseLinear, matmul

    rng = np.random.default_rng(m)
    w, wh = device_x(rng, 320, 4096, "bfloat16")
    x, xh = device_x(rng, m, 4096, "bfloat16")
    out = cupy.full((m, 320), np.nan, dtype=out_dtype)
    assert matmul(x, DenseLinear(w), out=out) is out
    check(out.get().astype(np.float32), xh @ wh.T, out_dtype)
    fresh = matmul(x, DenseLinear(w), out_dtype)
    assert fresh.dtype == np.dtype(out.dtype)
    np.testing.assert_array_equal(fresh.get(), out.get())
