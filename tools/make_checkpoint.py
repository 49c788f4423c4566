"""Write a complete random-weight Hugging Face checkpoint of a Llama-family architecture.

    python -m tools.make_checkpoint --preset qwen3-0.6b --dtype bfloat16 --out /tmp/qwen3-0.6b [--seed N]
    python -m tools.make_checkpoint --list

    from tools.make_checkpoint import PRESETS, make_checkpoint, weights_digest
    path = make_checkpoint(tmp_dir, "qwen3-tiny", dtype="float32", seed=0, shard_bytes=None, **config_overrides)

The directory holds config.json, model.safetensors (or, with `shard_bytes`, model-0000k-of-0000n.safetensors
shards and model.safetensors.index.json), tokenizer.json, tokenizer_config.json (with a jinja chat template:
ChatML for Qwen, Llama 3's for Llama and Mistral), special_tokens_map.json and generation_config.json:
everything transformers and cupaged need to load it.

Weights are deterministic for a given preset, dtype and seed: one `numpy.random.default_rng(seed)` draws them
tensor by tensor in sorted name order (float32 normals, then rounded to the checkpoint's dtype). Linear weights
*and embeddings* have std 1/sqrt(fan_in): with tied embeddings the embedding matrix is also the LM head, and this
is what keeps activations and logits O(1) (std 1 embeddings would give logits of std sqrt(hidden_size)); the
final RMSNorm makes the input scale irrelevant. RMSNorm weights are 1 + 0.1 * normal (a missing norm weight
shows), biases 0.1 * normal. The safetensors files are written by hand, tensor by tensor in row chunks, so even
llama-3-8b needs little memory; bfloat16 is rounded (to nearest even) with NumPy bit arithmetic, so nothing here
needs torch or ml_dtypes (only numpy and, for the tokenizer, `tokenizers`).

The tokenizer is a byte-level BPE trained with `tokenizers` on CORPUS below (English, code, JSON, several scripts,
emoji), with a ByteLevel decoder, so decode(encode(s)) == s for any string. The family's special tokens take the
first ids. For the tiny presets its vocabulary is exactly the model's (every id decodes); the corpus yields about
1800 tokens, so the real-shape presets have a model vocabulary larger than the tokenizer's, as Qwen's has.

Tiny presets are for tests; the real shapes (qwen3-0.6b, llama-3.2-1b, llama-3-8b, their Hugging Face configs)
are for benchmarks. Changing how weights are drawn changes `weights_digest` and invalidates the fixtures under
tests/fixtures/ (rebuild them with `python -m tools.make_reference_logits` and `python -m tools.make_beam_fixtures`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# dtype name -> (safetensors dtype tag, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
_CHUNK_ELEMENTS = 1 << 24  # random numbers drawn per step for large tensors (64 MiB of float32)
_MAX_TOKENIZER_VOCAB = 8192  # the corpus yields fewer; real-shape models keep their full vocab_size

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _config(arch: str, **kw: object) -> dict:
    base = {"architectures": [arch], "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
            "attention_bias": False, "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32",
            "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[arch]}
    base.update(kw)
    return base


PRESETS: dict[str, dict] = {
    # tiny shapes for tests: GQA, MQA, head_dim 64 and 128 (also != hidden/heads), odd vocabularies, every
    # architecture, biases, q/k norms, tied and untied heads, Llama 3 rope scaling
    "llama-tiny": _config("LlamaForCausalLM", vocab_size=1031, hidden_size=128, intermediate_size=320,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          rms_norm_eps=1e-5, mlp_bias=False),
    "llama3-tiny": _config("LlamaForCausalLM", vocab_size=1031, hidden_size=256, intermediate_size=384,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                           rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, mlp_bias=False,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral-tiny": _config("MistralForCausalLM", vocab_size=1024, hidden_size=256, intermediate_size=512,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                            sliding_window=None, rms_norm_eps=1e-5),
    "qwen2-tiny": _config("Qwen2ForCausalLM", vocab_size=1031, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=True, attention_bias=True, use_sliding_window=False,
                          sliding_window=None, rope_theta=1000000.0),
    "qwen3-tiny": _config("Qwen3ForCausalLM", vocab_size=1031, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                          tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
                          sliding_window=None),
    # real shapes (the Hugging Face configs of Qwen/Qwen3-0.6B, meta-llama/Llama-3.2-1B, meta-llama/Meta-Llama-3-8B)
    "qwen3-0.6b": _config("Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                          num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=40960,
                          use_sliding_window=False, sliding_window=None, max_window_layers=28,
                          torch_dtype="bfloat16"),
    "llama-3.2-1b": _config("LlamaForCausalLM", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                            tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5, mlp_bias=False,
                            max_position_embeddings=131072, rope_scaling=_LLAMA3_ROPE, torch_dtype="bfloat16"),
    "llama-3-8b": _config("LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, mlp_bias=False,
                          torch_dtype="bfloat16"),
}

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# The tokenizer's training text: a few KB of English, code and other scripts. Changing it changes the tokenizer
# (not the weights): token ids in tests that come from encode() would move.
CORPUS = r"""The quick brown fox jumps over the lazy dog. A paged key-value cache stores each sequence in fixed-size
blocks, like pages of virtual memory, so memory is allocated on demand and almost nothing is wasted.
Large language models generate text one token at a time; each step reads every weight and the whole cache.
The capital of France is Paris. The capital of Germany is Berlin. Water boils at one hundred degrees Celsius.
Once upon a time, in a small village by the sea, there lived an old fisherman and his curious granddaughter.
Every morning they walked down to the harbour, mended the nets, and talked about the weather, the tides and
the strange lights that sometimes danced above the water at night. "Where do they come from?" she asked.
"Nobody knows," he answered, smiling. "But the sea keeps many secrets, and it rewards those who are patient."
Scientists measure temperature, pressure and humidity to predict tomorrow's weather; their models divide the
atmosphere into millions of cells and solve the equations of fluid dynamics step by step on supercomputers.
A good engineer writes small functions, tests them carefully, reads the error messages, and asks for review.
Questions and answers: What is the speed of light? About 299,792 kilometres per second. Who wrote Hamlet?
William Shakespeare. How many continents are there? Seven: Africa, Antarctica, Asia, Australia, Europe,
North America and South America. Which planet is the largest? Jupiter, a gas giant with dozens of moons.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March, April, May, June,
July, August, September, October, November, December. Spring, summer, autumn and winter follow each other.
Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow after a summer storm.
Please summarize the following document in three sentences, then list the key points as bullet items.
Translate into French: "The cat is sleeping on the warm windowsill." Le chat dort sur le rebord chaud.
The scheduler admits waiting requests while free blocks remain, preempts the youngest when memory runs out,
and mixes prefill chunks with decode steps so that the GPU stays busy and latency stays low for everyone.

