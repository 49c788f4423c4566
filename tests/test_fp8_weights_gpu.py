"""FP8 weights on the GPU: cuda/fp8_quant.cu against the NumPy twin (bit for bit), the cuBLASLt FP8 GEMM
against NumPy, the model's logits within test_fp8_weights.py's bound, CUDA graphs against eager.

Outputs come from a NaN-poisoned memory pool (conftest.poison_memory_pool): an element a kernel forgets shows.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from cupaged.layers.fp8_linear import GEMV_MAX_ROWS, Fp8Linear, QuantizeAtLoad, dequantize_rows, matmul, quantize_rows
from test_fp8_weights import check_logits, fp8_model, random_rows

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_memory_pool")]

LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def device_rows(x: np.ndarray, dtype: str):
    """x on the GPU in dtype, and the float32 host values it holds (what the reference must quantize)."""
    import cupy

    from cupaged.device import resolve_dtype, to_numpy

    d = cupy.asarray(x).astype(resolve_dtype(dtype))
    return d, to_numpy(d).astype(np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("rows, cols", [(1, 16), (37, 4096), (5, 14336), (3, 200)])
def test_quantize_kernel_is_bit_exact(ops, dtype: str, rows: int, cols: int) -> None:
    rng = np.random.default_rng(rows * cols)
    x = random_rows(rng, rows, cols)
    if dtype == "float16":
        x = np.clip(x, -6e4, 6e4)
    d, host = device_rows(x, dtype)
    codes, scales = quantize_rows(d)
    expected_codes, expected_scales = quantize_rows(host)
    np.testing.assert_array_equal(codes.get(), expected_codes)
    np.testing.assert_array_equal(scales.get(), expected_scales)


def test_quantize_kernel_reads_strided_rows(ops) -> None:
    """A column slice of a wider matrix (rows farther apart than their length), as a fused projection's view."""
    rng = np.random.default_rng(7)
    d, host = device_rows(random_rows(rng, 9, 512), "bfloat16")
    codes, scales = quantize_rows(d[:, 128:384])
    expected_codes, expected_scales = quantize_rows(host[:, 128:384])
    np.testing.assert_array_equal(codes.get(), expected_codes)
    np.testing.assert_array_equal(scales.get(), expected_scales)


@functools.cache
def fp8_weight(shape: str, dtype: str) -> tuple[Fp8Linear, np.ndarray]:
    """A random Llama-3-8B-shaped weight as an Fp8Linear, and its dequantized float32 values [N, K] (NumPy)."""
    import cupy

    n, k = LLAMA3_8B[shape]
    w, _ = device_rows(np.random.default_rng(n).standard_normal((n, k), dtype=np.float32) * k ** -0.5, dtype)
    linear = Fp8Linear.fuse([("w", QuantizeAtLoad(w))], cupy)
    return linear, dequantize_rows(linear.codes.get(), linear.scales.get())


@pytest.mark.parametrize("m", [1, 7, 16, 17, 129])
@pytest.mark.parametrize("shape", ["qkv", "down"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fp8_gemm_matches_numpy(ops, m: int, shape: str, dtype: str) -> None:
    import cupy

    n, k = LLAMA3_8B[shape]
    x, xh = device_rows(random_rows(np.random.default_rng(m + n), m, k), dtype)
    linear, w_values = fp8_weight(shape, dtype)
    out = matmul(x, linear)
    assert out.dtype == x.dtype and out.shape == (m, n)
    # up to GEMV_MAX_ROWS rows the W8A16 GEMV multiplies x as it is; more rows go through cuBLASLt with x quantized
    # per token like the reference's
    expected = (xh if m <= GEMV_MAX_ROWS else dequantize_rows(*quantize_rows(xh))) @ w_values.T
    actual = out.get().astype(np.float32)
    assert np.isfinite(actual).all()
    # the codes are the reference's (test above); what is left is the output's 16-bit rounding (twice: before and
    # after the scaling, 2^-8 relative at most; once in the GEMV) and the order of fp32 accumulation
    rms = np.sqrt((expected ** 2).mean(axis=1, keepdims=True))
    np.testing.assert_array_less(np.abs(actual - expected), 2 ** -7 * np.abs(expected) + 4e-3 * rms)
    into = cupy.full((m, n), np.nan, dtype=x.dtype)
    assert matmul(x, linear, out=into) is into
    np.testing.assert_array_equal(into.get(), out.get())


def test_fp8_gemm_refuses_shapes_cublaslt_cannot_take(ops) -> None:
    import cupy

    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.fuse([("w", QuantizeAtLoad(cupy.ones((32, 40), dtype=cupy.float16)))], cupy)


@pytest.mark.parametrize("preset", ["llama3-tiny", "qwen3-tiny", "mistral-tiny"])
def test_model_logits_fp8_within_the_bound(ops, preset: str, checkpoints) -> None:
    """The GPU model with FP8 weights (bf16 activations) against the float32 CPU model, with the CPU tests' bound;
    the bf16 GPU model's own distance printed beside it."""
    import cupy

    from cupaged.checkpoint import open_checkpoint
    from cupaged.layers import cuda_ops
    from cupaged.models.llama import LlamaModel, expected_weights
    from cupaged.layers.fp8_linear import quantize_at_load
    from helpers import teacher_forced_logits

    path = checkpoints(preset)
    rng = np.random.default_rng(8)
    sequences = [rng.integers(0, 1000, n) for n in (5, 19, 40)]
    prompt_lens = [3, 11, 24]
    expected = teacher_forced_logits(fp8_model(path, quantize=False), sequences, prompt_lens)
    config, _, read = open_checkpoint(path)
    fp8 = LlamaModel(config, quantize_at_load(read(expected_weights(config), "bfloat16")), cuda_ops, cupy)
    assert isinstance(fp8.layers[0].w_gate_up, Fp8Linear)
    bf16 = LlamaModel(config, read(expected_weights(config), "bfloat16"), cuda_ops, cupy)
    print("bf16:", end=" ")
    check_logits(teacher_forced_logits(bf16, sequences, prompt_lens), expected)
    print("fp8:", end=" ")
    check_logits(teacher_forced_logits(fp8, sequences, prompt_lens), expected)


def test_engine_fp8_graphs_match_eager(ops, checkpoints, tmp_path) -> None:
    """Greedy tokens of the FP8 engine replaying CUDA graphs equal the eager engine's; a checkpoint stored in FP8
    (compressed-tensors, per channel: the same codes as quantizing the float32 draws) runs too."""
    from cupaged import LLM, SamplingParams
    from tools.make_checkpoint import make_checkpoint

    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (3, 17, 40, 65, 8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    stored = make_checkpoint(tmp_path / "ct", "llama3-tiny", dtype="bfloat16", quantization="compressed-tensors")
    runs = {}
    for name, path, options in [("eager", checkpoints("llama3-tiny", "bfloat16"), {"enforce_eager": True}),
                                ("graphs", checkpoints("llama3-tiny", "bfloat16"), {}),
                                ("stored", stored, {})]:
        llm = LLM(str(path), device="cuda", quantization="fp8" if name != "stored" else None, num_kv_blocks=256,
                  **options)
        runs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
    assert runs["eager"] == runs["graphs"]
    assert all(len(t) == 24 for t in runs["eager"] + runs["stored"])
    agree = np.mean([a[0] == b[0] for a, b in zip(runs["eager"], runs["stored"])])
    print(f"first tokens of the stored FP8 checkpoint equal the quantized-at-load engine's in {agree:.0%}")
