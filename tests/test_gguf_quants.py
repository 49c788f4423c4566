"""tools/gguf_quants.py's K-quant encoders and tools/make_gguf.py's files, checked against the `gguf` package.

The oracle is `gguf.quants.dequantize`: whatever the encoders write must decode, by gguf's own decoders, to values
within the bound tools/gguf_quants.py states for each format:

    Q4_K, Q5_K (L = 15, 31 levels):  |x - decoded| <= (span_j + dmin) / (2 L) + d / 2,
        span_j = max(x_max, 0) - min(x_min, 0) of the 32-value sub-block j
    Q6_K:                             |x - decoded| <= amax_j / 62 + d / 2, amax_j = max |x| of the 16-value
        sub-block j

with d and dmin the super-block's fp16 factors as stored. On Gaussian data the worst error is at most ~1/30
(Q4_K), ~1/60 (Q5_K, Q6_K) of the sub-block's range.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="the gguf package is not installed (pip install cupaged[gguf])")

K_LEVELS = {"Q4_K": 15, "Q5_K": 31}
# worst error / sub-block range on Gaussian data (measured about 0.035, 0.017, 0.015)
GAUSSIAN_BOUND = {"Q4_K": 0.04, "Q5_K": 0.02, "Q6_K": 0.02}
SHAPES = [(1, 256), (7, 512), (33, 768), (5, 2048)]


def roundtrip(w: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the encoded bytes, gguf's decoding of them)."""
    import gguf

    from tools.gguf_quants import quantize

    raw = quantize(w, qtype)
    return raw, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])


