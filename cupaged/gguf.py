"""Reading GGUF files: the model config, float32 tensors under Hugging Face names, and the tokenizer.

A GGUF (llama.cpp's format) holds everything a checkpoint directory does, in one file: the config and the
tokenizer as key/value metadata under llama.cpp's names, and the tensors, often block-quantized. `load_gguf`
turns it into what the rest of cupaged reads from a Hugging Face directory:

- `config`: a config.json-style dict (`architectures`, `hidden_size`, ...; llama, qwen2 and qwen3 files);
- `tensors`: a mapping of Hugging Face names to tensors oriented as in Hugging Face checkpoints
  ([out_features, in_features]), each read from the file when asked for (GGUFTensors): float32, dequantized by
  cupaged.quant (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) or by the `gguf` package
  (whatever else `gguf.quants.dequantize` knows), or, for the GPU, the block formats with kernels kept as they
  are in the file (quant.QuantizedWeight). llama.cpp permutes the rows of Q and K of llama-architecture models
  for its interleaved rope; that permutation is undone here as transformers' GGUF loader undoes it;
- `tokenizer`: a `tokenizers.Tokenizer` rebuilt from the vocabulary, merges and token types. Byte-level BPE
  ("gpt2") splits text with the pre-tokenizer that `tokenizer.ggml.pre` names (as llama.cpp does);
  SentencePiece ("llama") vocabularies become a byte-fallback BPE with merges derived from the scores;
- `tokenizer_config`: chat template, BOS/EOS token strings, every end-of-generation id.

The `gguf` package is an optional extra (`pip install cupaged[gguf]`) imported only here, only when needed.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from cupaged import quant

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# GGUF architecture -> Hugging Face architecture
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# llama.cpp tensor name (inside blk.{i}.) -> Hugging Face name (inside model.layers.{i}.)
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# tensors that are not weights of the Hugging Face model: read into the config instead
_CONFIG_TENSORS = {"rope_freqs.weight"}

# token types of llama.cpp's vocabulary (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, as llama.cpp splits text for each (llama-vocab.cpp), written
# the way the models' own tokenizer.json files write them.
_GPT2_SPLIT = None  # ByteLevel's built-in GPT-2 regex
_DIGITS_THEN_GPT2 = "digits"  # each digit alone, then GPT-2's regex on the text between (StarCoder, SmolLM)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    **dict.fromkeys(["default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"], _GPT2_SPLIT),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
                    _DIGITS_THEN_GPT2),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "minimax-m2"], _GPT4O_SPLIT),
}


class GGUFError(ValueError):
    """A GGUF file is missing, malformed, or describes a model or format cupaged cannot load."""


@dataclass
class GGUFCheckpoint:
    config: dict[str, Any]
    tensors: "GGUFTensors"  # read from the file on access, one at a time
    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_config: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)  # every key but the vocabulary arrays


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf files needs the `gguf` package: pip install cupaged[gguf]") from None
    return gguf


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    """Config, float32 tensors under Hugging Face names, tokenizer and tokenizer config of a .gguf file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    gguf = _import_gguf()
    from cupaged.progress import progress

    # two steps of seconds each on a large vocabulary (the reader parses every token and merge), then the tensors
    with progress(f"reading {path.name} (metadata, tokenizer)", 2) as bar:
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # the reader raises ValueError, struct errors, IndexError... on corrupt files
            raise GGUFError(f"{path}: cannot be read as GGUF ({type(exc).__name__}: {exc})") from None
        metadata = {key: _field_value(f) for key, f in reader.fields.items()}
        bar.update()
        arch = metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{path}: unsupported architecture {arch!r} (general.architecture); cupaged reads GGUF "
                            f"files of {', '.join(ARCHITECTURES)}")
        tensor_info = {t.name: t for t in reader.tensors}
        config = _config(metadata, tensor_info, path, gguf)
        tokenizer, tokenizer_config = _tokenizer(metadata, path)  # before the (slow) tensors: fail fast
        bar.update()
    tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if tok_vocab > config["vocab_size"]:
        raise GGUFError(f"{path}: the tokenizer has {tok_vocab} tokens, the embedding only {config['vocab_size']}")
    tensors = GGUFTensors(path, reader, config, arch)
    small = {k: v for k, v in metadata.items() if not (isinstance(v, list) and len(v) > 64)}
    return GGUFCheckpoint(config, tensors, tokenizer, tokenizer_config, small)


