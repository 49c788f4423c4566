"""GGUF block formats on the CPU: cupaged.quant's NumPy dequantizers against the `gguf` package's (the oracle),
quantized products and lookups (layers/gguf_ops.py's host path, the CUDA kernels' reference), and the model
with its weights kept quantized against the same file dequantized at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cupaged import quant
from cupaged.layers import gguf_ops
from cupaged.quant import QuantizedLinear, QuantizedWeight

def random_weight(rng: np.random.Generator, fmt: str, rows: int, cols: int) -> QuantizedWeight:
    """A [rows, cols] weight of random blocks: every quant and scale bit random, fp16 scales finite and small
    (so that products of a few thousand terms stay O(1) to O(100))."""
    f = quant.FORMATS[fmt]
    blocks = rng.integers(0, 256, (rows * (cols // f.block_size), f.type_size), dtype=np.uint8)
    for offset in f.scale_offsets:  # random bytes there could be Inf or NaN
        scale = (rng.standard_normal(len(blocks)) * 0.02).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return QuantizedWeight(fmt, (rows, cols), blocks.reshape(rows, -1))


@pytest.mark.parametrize("fmt", quant.KERNEL_FORMATS)
def test_dequantizers_equal_gguf(fmt: str) -> None:
    """Bit-exact against gguf.quants.dequantize on random blocks, an odd number of rows."""
    import gguf

    w = random_weight(np.random.default_rng(1), fmt, 37, 2 * quant.FORMATS[fmt].block_size)
    want = gguf.quants.dequantize(w.blocks, gguf.GGMLQuantizationType[fmt]).reshape(w.shape)
    got = w.dequantize()
    assert got.dtype == np.float32 and got.shape == (37, w.shape[1])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt, dtype", [("F32", np.float32), ("F16", np.float16)])
def test_plain_formats_equal_gguf(fmt: str, dtype: type) -> None:
    import gguf

    x = np.random.default_rng(2).standard_normal((5, 7)).astype(dtype)
    want = gguf.quants.dequantize(x, gguf.GGMLQuantizationType[fmt])
    np.testing.assert_array_equal(quant.dequantize(x.view(np.uint8), fmt, (5, 7)), want)


def test_bf16_format() -> None:
    x = np.array([1.5, -2.25, 2.0 ** 120, 0.0], np.float32)  # exact in bf16
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(quant.dequantize(bits.view(np.uint8), "BF16", (4,)), x)


def test_bad_blocks_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="Q4_K.*uint8 \\(2, 144\\)"):
        QuantizedWeight("Q4_K", (2, 256), np.zeros((2, 143), np.uint8))
    with pytest.raises(ValueError, match="100 columns are not whole Q8_0 blocks"):
        QuantizedWeight("Q8_0", (2, 100), np.zeros((2, 100), np.uint8))
    with pytest.raises(ValueError, match="IQ9_X"):
        quant.dequantize(np.zeros(10, np.uint8), "IQ9_X", (10,))
    with pytest.raises(ValueError, match="needs 36 bytes, got 35"):
        quant.dequantize(np.zeros(35, np.uint8), "Q4_0", (64,))
    with pytest.raises(ValueError, match="plain float type"):
        QuantizedWeight("F16", (2, 2), np.zeros((2, 4), np.uint8))


def test_fuse_merges_neighbours_of_one_format() -> None:
    """q|k of Q4_K and v of Q6_K (a Q4_K_M layer): two parts, q and k's rows stacked in order."""
    rng = np.random.default_rng(3)
    q, k, v = (random_weight(rng, f, r, 256) for f, r in (("Q4_K", 8), ("Q4_K", 4), ("Q6_K", 4)))
    fused = QuantizedLinear.fuse([q, k, v], np)
    assert [(p.format, p.shape) for p in fused.parts] == [("Q4_K", (12, 256)), ("Q6_K", (4, 256))]
    assert fused.out_features == 16 and fused.nbytes == q.nbytes + k.nbytes + v.nbytes
    np.testing.assert_array_equal(fused.parts[0].dequantize(), np.concatenate([q.dequantize(), k.dequantize()]))
    with pytest.raises(ValueError, match="different input sizes"):
        QuantizedLinear.fuse([q, random_weight(rng, "Q8_0", 4, 64)], np)