def _fp16_at(raw: np.ndarray, block_bytes: int, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of every block, as float32 [n_blocks]."""
    blocks = raw.reshape(-1, block_bytes)
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32).reshape(-1)


def error_bound(w: np.ndarray, raw: np.ndarray, qtype: str) -> np.ndarray:
    """The stated bound on |x - decoded| for every value of w, from the block's stored d (and dmin)."""
    if qtype == "Q6_K":
        d = _fp16_at(raw, 210, 208)
        x = w.reshape(len(d), 16, 16)
        bound = np.abs(x).max(axis=2) / 62 + d[:, None] / 2
        return np.broadcast_to(bound[..., None], x.shape).reshape(w.shape)
    block = 144 if qtype == "Q4_K" else 176
    d, dmin = _fp16_at(raw, block, 0), _fp16_at(raw, block, 2)
    x = w.reshape(len(d), 8, 32)
    span = np.maximum(x.max(axis=2), 0) - np.minimum(x.min(axis=2), 0)
    bound = (span + dmin[:, None]) / (2 * K_LEVELS[qtype]) + d[:, None] / 2
    return np.broadcast_to(bound[..., None], x.shape).reshape(w.shape)


def check(w: np.ndarray, qtype: str) -> np.ndarray:
    """Encode, decode with gguf, check the shapes, the bytes and the stated bound; return |error|."""
    import gguf

    raw, back = roundtrip(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    assert block == 256 and raw.dtype == np.uint8 and raw.shape == (w.shape[0], w.shape[1] // 256 * size)
    assert back.dtype == np.float32 and back.shape == w.shape
    err = np.abs(back - w)
    slack = 1e-6 * np.abs(w).max()  # float32 arithmetic of the decoder
    assert (err <= error_bound(w, raw, qtype) * (1 + 1e-5) + slack).all(), qtype
    return err


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("shape", SHAPES)
def test_k_quants_decode_within_the_bound(qtype: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng([SHAPES.index(shape), int(qtype[1])])
    w = (rng.standard_normal(shape) * rng.uniform(1e-3, 10)).astype(np.float32)
    err = check(w, qtype)
    sub = 16 if qtype == "Q6_K" else 32
    x = w.reshape(-1, sub)
    span = x.max(axis=1) - x.min(axis=1)
    assert (err.reshape(-1, sub).max(axis=1) <= GAUSSIAN_BOUND[qtype] * span).all()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_on_special_blocks(qtype: str) -> None:
    """Zero, constant (positive and negative), outliers, one-signed, wildly different sub-blocks."""
    rng = np.random.default_rng(1)
    gauss = rng.standard_normal(256).astype(np.float32)
    outliers = gauss.copy()
    outliers[[3, 100, 255]] = [80.0, -120.0, 50.0]
    mixed = gauss * np.repeat(10.0 ** np.arange(-4, 4), 32).astype(np.float32)  # sub-block ranges 1e-4..1e3
    rows = np.stack([np.zeros(256), np.full(256, 0.7), np.full(256, -3.5), outliers, np.abs(gauss) + 2,
                     -np.abs(gauss) - 2, mixed]).astype(np.float32)
    raw, back = roundtrip(rows, qtype)
    check(rows, qtype)
    assert (back[0] == 0).all()
    for i, c in ((1, 0.7), (2, -3.5)):  # a constant block is one grid end: only fp16 rounding is left
        np.testing.assert_allclose(back[i], c, rtol=1e-3)
    big = np.abs(back[3, [3, 100, 255]] - outliers[[3, 100, 255]])
    assert (big <= 0.04 * 200).all()  # outliers are represented (within a step of the block's range), not clipped


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_legacy_formats_go_through_gguf(qtype: str) -> None:
    """The legacy formats make_gguf uses are gguf's own quantizer: same round trip, the format's usual error."""
    import gguf

    rng = np.random.default_rng(2)
    w = rng.standard_normal((9, 512)).astype(np.float32)
    raw, back = roundtrip(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    assert raw.shape == (9, 512 // block * size) and back.shape == w.shape and back.dtype == np.float32
    amax = np.abs(w.reshape(-1, block)).max(axis=1, keepdims=True)
    # symmetric, d = amax / levels in fp16 (relative rounding 2^-11, which moves the top level by levels * 2^-11
    # steps): half a step, but a whole one for Q4_0, whose q - 8 in -8..7 clips +amax when -amax sets d
    levels, steps = {"Q4_0": (8, 1.0), "Q8_0": (127, 0.5)}[qtype]
    err = np.abs(back - w).reshape(-1, block)
    assert (err <= amax / levels * (steps + levels * 2.0 ** -11) * (1 + 1e-5)).all()


def test_k_quant_rejects_rows_not_of_whole_blocks() -> None:
    from tools.gguf_quants import quantize

    with pytest.raises(ValueError, match="multiples of 256"):
        quantize(np.zeros((2, 128), np.float32), "Q4_K")


# ----------------------------------------------------------------------------------------------------------
# whole files

def test_q4_k_m_mix_follows_llama_cpp() -> None:
    from tools.make_checkpoint import PRESETS
    from tools.make_gguf import gguf_tensors, qtype_for

    config = PRESETS["llama-3-8b"]
    types = {name: qtype_for(name, shape, "q4_k_m", config) for name, shape in gguf_tensors(config)}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    more = [i for i in range(32) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert more == [i for i in range(32) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # llama.cpp's use_more_bits
    assert {types[f"blk.{i}.{k}.weight"] for i in range(32) for k in ("attn_q", "attn_k", "attn_output",
                                                                      "ffn_gate", "ffn_up")} == {"Q4_K"}
    tiny = PRESETS["qwen3-tiny"]  # hidden 128: llama.cpp's fallbacks; tied: the embedding is the output
    assert qtype_for("blk.0.attn_q.weight", (512, 128), "q4_k_m", tiny) == "Q5_0"
    assert qtype_for("token_embd.weight", (1031, 128), "q4_k_m", tiny) == "Q8_0"


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("preset, mix, overrides", [
    ("qwen3-tiny", "q4_k_m", {}), ("llama-tiny", "q4_k_m", {}), ("qwen2-tiny", "q8_0", {}),
    ("llama3-tiny", "f32", {"rope_scaling": LLAMA3_ROPE})])
def test_file_loads_as_gguf_decodes_it(tmp_path: Path, preset: str, mix: str, overrides: dict) -> None:
    """The file loads through open_checkpoint into LlamaModel, with exactly gguf's dequantization of each tensor
    (llama's Q and K un-permuted). hidden and intermediate sizes of whole K-quant super-blocks. Llama 3 rope scaling
    goes through rope_freqs.weight (the loader knows original lengths of 2048 and up, not llama3-tiny's 64)."""
    import gguf

    from cupaged.checkpoint import open_checkpoint
    from cupaged.gguf import hf_tensor_name, unpermute_qk
    from cupaged.layers import reference
    from cupaged.models.llama import LlamaModel, expected_weights
    from tools.make_gguf import FILE_TYPES, make_gguf

    path = make_gguf(tmp_path / "m.gguf", preset, mix=mix, seed=3, hidden_size=256,
                     intermediate_size=512, **overrides)
    config, tokenizer, read = open_checkpoint(path)
    assert (config.hidden_size, config.num_layers) == (256, 2)
    assert config.rope_scaling == overrides.get("rope_scaling")
    weights = read(expected_weights(config), "float32")
    model = LlamaModel(config, weights, reference, np)
    assert model.embed.shape == (config.vocab_size, 256)

    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types.values()) == {"q4_k_m": {"Q4_K", "Q6_K", "F32"}, "q8_0": {"Q8_0", "F32"}, "f32": {"F32"}}[mix]
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType[FILE_TYPES[mix]]
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    assert set(weights) == {hf_tensor_name(t.name) for t in tensors}
    for t in tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape)))
        if preset.startswith("llama") and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            want = unpermute_qk(want, config.num_heads if "attn_q" in t.name else config.num_kv_heads)
        np.testing.assert_array_equal(weights[hf_tensor_name(t.name)], want, err_msg=t.name)
    assert tokenizer.decode(tokenizer.encode("Hello world")).endswith("Hello world")