```python
import json
from dataclasses import dataclass, field


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    stop: list[str] = field(default_factory=list)


def forward(self, x):
    hidden = self.embed(x)
    for layer in self.layers:
        hidden = layer(hidden)
    return self.norm(hidden) @ self.lm_head


def softmax(logits, axis=-1):
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.free = list(range(num_blocks))
        self.block_size = block_size

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"out of blocks: need {n}, have {len(self.free)}")
        return [self.free.pop() for _ in range(n)]


if __name__ == "__main__":
    with open("config.json") as f:
        config = json.load(f)
    print(config["hidden_size"], config.get("num_key_value_heads", 8))
```

```c
#include <stdio.h>
#include <stdlib.h>

static float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
    return sum;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1024;
    float *x = malloc(n * sizeof(float));
    if (!x) { fprintf(stderr, "allocation failed\n"); return 1; }
    printf("%f\n", dot(x, x, n));
    free(x);
    return 0;
}
```

```javascript
const response = await fetch("/v1/chat/completions", {
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify({ model: "tiny", messages: [{ role: "user", content: "Hello!" }], stream: true }),
});
```

{"id": "cmpl-42", "object": "text_completion", "choices": [{"index": 0, "text": "Hello", "finish_reason": "stop"}],
 "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
SELECT name, COUNT(*) AS total FROM users WHERE created_at > '2024-01-01' GROUP BY name ORDER BY total DESC;
$ pip install --upgrade numpy && python -m pytest -q tests/ --maxfail=1
# Heading
- item one
- item two with **bold** and _italic_ text and a [link](https://example.com/docs?page=2#section)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 32 42 64 100 128 256 512 1000 1024 2048 4096 65536 3.14159 2.71828 -1 1e-5 0.5.
Unicode: café naïve Zürich façade résumé jalapeño — “quotes” ‘single’ … « guillemets » ½ ° € £ ¥ © ™
Ελληνικά: Καλημέρα κόσμε. Русский: Привет, мир! Как дела? 日本語: こんにちは世界。中文：你好，世界。
한국어: 안녕하세요 세계. العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया. ไทย: สวัสดีชาวโลก
Emoji: 😀 🚀 🔥 👍 🎉 ❤️ ✨ 🤖 🌍 🍕 🐍 📚
"""


def _specials(config: dict) -> list[str]:
    return QWEN_SPECIALS if config["model_type"].startswith("qwen") else LLAMA_SPECIALS


def make_tokenizer(config: dict):
    """A byte-level BPE tokenizer trained on CORPUS, with the family's special tokens first.

    Its vocabulary (special tokens included) is the model's vocab_size when the corpus allows it, else as many
    tokens as the corpus yields (about 1800).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = _specials(config)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(config["vocab_size"], _MAX_TOKENIZER_VOCAB),
                                  special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    if specials is LLAMA_SPECIALS:  # Llama 3 prepends <|begin_of_text|>
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint under its Hugging Face name."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
        if config.get("attention_bias") or config["model_type"] == "qwen2":  # Qwen2 always has q/k/v biases
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if config["model_type"] == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even, as ml_dtypes and torch do (no NaNs here)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = u >> np.uint32(16)  # in place from here on: (u + 0x7FFF + lowest kept bit) >> 16
    r &= np.uint32(1)
    r += np.uint32(0x7FFF)
    r += u
    r >>= np.uint32(16)
    return r.astype(np.uint16)


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the little-endian array whose bytes the checkpoint stores."""
    if dtype == "bfloat16":
        return _bfloat16_bits(x)
    return np.ascontiguousarray(x, dtype=np.dtype(dtype).newbyteorder("<"))


def _draw(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """The float32 values of one tensor, in row chunks (the same numbers as drawing it whole)."""
    if name.endswith("norm.weight"):
        yield 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        return
    if name.endswith(".bias"):
        yield 0.1 * rng.standard_normal(shape, dtype=np.float32)
        return
    rows, cols = shape
    scale = np.float32(np.sqrt(cols))  # 1/sqrt(fan_in); embeddings too (see the module docstring)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        chunk = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        chunk /= scale
        yield chunk


# FP8 checkpoints (`quantization`): the linear layers' weights as F8_E4M3 codes with float32 scales, in the
# layouts cupaged reads (cupaged/checkpoint.py): "fp8" is Hugging Face / vLLM's (quant_method fp8, one scale per
# tensor, a static input_scale that cupaged ignores), "compressed-tensors" llm-compressor's FP8 (one scale per
# output channel, [out, 1]). Embeddings, norms and the LM head stay in `dtype`.
QUANTIZATIONS: dict[str, dict] = {
    "fp8": {"quant_method": "fp8", "activation_scheme": "static"},
    "compressed-tensors": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True}}}},
}
_LINEAR_SUFFIXES = ("_proj.weight",)


def _quantized(name: str, quantization: str | None) -> bool:
    return quantization is not None and name.startswith("model.layers.") and name.endswith(_LINEAR_SUFFIXES)


def _layout(name: str, shape: tuple[int, ...], dtype: str, quantization: str | None) -> list[tuple[str, list, str]]:
    """(name, shape, safetensors dtype) of the tensors that store weight `name`: itself, or FP8 codes and scales."""
    if not _quantized(name, quantization):
        return [(name, list(shape), DTYPES[dtype][0])]
    base = name[:-len("weight")]
    if quantization == "fp8":
        return [(name, list(shape), "F8_E4M3"), (base + "weight_scale", [], "F32"), (base + "input_scale", [], "F32")]
    return [(name, list(shape), "F8_E4M3"), (base + "weight_scale", [shape[0], 1], "F32")]


def _fp8_arrays(x: np.ndarray, quantization: str) -> list[np.ndarray]:
    """The codes and scales (and input scale) of a float32 weight, as _layout lists them."""
    from cupaged.layers.fp8_linear import quantize_rows

    if quantization == "fp8":  # one scale for the tensor
        codes, scale = quantize_rows(x.reshape(1, -1))
        return [codes.reshape(x.shape), scale.reshape(()), np.float32(1.0)]
    codes, scales = quantize_rows(x)
    return [codes, scales.reshape(-1, 1)]


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str,
                       rng: np.random.Generator, quantization: str | None = None) -> int:
    """Write one safetensors file, drawing each tensor as it goes; returns the bytes of tensor data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}
    for name, shape in tensors:
        for stored, stored_shape, tag in _layout(name, shape, dtype, quantization):
            nbytes = math.prod(stored_shape) * sizes[tag]
            header[stored] = {"dtype": tag, "shape": stored_shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            if _quantized(name, quantization):  # the scales need the whole tensor (drawn as the same numbers)
                for arr in _fp8_arrays(np.concatenate(list(_draw(rng, name, shape))), quantization):
                    f.write(np.ascontiguousarray(arr).tobytes())
                continue
            for chunk in _draw(rng, name, shape):
                f.write(memoryview(_encode(chunk, dtype)).cast("B"))
        if f.tell() != 8 + len(raw) + offset:
            raise AssertionError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(raw) + offset}")
    return offset


def make_checkpoint(out_dir: str | Path, preset: str, dtype: str = "float32", seed: int = 0,
                    shard_bytes: int | None = None, weights: bool = True, quantization: str | None = None,
                    **config_overrides: object) -> Path:
    """Write a checkpoint directory for `preset` (a key of PRESETS) and return its path.

    `dtype` is float32, float16 or bfloat16; `shard_bytes` splits the weights into files of at most about that
    size (a tensor is never split); `config_overrides` replace config.json entries (max_position_embeddings=4096,
    num_hidden_layers=4, ...). Stale model*.safetensors files in `out_dir` are removed first. Without `weights`
    only the config and tokenizer files are written (for `LLMEngine(..., load_format="dummy")`). `quantization`
    (a key of QUANTIZATIONS) stores the linear layers in FP8, the same draws quantized.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(PRESETS[preset])
    config.update(copy.deepcopy(config_overrides))
    config["torch_dtype"] = dtype
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
        config["quantization_config"] = copy.deepcopy(QUANTIZATIONS[quantization])

    tokenizer = make_tokenizer(config)
    specials = _specials(config)
    llama = specials is LLAMA_SPECIALS
    bos_token = specials[0] if llama else None
    eos_token = "<|eot_id|>" if llama else "<|im_end|>"
    # the end-of-turn token and the end-of-text token, as the real checkpoints list them
    eos_ids = sorted({tokenizer.token_to_id(eos_token), tokenizer.token_to_id(specials[1] if llama else specials[0])})
    config.update(bos_token_id=tokenizer.token_to_id(bos_token) if bos_token else None,
                  eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids)
    if tokenizer.get_vocab_size() > config["vocab_size"]:
        raise AssertionError("tokenizer larger than the model's vocabulary")

    def write_json(name: str, obj: dict) -> None:
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
        logger.info("wrote %s", out / name)

    write_json("config.json", config)
    tokenizer.save(str(out / "tokenizer.json"))
    logger.info("wrote %s (%d tokens, model vocab %d)", out / "tokenizer.json", tokenizer.get_vocab_size(),
                config["vocab_size"])
    write_json("tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": eos_token,
        "pad_token": eos_token, "model_max_length": config["max_position_embeddings"],
        "chat_template": LLAMA3_CHAT if llama else CHATML, "clean_up_tokenization_spaces": False})
    write_json("special_tokens_map.json", {"bos_token": bos_token, "eos_token": eos_token, "pad_token": eos_token})
    write_json("generation_config.json", {"bos_token_id": config["bos_token_id"],
                                          "eos_token_id": config["eos_token_id"]})

    # shards: consecutive runs of the sorted tensors, each at most shard_bytes (unless one tensor is larger)
    size = DTYPES[dtype][1]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in sorted(tensor_shapes(config).items()):
        nbytes = math.prod(shape) * size
        if shard_bytes and used and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    if not weights:
        return out
    rng = np.random.default_rng(seed)  # drawn tensor by tensor in sorted name order, across the shards
    total = 0
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        nbytes = _write_safetensors(out / name, shard, dtype, rng, quantization)
        total += nbytes
        weight_map.update(dict.fromkeys((stored for n, shape in shard
                                         for stored, _, _ in _layout(n, shape, dtype, quantization)), name))
        logger.info("wrote %s (%d tensors, %.1f MB)", out / name, len(shard), nbytes / 1e6)
    if len(shards) > 1:
        write_json("model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    logger.info("%s checkpoint (%s, seed %d, %.1f M parameters) in %s, %.1f s", preset, dtype, seed,
                total / size / 1e6, out, time.perf_counter() - start)
    return out


def weights_digest(checkpoint_dir: str | Path) -> str:
    """sha256 over every tensor (sorted names; name, dtype, shape and raw bytes): independent of sharding and of
    the order and layout of the files."""
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {checkpoint_dir}")
    tensors: dict[str, tuple[Path, int, dict]] = {}
    for path in files:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        header.pop("__metadata__", None)
        for name, info in header.items():
            if name in tensors:
                raise ValueError(f"tensor {name} is in both {tensors[name][0]} and {path}")
            tensors[name] = (path, 8 + header_len, info)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        path, data_start, info = tensors[name]
        digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
        begin, end = info["data_offsets"]
        with open(path, "rb") as fh:
            fh.seek(data_start + begin)
            remaining = end - begin
            while remaining:
                block = fh.read(min(remaining, 1 << 24))
                if not block:
                    raise ValueError(f"{path}: truncated in tensor {name}")
                digest.update(block)
                remaining -= len(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_checkpoint",
                                     description="Write a random-weight Hugging Face checkpoint directory.")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--out", help="output directory (created if needed)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--shard-bytes", type=int, default=None,
                        help="split the weights into shards of about this size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a config.json entry, e.g. --set max_position_embeddings=4096 (repeatable)")
    parser.add_argument("--quantization", choices=list(QUANTIZATIONS), default=None,
                        help="store the linear layers in FP8 (Hugging Face's fp8 or compressed-tensors' layout)")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, c in PRESETS.items():
            d = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
            print(f"{name:14s} {c['architectures'][0]:18s} layers {c['num_hidden_layers']:2d} "
                  f"hidden {c['hidden_size']:4d} heads {c['num_attention_heads']:2d}/{c['num_key_value_heads']} head_dim {d:3d} "
                  f"inter {c['intermediate_size']:5d} vocab {c['vocab_size']:6d} tied {c['tie_word_embeddings']}")
        return
    if not args.preset or not args.out:
        parser.error("--preset and --out are required")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=JSON")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = make_checkpoint(args.out, args.preset, dtype=args.dtype, seed=args.seed, shard_bytes=args.shard_bytes,
                           quantization=args.quantization, **overrides)
    logger.info("weights_digest %s", weights_digest(path))


if __name__ == "__main__":
    main()
