"""Write a complete random-weight Hugging Face checkpoint of a Llama-family architecture.

    python -m tools.make_checkpoint --preset qwen3-0.6b --dtype bfloat16 --out /tmp/qwen3-0.6b

The directory holds config.json, model.safetensors (or shards with an index), tokenizer.json (a byte-level BPE
trained with `tokenizers` on a small built-in corpus), tokenizer_config.json with a chat template,
special_tokens_map.json and generation_config.json: everything transformers and cupaged need to load it.
Weights are deterministic for a given preset and seed (NumPy's PCG64, tensor by tensor in sorted name order),
scaled by 1/sqrt(fan_in) (embeddings too) so that activations and logits are O(1) and sampling has
room to vary, with norm weights away from 1 so a missing one is noticed.
Tiny presets are for tests; the real shapes (qwen3-0.6b, llama-3.2-1b, llama-3-8b) are for benchmarks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import click
import numpy as np

logger = logging.getLogger(__name__)

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
    # tiny shapes for tests: GQA, MQA, head_dim 64 and 128, odd vocabularies, every architecture
    "llama-tiny": _config("LlamaForCausalLM", vocab_size=1031, hidden_size=128, intermediate_size=320,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                          rms_norm_eps=1e-5),
    "llama3-tiny": _config("LlamaForCausalLM", vocab_size=1031, hidden_size=256, intermediate_size=384,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                           rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral-tiny": _config("MistralForCausalLM", vocab_size=1024, hidden_size=256, intermediate_size=512,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                            sliding_window=None, rms_norm_eps=1e-5),
    "qwen2-tiny": _config("Qwen2ForCausalLM", vocab_size=1031, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=True, attention_bias=True, use_sliding_window=False,
                          rope_theta=1000000.0),
    "qwen3-tiny": _config("Qwen3ForCausalLM", vocab_size=1031, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                          tie_word_embeddings=True, rope_theta=1000000.0),
    # real shapes, for benchmarks
    "qwen3-0.6b": _config("Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                          num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=40960,
                          torch_dtype="bfloat16"),
    "llama-3.2-1b": _config("LlamaForCausalLM", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                            tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                            max_position_embeddings=131072, rope_scaling=_LLAMA3_ROPE, torch_dtype="bfloat16"),
    "llama-3-8b": _config("LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
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

CORPUS = """\
The quick brown fox jumps over the lazy dog. A paged key-value cache stores each sequence in fixed-size
blocks, like pages of virtual memory, so memory is allocated on demand and almost nothing is wasted.
Large language models generate text one token at a time; each step reads every weight and the whole cache.
The capital of France is Paris. The capital of Germany is Berlin. Water boils at one hundred degrees.
def forward(self, x):
    hidden = self.embed(x)
    for layer in self.layers:
        hidden = layer(hidden)
    return self.norm(hidden) @ self.lm_head
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1024 3.14159 2.71828 -1 1e-5.
Unicode: café naïve Zürich façade — “quotes” ‘single’ … Ελληνικά Русский 日本語 中文 한국어 العربية
Emoji: 😀 🚀 🔥 👍 🎉 ❤️ ✨ 🤖
"""


def _specials(config: dict) -> list[str]:
    return QWEN_SPECIALS if config["model_type"].startswith("qwen") else LLAMA_SPECIALS


def make_tokenizer(config: dict):
    """A byte-level BPE tokenizer trained on CORPUS, with the family's special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = _specials(config)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    vocab = min(config["vocab_size"], 4096)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    if specials is LLAMA_SPECIALS:  # Llama 3 prepends <|begin_of_text|>
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
        if c.get("attention_bias"):
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if c["model_type"] == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def _random(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith(".bias"):
        return 0.1 * rng.standard_normal(shape, dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))


def _to_dtype(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return arr.astype(ml_dtypes.bfloat16)
    return arr.astype(dtype)


def make_checkpoint(out_dir: str | Path, preset: str, dtype: str = "float32", seed: int = 0,
                    shard_bytes: int | None = None, **config_overrides: object) -> Path:
    """Write a checkpoint directory for `preset` (a key of PRESETS) and return its path."""
    from safetensors.numpy import save_file

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(PRESETS[preset])
    config.update(config_overrides)
    config["torch_dtype"] = dtype
    tokenizer = make_tokenizer(config)
    specials = _specials(config)
    bos_token = specials[0] if specials is LLAMA_SPECIALS else None
    eos_token = "<|eot_id|>" if specials is LLAMA_SPECIALS else "<|im_end|>"
    eos_ids = sorted({tokenizer.token_to_id(eos_token), tokenizer.token_to_id(specials[1] if bos_token else specials[0])})
    config.update(bos_token_id=tokenizer.token_to_id(bos_token) if bos_token else None,
                  eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": eos_token,
        "pad_token": eos_token, "model_max_length": config["max_position_embeddings"],
        "chat_template": LLAMA3_CHAT if bos_token else CHATML, "clean_up_tokenization_spaces": False}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos_token, "eos_token": eos_token,
                                                             "pad_token": eos_token}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"],
                                                            "eos_token_id": config["eos_token_id"]}, indent=2))
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, shape in sorted(_shapes(config).items()):
        arr = _to_dtype(_random(rng, name, shape), dtype)
        if shard_bytes and size and size + arr.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(a.nbytes for s in shards for a in s.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    logger.info("wrote %s checkpoint (%s, seed %d) to %s", preset, dtype, seed, out)
    return out


def weights_digest(checkpoint_dir: str | Path) -> str:
    """sha256 of every tensor (sorted names, dtype, shape, bytes): independent of sharding and file layout."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                tensors[name] = (f, name)
    for name in sorted(tensors):
        with open(tensors[name][0], "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
            info = header[name]
            fh.seek(8 + header_len + info["data_offsets"][0])
            raw = fh.read(info["data_offsets"][1] - info["data_offsets"][0])
        digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
        digest.update(raw)
    return digest.hexdigest()


@click.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), required=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--shard-bytes", type=int, default=None, help="Split the weights into shards of about this size.")
def main(preset: str, out: str, dtype: str, seed: int, shard_bytes: int | None) -> None:
    """Write a random-weight Hugging Face checkpoint directory."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_checkpoint(out, preset, dtype=dtype, seed=seed, shard_bytes=shard_bytes)


if __name__ == "__main__":
    main()
