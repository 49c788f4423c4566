"""Write a random-weight GGUF file of a preset's shape, block-quantized as llama.cpp would quantize it.

    python -m tools.make_gguf --preset llama-3-8b --mix q4_k_m --out /tmp/llama3-8b-q4km.gguf [--seed N]

    from tools.make_gguf import make_gguf
    path = make_gguf(tmp / "m.gguf", "qwen3-tiny", mix="q4_k_m", seed=0, hidden_size=256)

Presets, weight distributions and the tokenizer are those of tools/make_checkpoint.py; the file holds the metadata
and the byte-level BPE vocabulary (with `tokenizer.ggml.pre = "gpt2"`, the split that tokenizer uses) that
cupaged/gguf.py reads. Mixes:

- `f32`: every tensor float32; `q8_0`: every matrix Q8_0 (the `gguf` package's quantizer), norms F32;
- `q4_k_m`: llama.cpp's Q4_K_M: Q4_K matrices, but Q6_K for the output matrix (the embedding when tied) and for
  attn_v and ffn_down of llama.cpp's "more bits" layers (the first and last eighth, every third between); the
  K-quants are encoded by tools/gguf_quants.py. A matrix whose rows are not a multiple of 256 values falls back
  as llama.cpp's does (Q4_K -> Q5_0, Q6_K -> Q8_0).

Tensors are drawn tensor by tensor in the file's order (llama.cpp's: token_embd, the blocks, output_norm, output)
and written as they are made, in row chunks, so an 8B file needs only its largest quantized tensor in memory.
llama.cpp stores the Q and K rows of llama-architecture models permuted for its rope; these are random, so they are
drawn in the file's order directly: the model cupaged loads (which un-permutes them) is as random as the file.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools import gguf_quants
from tools.make_checkpoint import CHATML, LLAMA3_CHAT, LLAMA_SPECIALS, PRESETS, _draw, _specials, make_tokenizer

logger = logging.getLogger(__name__)

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's type for a matrix whose rows are not whole K-quant super-blocks
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
MIXES = ("f32", "q8_0", "q4_k_m")
FILE_TYPES = {"f32": "ALL_F32", "q8_0": "MOSTLY_Q8_0", "q4_k_m": "MOSTLY_Q4_K_M"}  # general.file_type, as llama.cpp
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


def gguf_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(llama.cpp name, NumPy shape) of every tensor of the model, in llama.cpp's file order."""
    h, inter, v, layers = (config[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                               "num_hidden_layers"))
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (v, h))]
    for i in range(layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (q, h)), (b + "attn_k.weight", (kv, h)),
                (b + "attn_v.weight", (kv, h)), (b + "attn_output.weight", (h, q))]
        if config.get("attention_bias") or config["model_type"] == "qwen2":
            out += [(b + "attn_q.bias", (q,)), (b + "attn_k.bias", (kv,)), (b + "attn_v.bias", (kv,))]
        if config["model_type"] == "qwen3":
            out += [(b + "attn_q_norm.weight", (d,)), (b + "attn_k_norm.weight", (d,))]
        out += [(b + "ffn_norm.weight", (h,)), (b + "ffn_gate.weight", (inter, h)),
                (b + "ffn_up.weight", (inter, h)), (b + "ffn_down.weight", (h, inter))]
    out.append(("output_norm.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        out.append(("output.weight", (v, h)))
    return out


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v and ffn_down Q4_K_M keeps in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def qtype_for(name: str, shape: tuple[int, ...], mix: str, config: dict) -> str:
    """The ggml type `mix` gives tensor `name`: vectors stay F32, matrices as the mix says (see the docstring)."""
    if len(shape) == 1 or mix == "f32":
        return "F32"
    if mix == "q8_0":
        return "Q8_0"
    if mix != "q4_k_m":
        raise ValueError(f"unknown mix {mix!r}: choose one of {', '.join(MIXES)}")
    tied = config.get("tie_word_embeddings", False)
    kind = name.split(".")[-2]
    qtype = "Q4_K"
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = "Q6_K"
    elif kind in ("attn_v", "ffn_down") and _more_bits(int(name.split(".")[1]), config["num_hidden_layers"]):
        qtype = "Q6_K"
    return K_FALLBACK[qtype] if shape[-1] % gguf_quants.QK_K else qtype


def _add_metadata(writer: Any, config: dict, tokenizer: Any) -> None:
    """The model keys and the tokenizer that cupaged/gguf.py (and llama.cpp) read."""
    arch = GGUF_ARCH[config["model_type"]]
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    if arch == "llama":
        writer.add_rope_dimension_count(d)

    model = json.loads(tokenizer.to_str())["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    specials = _specials(config)
    # the model's vocabulary is larger than the tokenizer's on real shapes: pad as llama.cpp's converter does
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config["vocab_size"])]
    types = [TOKEN_CONTROL if t in specials else TOKEN_NORMAL if i in by_id else TOKEN_UNUSED
             for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    llama = specials is LLAMA_SPECIALS
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")  # make_checkpoint's tokenizer splits with GPT-2's regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # both end generation (llama.cpp's end-of-generation ids are eos, eot and eom), as make_checkpoint's config
    # lists both; eos is the end of turn, make_checkpoint's eos_token
    end_of_text, end_of_turn = (specials[1], "<|eot_id|>") if llama else (specials[0], "<|im_end|>")
    writer.add_eos_token_id(tokenizer.token_to_id(end_of_turn))
    writer.add_eot_token_id(tokenizer.token_to_id(end_of_text))
    if llama:
        writer.add_bos_token_id(tokenizer.token_to_id(specials[0]))
    writer.add_add_bos_token(llama)
    writer.add_chat_template(LLAMA3_CHAT if llama else CHATML)


def _rope_freqs(config: dict) -> np.ndarray | None:
    """llama.cpp's rope_freqs.weight (per-frequency divisors) for Llama 3 rope scaling, else None."""
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") != "llama3":
        return None
    from cupaged.config import ModelConfig, rope_inv_freq

    model_config = ModelConfig.from_dict(config)
    d = model_config.head_dim
    base = 1.0 / config["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d)
    return (base / rope_inv_freq(model_config)).astype(np.float32)


def _tensor_bytes(rng: np.random.Generator, name: str, shape: tuple[int, ...], qtype: str) -> np.ndarray:
    """Draw one tensor (make_checkpoint's distributions, by row chunks) and encode it in `qtype`."""
    # _draw picks the distribution by the name's suffix, which llama.cpp's names share (norm.weight, .bias)
    chunks = [gguf_quants.quantize(c, qtype) if qtype != "F32" else c for c in _draw(rng, name, shape)]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def make_gguf(out: str | Path, preset: str, mix: str = "q4_k_m", seed: int = 0, **config_overrides: object) -> Path:
    """Write a GGUF file of `preset` (a key of tools.make_checkpoint.PRESETS, with `config_overrides`) and random
    weights quantized by `mix`; return its path."""
    import gguf

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}: choose one of {', '.join(MIXES)}")
    start = time.perf_counter()
    config = copy.deepcopy(PRESETS[preset])
    config.update(copy.deepcopy(config_overrides))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), GGUF_ARCH[config["model_type"]])
    writer.add_name(f"random {preset}")
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[mix]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_metadata(writer, config, make_tokenizer(config))

    plan = [(name, shape, qtype_for(name, shape, mix, config)) for name, shape in gguf_tensors(config)]
    rope_freqs = _rope_freqs(config)
    if rope_freqs is not None:
        writer.add_tensor_info("rope_freqs.weight", rope_freqs.shape, np.dtype(np.float32), rope_freqs.nbytes)
    for name, shape, qtype in plan:
        if qtype == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * math.prod(shape))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[qtype])
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if rope_freqs is not None:
        writer.write_tensor_data(rope_freqs)
    rng = np.random.default_rng(seed)
    for i, (name, shape, qtype) in enumerate(plan):
        writer.write_tensor_data(_tensor_bytes(rng, name, shape, qtype))
        logger.debug("%d/%d %s %s %s", i + 1, len(plan), name, shape, qtype)
    writer.close()
    counts: dict[str, int] = {}
    for _, _, qtype in plan:
        counts[qtype] = counts.get(qtype, 0) + 1
    logger.info("wrote %s: %s %s (%s), %.2f GB in %.1f s", out, preset, mix, counts, out.stat().st_size / 1e9,
                time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_gguf",
                                     description="Write a random-weight, block-quantized GGUF file of a preset.")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--mix", choices=MIXES, default="q4_k_m", help="default: %(default)s")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_gguf(args.out, args.preset, mix=args.mix, seed=args.seed)


if __name__ == "__main__":
    main()