def test_host_matmul_and_embedding() -> None:
    """The reference path: x @ W^T over parts of different formats, into a given output; rows looked up."""
    rng = np.random.default_rng(4)
    parts = [random_weight(rng, "Q5_1", 5, 64), random_weight(rng, "Q8_0", 3, 64)]
    w = QuantizedLinear(parts)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    dense = np.concatenate([p.dequantize() for p in parts])
    np.testing.assert_allclose(gguf_ops.matmul(x, w), x @ dense.T, rtol=1e-5, atol=1e-6)
    out = np.full((3, 8), np.nan, np.float32)
    assert gguf_ops.matmul(x, w, out=out) is out
    np.testing.assert_allclose(out, x @ dense.T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not match a weight of 64 inputs"):
        gguf_ops.matmul(x[:, :32], w)
    table = gguf_ops.QuantizedEmbedding(QuantizedLinear([parts[0]]), np.float32)
    assert table.shape == (5, 64)
    np.testing.assert_array_equal(table[np.array([4, 0, 4])], parts[0].dequantize()[[4, 0, 4]])


def _file(tmp_path: Path, preset: str, mix: str) -> Path:
    from tools.make_gguf import make_gguf

    return make_gguf(tmp_path / "m.gguf", preset, mix=mix, seed=5, hidden_size=256, intermediate_size=512)


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
def test_quantized_model_matches_dequantized(tmp_path: Path, preset: str) -> None:
    """The same Q4_K_M file (Q4_K and Q6_K parts in one layer; llama's Q/K rows un-permuted as whole rows of
    blocks) with its weights kept quantized on the host gives the dequantized model's logits (float32 both:
    the only difference is the order of the products' sums)."""
    from helpers import teacher_forced_logits

    from cupaged.checkpoint import open_checkpoint
    from cupaged.layers import reference
    from cupaged.models.llama import LlamaModel, expected_weights

    config, _, read = open_checkpoint(_file(tmp_path, preset, "q4_k_m"))
    expected = expected_weights(config)
    plain = LlamaModel(config, read(expected, "float32"), reference, np)
    kept = LlamaModel(config, read(expected, "float32", dequantize=False), reference, np)
    assert isinstance(kept.layers[0].w_qkv, QuantizedLinear) and isinstance(kept.lm_head, QuantizedLinear)
    assert {p.format for layer in kept.layers for p in layer.w_down.parts} >= {"Q6_K"}
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, config.vocab_size, n) for n in (9, 20)]
    for a, b in zip(teacher_forced_logits(plain, seqs, [5, 12]), teacher_forced_logits(kept, seqs, [5, 12])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_gguf_tensors_are_read_on_access(tmp_path: Path) -> None:
    """Nothing is read until a tensor is asked for, and then only that tensor's bytes: the bytes of the file,
    rows un-permuted for llama's Q."""
    import gguf

    from cupaged.checkpoint import open_checkpoint
    from cupaged.gguf import unpermute_qk
    from cupaged.models.llama import expected_weights

    path = _file(tmp_path, "llama-tiny", "q8_0")
    config, _, read = open_checkpoint(path)
    calls = []
    original = np.fromfile

    def counting(*args, **kwargs):
        calls.append(kwargs.get("count"))
        return original(*args, **kwargs)

    np.fromfile = counting
    try:
        tensors = read(expected_weights(config), "float32", dequantize=False)
        assert calls == [] and "model.layers.0.self_attn.q_proj.weight" in tensors
        q = tensors["model.layers.0.self_attn.q_proj.weight"]
    finally:
        np.fromfile = original
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
    assert calls == [int(t.n_bytes)]
    assert isinstance(q, QuantizedWeight) and q.format == "Q8_0"
    file_rows = np.asarray(t.data).view(np.uint8).reshape(q.shape[0], -1)
    np.testing.assert_array_equal(q.blocks, unpermute_qk(file_rows, config.num_heads))


@pytest.mark.parametrize("dequantize", [True, False])
def test_nan_scale_is_refused_by_name(tmp_path: Path, dequantize: bool) -> None:
    """A NaN fp16 scale in one block of a quantized tensor: the load names the tensor, kept quantized or not."""
    import gguf

    from cupaged.checkpoint import CheckpointError, open_checkpoint
    from cupaged.layers import reference
    from cupaged.models.llama import LlamaModel, expected_weights

    path = _file(tmp_path, "qwen3-tiny", "q8_0")
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_up.weight")
    with open(path, "r+b") as f:
        f.seek(int(t.data_offset) + 34 * 5)  # block 5's d
        f.write(np.array([np.nan], np.float16).tobytes())
    config, _, read = open_checkpoint(path)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        LlamaModel(config, read(expected_weights(config), "float32", dequantize=dequantize), reference, np)