# ----------------------------------------------------------------------------------------------------------
# metadata

def _field_value(f: Any) -> Any:
    """A reader field as a Python value (str, int, float, bool, or a list of them). Works on gguf >= 0.10."""
    from gguf import GGUFValueType

    types = list(f.types)
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        item = types[-1] if len(types) > 1 else None
        if item == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        if item == GGUFValueType.ARRAY or item is None:
            return [f.parts[i] for i in f.data]  # nested arrays: left raw (no key we read has them)
        if not len(f.data):
            return []
        values = np.concatenate([np.asarray(f.parts[i]).reshape(-1) for i in f.data])
        return [_scalar(v, item) for v in values]
    return _scalar(f.parts[f.data[0]], types[0])


def _scalar(raw: Any, kind: Any) -> Any:
    from gguf import GGUFValueType

    if kind == GGUFValueType.STRING:
        return bytes(raw).decode("utf-8", errors="replace")
    value = np.asarray(raw).reshape(-1)[0]
    if kind == GGUFValueType.BOOL:
        return bool(value)
    if kind == GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))  # the shortest decimal of the float32: 1e-05, not 9.99999974e-06
    if kind == GGUFValueType.FLOAT64:
        return float(value)
    return int(value)


def _config(md: dict[str, Any], tensor_info: dict[str, Any], path: Path, gguf: Any) -> dict[str, Any]:
    arch = md["general.architecture"]

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = md.get(f"{arch}.{name}", default)
        if value is None and required:
            raise GGUFError(f"{path}: metadata key {arch}.{name} is missing")
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv); cupaged needs them uniform
            if len(set(value)) != 1:
                raise GGUFError(f"{path}: {arch}.{name} differs between layers ({value[:8]}...); not supported")
            value = value[0]
        return value

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", 0) or hidden // heads)
    value_dim = key("attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise GGUFError(f"{path}: key and value head sizes differ ({head_dim} vs {value_dim}); not supported")
    rotary = key("rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise GGUFError(f"{path}: rope over {rotary} of {head_dim} head dimensions (partial rotary) is not supported")
    if "token_embd.weight" not in tensor_info:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    embd_rows = int(tensor_info["token_embd.weight"].shape[-1])  # ggml order: [hidden, vocab]
    theta = float(key("rope.freq_base", 10000.0))
    layers = int(key("block_count", required=True))
    tokens = md.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length", required=True)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": int(key("vocab_size", 0) or embd_rows or len(tokens or [])),
        "tie_word_embeddings": "output.weight" not in tensor_info,
    }
    if config["vocab_size"] != embd_rows:
        raise GGUFError(f"{path}: {arch}.vocab_size is {config['vocab_size']} but token_embd.weight has "
                        f"{embd_rows} rows")
    _biases(config, arch, tensor_info, path)
    if any(name.startswith("blk.0.ffn_gate_exps") or name.startswith("blk.0.ffn_gate_inp")
           for name in tensor_info):
        raise GGUFError(f"{path}: a mixture-of-experts model ({arch} with expert tensors); not supported")
    scaling = _rope_scaling(md, arch, tensor_info, theta, head_dim, path, gguf)
    if scaling:
        config["rope_scaling"] = scaling
    for name, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                     ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{name}" in md:
            config[hf] = int(md[f"tokenizer.ggml.{name}"])
    return config


def _biases(config: dict[str, Any], arch: str, tensor_info: dict[str, Any], path: Path) -> None:
    """Say in the config which projections have biases, so that none is loaded and then ignored.

    Qwen2 has q/k/v biases by architecture. On llama and qwen3 a Hugging Face config can only say
    attention_bias (q, k, v and o_proj biases): a file with q/k/v biases and no o_proj bias gets
    config.QKV_BIAS_ONLY_KEY, which ModelConfig reads as the q/k/v biases it implements. Biases that no
    config of the architecture has (o_proj on qwen2, the MLP's) become the config fields that say so, and
    ModelConfig refuses them by name."""
    from cupaged.config import QKV_BIAS_ONLY_KEY

    def has(name: str) -> bool:
        return f"blk.0.{name}.bias" in tensor_info

    if arch in ("llama", "qwen3") and any(has(n) for n in ("attn_q", "attn_k", "attn_v")):
        config["attention_bias"] = True
        if not has("attn_output"):
            config[QKV_BIAS_ONLY_KEY] = True
    elif has("attn_output"):
        raise GGUFError(f"{path}: blk.0.attn_output.bias: a bias on the attention output projection is not "
                        f"supported for {arch}")
    if any(has(n) for n in ("ffn_gate", "ffn_up", "ffn_down")):
        config["mlp_bias"] = True


def _rope_scaling(md: dict[str, Any], arch: str, tensor_info: dict[str, Any], theta: float, head_dim: int,
                  path: Path, gguf: Any) -> dict[str, Any] | None:
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor", md.get(f"{arch}.rope.scale_linear"))
    original = md.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in tensor_info:
        # Llama 3.1+ files carry the per-frequency divisors instead of the parameters they came from: find the
        # Llama 3 parameters that give exactly these divisors.
        t = tensor_info["rope_freqs.weight"]
        divisors = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
        return _llama3_scaling_from_divisors(divisors, theta, head_dim, path)
    if kind == "none" or not factor or (kind in (None, "linear") and float(factor) == 1.0):
        return None
    if kind in (None, "linear"):
        return {"rope_type": "linear", "factor": float(factor)}
    scaling: dict[str, Any] = {"rope_type": str(kind)}
    if factor:
        scaling["factor"] = float(factor)
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling  # e.g. yarn: ModelConfig says whether it is supported


def _llama3_scaling_from_divisors(divisors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if divisors.shape != inv_freq.shape:
        raise GGUFError(f"{path}: rope_freqs.weight has {divisors.size} values, expected {inv_freq.size}")
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0):
        return None
    wavelen = 2 * math.pi / inv_freq
    for original in (8192, 4096, 2048, 16384, 32768, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            low_wavelen, high_wavelen = original / low, original / high
            smooth = (original / wavelen - low) / (high - low)
            expected = np.where(wavelen < high_wavelen, 1.0,
                                np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
            if np.allclose(divisors, expected, rtol=1e-4, atol=1e-6):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": original}
    raise GGUFError(f"{path}: rope_freqs.weight holds rope divisors that match no Llama 3 scaling; not supported")


# ----------------------------------------------------------------------------------------------------------
# tensors

def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name (None when it has none)."""
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{int(m.group(1))}.{_LAYER_TENSORS[m.group(2)]}.{suffix}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a llama Q or K projection (weight [rows, in] or bias [rows]).

    convert_hf_to_gguf.py reorders each head's rows from the halves layout (HF's rotate_half) to interleaved
    pairs: `w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)`. This is its inverse, the same as
    transformers' `LlamaTensorProcessor._reverse_permute_weights` (n_head: query heads for Q, kv heads for K).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot unpermute a Q/K tensor of {rows} rows over {n_head} heads")
    dim = rows // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def dequantize_tensor(t: Any, path: Path | str = "?", raw: np.ndarray | None = None) -> np.ndarray:
    """A reader tensor as a float32 array in NumPy order (ggml's dims reversed): [out_features, in_features].

    `raw`: the tensor's bytes, already read (else the reader's memory-mapped view). The formats of cupaged.quant
    are dequantized there; any other (Q2_K, Q3_K, IQ*...) by the `gguf` package."""
    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    qtype = t.tensor_type
    name = getattr(qtype, "name", str(qtype))
    data = t.data if raw is None else raw
    try:
        if name in quant.FORMATS:
            return np.array(quant.dequantize(np.asarray(data).reshape(-1).view(np.uint8), name, shape),
                            dtype=np.float32)
        w = _import_gguf().quants.dequantize(data, qtype)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {t.name} has quantization type {name}, which the installed gguf package "
                        f"cannot dequantize (try upgrading it: pip install -U gguf)") from None
    except Exception as exc:
        raise GGUFError(f"{path}: tensor {t.name} ({name}) cannot be dequantized ({type(exc).__name__}: {exc})") \
            from None
    w = np.array(w, dtype=np.float32)  # an owned, writable copy: nothing keeps the file mapped
    if w.size != int(np.prod(shape)):
        raise GGUFError(f"{path}: tensor {t.name} dequantizes to {w.shape}, its header says {shape}")
    return w.reshape(shape)


class GGUFTensors(Mapping[str, np.ndarray]):
    """The weights of a GGUF file under Hugging Face names, read from the file one at a time when asked for.

    `tensors[name]` is a float32 array (dequantized); `load(name, keep_quantized=True)` gives a 2-D tensor of a
    block format with a CUDA kernel as a quant.QuantizedWeight instead: its bytes as they are in the file (one
    read of that tensor, an owned buffer), llama's Q/K rows un-permuted as whole rows of blocks. Nothing is
    cached, so a loader that uploads each tensor and drops it holds about one tensor in host memory at a time.
    """

    def __init__(self, path: Path, reader: Any, config: dict[str, Any], arch: str):
        self.path, self._config, self._arch = path, config, arch
        self._info: dict[str, Any] = {}
        for t in reader.tensors:
            if t.name in _CONFIG_TENSORS:
                continue
            name = hf_tensor_name(t.name)
            if name is None:
                raise GGUFError(f"{path}: tensor {t.name} has no Hugging Face counterpart that cupaged knows "
                                f"(an unsupported variant of {arch}?)")
            self._info[name] = t

    def __len__(self) -> int:
        return len(self._info)

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        """[out_features, in_features] (Hugging Face order), without reading the tensor."""
        return tuple(int(d) for d in reversed([int(x) for x in self._info[name].shape]))

    def format(self, name: str) -> str:
        """The tensor's GGUF type name (Q4_K, F32, ...)."""
        t = self._info[name]
        return getattr(t.tensor_type, "name", str(t.tensor_type))

    def nbytes(self, name: str) -> int:
        return int(self._info[name].n_bytes)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.load(name, keep_quantized=False)

    def load(self, name: str, keep_quantized: bool) -> np.ndarray | quant.QuantizedWeight:
        t = self._info[name]
        raw = np.fromfile(self.path, dtype=np.uint8, count=int(t.n_bytes), offset=int(t.data_offset))
        if raw.size != int(t.n_bytes):
            raise GGUFError(f"{self.path}: truncated: tensor {t.name} needs {int(t.n_bytes)} bytes at offset "
                            f"{int(t.data_offset)}")
        shape, fmt = self.shape(name), self.format(name)
        if keep_quantized and len(shape) == 2 and fmt in quant.KERNEL_FORMATS:
            w: Any = quant.QuantizedWeight(fmt, (shape[0], shape[1]), raw.reshape(shape[0], -1))
            if self._permuted(t.name):
                w.blocks = unpermute_qk(w.blocks, self._heads(t.name))
            return w
        w = dequantize_tensor(t, self.path, raw if fmt in quant.FORMATS else None)
        return unpermute_qk(w, self._heads(t.name)) if self._permuted(t.name) else w

    def _permuted(self, gguf_name: str) -> bool:
        return self._arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name)

    def _heads(self, gguf_name: str) -> int:
        return self._config["num_attention_heads" if ".attn_q." in gguf_name else "num_key_value_heads"]


# ----------------------------------------------------------------------------------------------------------
# tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _tokenizer(md: dict[str, Any], path: Path) -> tuple[Any, dict[str, Any]]:
    from tokenizers import AddedToken, decoders, processors

    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise GGUFError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = md.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":
        tok, special, user = _byte_level_bpe(md, tokens, types, path)
        add_bos_default = False
    elif kind == "llama":
        tok, special, user = _sentencepiece_bpe(md, tokens, types, path)
        add_bos_default = True
    else:
        raise GGUFError(f"{path}: tokenizer type {kind!r} (tokenizer.ggml.model) is not supported; "
                        f"cupaged rebuilds 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) tokenizers")
    if special:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def token(key: str) -> tuple[int | None, str | None]:
        i = md.get(f"tokenizer.ggml.{key}")
        return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

    bos_id, bos = token("bos_token_id")
    eos_id, eos = token("eos_token_id")
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        def template(seq: str, type_id: int) -> list[str]:
            return ([f"{bos}:{type_id}"] if add_bos else []) + [f"${seq}:{type_id}"] + \
                ([f"{eos}:{type_id}"] if add_eos else [])

        specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos and eos != bos else [])
        tok.post_processor = processors.TemplateProcessing(single=template("A", 0),
                                                           pair=template("A", 0) + template("B", 1),
                                                           special_tokens=specials)
    eos_ids = [i for i in (eos_id, token("eot_token_id")[0], token("eom_token_id")[0]) if i is not None]
    tokenizer_config: dict[str, Any] = {
        "chat_template": md.get("tokenizer.chat_template"),
        "bos_token": bos,
        "eos_token": eos,
        "eos_token_ids": sorted(set(eos_ids)),
        "unk_token": token("unknown_token_id")[1],
        "pad_token": token("padding_token_id")[1],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    if kind == "gpt2":
        tok.decoder = decoders.ByteLevel()
    return tok, tokenizer_config


def _byte_level_bpe(md: dict[str, Any], tokens: list[str], types: list[int],
                    path: Path) -> tuple[Any, list[str], list[str]]:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        # every real token is spelled in the byte alphabet; respell the odd one that is not (as transformers does)
        key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(key, i)
    merges = []
    for m in md.get("tokenizer.ggml.merges") or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise GGUFError(f"{path}: a byte-level BPE tokenizer without merges (tokenizer.ggml.merges)")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        logger.warning("%s: pre-tokenizer %r (tokenizer.ggml.pre) is not known to cupaged; splitting text with "
                       "GPT-2's regex, which may tokenize some text differently from llama.cpp", path, pre)
    split = PRE_TOKENIZER_SPLITS.get(pre, _GPT2_SPLIT)
    if split is _GPT2_SPLIT:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # control tokens (<|endoftext|>, <|im_start|>...) match whole, as special; a control token spelled outside the
    # byte alphabet is a llama.cpp mislabel and is left alone (as transformers does)
    special = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL and set(t) <= alphabet]
    user = [t for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED and t in vocab]
    return tok, special, user


def _sentencepiece_bpe(md: dict[str, Any], tokens: list[str], types: list[int],
                       path: Path) -> tuple[Any, list[str], list[str]]:
    """A SentencePiece BPE vocabulary as `tokenizers` models it (as transformers' LlamaTokenizer builds it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = md.get("tokenizer.ggml.scores")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if md.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    else:
        if scores is None or len(scores) != len(tokens):
            raise GGUFError(f"{path}: a SentencePiece vocabulary without scores (tokenizer.ggml.scores)")
        merges = _merges_from_scores(vocab, {t: float(s) for t, s in zip(tokens, scores)},
                                     {t for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_BYTE,
                                                                                  TOKEN_UNKNOWN, TOKEN_UNUSED)})
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                               dropout=None))
    tok.normalizer = None
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                 prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    special = [t for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [t for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    return tok, special, user


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float], skip: set[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score first.

    Same order as transformers' `generate_merges`: by the merged token's score, then the pieces' lengths.
    """
    merges = []
    for merged, score in scores.items():
        if merged in skip:
            continue
        local = [(merged[:k], merged[k:], score) for k in range(1, len(merged))
                 if merged[:k] in vocab and merged[k:] in vocab and merged[:k] not in skip and merged[k:] not in skip]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
