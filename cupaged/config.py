"""Model configuration, read from a Hugging Face `config.json` of the Llama family.

Every field of a config.json that changes the model's math is either implemented or refused at load with a
ConfigError naming the field and its value: a model that would run as something else (another activation, rope
variant, bias, norm or attention pattern) gives plausible garbage, which is worse than an error. Fields that
change nothing (dropout, initializer_range, use_cache, pretraining_tp...) are ignored. `check_runnable` adds the
device's own constraints (the CUDA kernels' head sizes), and `resolve_max_model_len` checks a requested context
against the model's.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# architecture name -> (q/k/v projections have a bias, q/k heads have an RMSNorm)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
# transformers' LlamaAttention and Qwen3Attention give q, k, v *and o_proj* a bias when attention_bias is set;
# Mistral's attention has no biases whatever the config says; Qwen2's has q/k/v biases always, o_proj none.
_ATTENTION_BIAS_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")
# Set by gguf.py for a llama/qwen3 GGUF file whose q/k/v projections have biases and o_proj none (no Hugging Face
# config can say so): q/k/v biases, which the forward pass implements.
QKV_BIAS_ONLY_KEY = "_cupaged_qkv_bias_only"

# hidden_act values that are SiLU (transformers' ACT2FN maps "swish" to SiLU too); the MLP computes silu(gate) * up
SILU_ACTIVATIONS = ("silu", "swish")
# "dynamic" (dynamic NTK) is the default rope up to max_position_embeddings in transformers: its base only grows
# for longer sequences, and the context is capped at max_position_embeddings (resolve_max_model_len)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Fields of neighbouring architectures that change the math, refused unless absent or at a value that changes
# nothing: field -> (values that change nothing, what the field does).
_NO_OP_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "mlp_bias": ((None, False), "biases on the MLP projections"),
    "partial_rotary_factor": ((None, 1, 1.0), "rotary embedding over part of each head only"),
    "rope_interleave": ((None, False), "interleaved-pairs rotary (cupaged rotates halves, as transformers' Llama)"),
    "attn_logit_softcapping": ((None,), "tanh soft-capping of the attention scores (Gemma 2)"),
    "final_logit_softcapping": ((None,), "tanh soft-capping of the logits (Gemma 2)"),
    "query_pre_attn_scalar": ((None,), "an attention scale other than 1/sqrt(head_dim) (Gemma 2)"),
    "attention_multiplier": ((None,), "an attention scale other than 1/sqrt(head_dim) (Granite)"),
    "embedding_multiplier": ((None, 1, 1.0), "scaled embeddings (Granite)"),
    "residual_multiplier": ((None, 1, 1.0), "scaled residual branches (Granite)"),
    "logits_scaling": ((None, 1, 1.0), "scaled logits (Granite)"),
    "use_qk_norm": ((None, False), "RMSNorm on the query and key heads on an architecture without it"),
    "qk_layernorm": ((None, False), "LayerNorm on the query and key heads"),
    "attention_chunk_size": ((None,), "chunked attention (Llama 4)"),
    "num_experts": ((None, 0), "a mixture of experts"),
    "num_local_experts": ((None, 0), "a mixture of experts"),
    "n_routed_experts": ((None, 0), "a mixture of experts"),
    "norm_type": ((None, "rms_norm", "rmsnorm", "RMSNorm"), "a normalization other than RMSNorm"),
}

# decode attention on the GPU (cuda_ops.decode_supported): the CUDA-core kernel reads a K row with head_dim / vec
# lanes of one warp (vec = elements in 16 bytes), a power of two up to 32; the tensor-core kernel (64/128/256,
# fp16/bf16) covers a subset. Kept here so that the check runs without CuPy; tests/test_model_checks.py compares
# the two on a GPU.
_CUDA_DECODE_LANES = (1, 2, 4, 8, 16, 32)


class ConfigError(ValueError):
    """A checkpoint's configuration is missing, malformed or describes a model cupaged cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    # sliding-window attention of some layers: the context (max_position_embeddings) is capped at this window
    sliding_window: int | None = None
    # weights stored quantized in the checkpoint (its quantization_config): None or "fp8" (layers/fp8_linear.py)
    quantization: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: Any, source: str = "config") -> "ModelConfig":
        """The config of a config.json's contents; ConfigError naming the field for anything cupaged cannot run."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object of config fields, got a JSON "
                              f"{_json_type(cfg)}")
        archs = cfg.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        if not isinstance(archs, list):
            raise ConfigError(f"{source}: architectures must be a list of names, got {_json(archs)}")
        arch = next((a for a in archs if isinstance(a, str) and a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"cupaged supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        r = _Reader(cfg, source)
        _check_math_fields(cfg, arch, r)
        qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        if arch in _ATTENTION_BIAS_ARCHITECTURES and r.flag("attention_bias", False):
            if not cfg.get(QKV_BIAS_ONLY_KEY):
                raise ConfigError(f"{source}: attention_bias=true is not supported for {arch}: transformers then "
                                  "also adds a bias to o_proj, which cupaged does not implement (q/k/v biases "
                                  "alone, as Qwen2 has them, are)")
            qkv_bias = True
        hidden, heads = r.integer("hidden_size"), r.integer("num_attention_heads")
        head_dim = r.integer("head_dim", None) or hidden // heads
        rope = _rope_parameters(cfg, source)
        # rope_parameters' theta first (transformers 5), then the top-level field
        theta = _Reader(rope, f"{source}: rope_parameters").number("rope_theta", None) or \
            r.number("rope_theta", 10000.0)
        scaling = _rope_scaling(cfg, rope, source)
        config = cls(
            architecture=arch,
            vocab_size=r.integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=r.integer("intermediate_size"),
            num_layers=r.integer("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=r.integer("num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=r.number("rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_position_embeddings=r.integer("max_position_embeddings", 4096),
            tie_word_embeddings=r.flag("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            rope_scaling=scaling,
            bos_token_id=r.token_id("bos_token_id"),
            eos_token_ids=r.token_ids("eos_token_id"),
            torch_dtype=r.text("torch_dtype") or r.text("dtype"),
            quantization=_quantization(cfg, source),
            extra=cfg,
        )
        if config.num_heads % config.num_kv_heads:
            raise ConfigError(f"{source}: {config.num_heads} attention heads (num_attention_heads) not divisible "
                              f"by {config.num_kv_heads} key/value heads (num_key_value_heads)")
        if config.head_dim % 2 or config.head_dim <= 0:
            raise ConfigError(f"{source}: head_dim {config.head_dim} is not supported: the rotary embedding rotates "
                              "the two halves of each head, so cupaged needs a positive, even head_dim")
        # Sliding-window attention is not implemented: the context is capped at the window instead, where full
        # attention computes exactly what the sliding window does (every key is inside it). This keeps Mistral
        # v0.1 (window 4096) usable up to 4096 tokens rather than refusing it; resolve_max_model_len refuses a
        # longer context, naming the window.
        window = _sliding_window(cfg, arch, config.num_layers, r)
        if window is not None and window < config.max_position_embeddings:
            logger.warning("%s: sliding-window attention (%d) is not implemented; the context is capped at %d "
                           "tokens, where full attention is exact", source, window, window)
            config = replace(config, max_position_embeddings=window, sliding_window=window)
        rope_inv_freq(config)  # reject unsupported rope scaling now, not mid-forward
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(cfg, source=str(path))


def _json(value: Any) -> str:
    """A config value as config.json writes it (true, "gelu", [1, 2]), for messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (for messages about config.json)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list (array)", dict: "object"}.get(type(value), type(value).__name__)


_MISSING = object()


class _Reader:
    """Typed access to config fields: a wrong type is a ConfigError naming the field, not a traceback later
    (`"hidden_size": "1024"` would otherwise fail in a reshape, `"tie_word_embeddings": "false"` be true).
    A field that is absent or null takes the default; without a default it is a ConfigError."""

    def __init__(self, cfg: dict[str, Any], source: str):
        self.cfg, self.source = cfg, source

    def _get(self, key: str, default: Any) -> Any:
        value = self.cfg.get(key)
        if value is None:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: missing key {key!r}")
            return _MISSING
        return value

    def _bad(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key} must be {expected}, got {_json(value)} (a JSON {_json_type(value)})")

    def integer(self, key: str, default: Any = _MISSING) -> Any:
        """A positive integer (a JSON true is not one)."""
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise self._bad(key, value, "a positive integer")
        if value <= 0:
            raise ConfigError(f"{self.source}: {key} must be a positive integer, got {value}")
        return int(value)

    def number(self, key: str, default: Any = _MISSING) -> Any:
        """A positive finite number."""
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self._bad(key, value, "a number")
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{self.source}: {key} must be a positive number, got {value}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def text(self, key: str) -> str | None:
        value = self._get(key, None)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def token_id(self, key: str) -> int | None:
        value = self.cfg.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise self._bad(key, value, "a token id (an integer >= 0) or null")
        return int(value)

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self.cfg.get(key)
        values = value if isinstance(value, list) else [] if value is None else [value]
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 for v in values):
            raise self._bad(key, value, "a token id, a list of token ids, or null")
        return tuple(int(v) for v in values)


def _same(value: Any, no_op: Any) -> bool:
    """value == no_op, where true is not 1 and "1" is not 1 (JSON types kept apart)."""
    if value is None or no_op is None:
        return value is no_op
    return isinstance(value, bool) == isinstance(no_op, bool) and type(value) in (type(no_op), int, float) \
        and value == no_op


def _check_math_fields(cfg: dict[str, Any], arch: str, r: _Reader) -> None:
    """Refuse the fields whose value changes the model's math in a way cupaged does not implement."""
    source = r.source
    for key in ("hidden_act", "hidden_activation"):
        act = cfg.get(key)
        if act is not None and act not in SILU_ACTIVATIONS:
            raise ConfigError(f"{source}: {key}={_json(act)} is not supported: cupaged's MLP computes "
                              f"silu(gate_proj(x)) * up_proj(x) (supported: {', '.join(SILU_ACTIVATIONS)})")
    for key, (no_ops, what) in _NO_OP_ONLY.items():
        value = cfg.get(key)
        if key == "use_qk_norm" and SUPPORTED_ARCHITECTURES[arch][1]:
            continue  # Qwen3 normalises q and k anyway
        if not any(_same(value, v) for v in no_ops):
            raise ConfigError(f"{source}: {key}={_json(value)} is not supported ({what})")
    if "layer_norm_eps" in cfg and "rms_norm_eps" not in cfg:
        raise ConfigError(f"{source}: layer_norm_eps without rms_norm_eps: this config describes LayerNorm, "
                          "cupaged implements RMSNorm only")


def _quantization(cfg: dict[str, Any], source: str) -> str | None:
    """"fp8" for an FP8 checkpoint cupaged reads (Hugging Face / vLLM `quant_method: "fp8"` with per-tensor or
    per-channel weight scales; compressed-tensors with 8-bit float weights, per tensor or channel), None for an
    unquantized one; ConfigError naming the field for any other quantization. Input scales of static activation
    schemes are ignored: activations are always quantized per token with dynamic scales."""
    found = [(key, cfg[key]) for key in ("quantization_config", "compression_config") if cfg.get(key)]
    if not found:
        return None
    key, quant = found[0]
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    where = f"{source}: {key}"
    if method == "fp8":
        if quant.get("weight_block_size"):
            raise ConfigError(f"{where}: weight_block_size={_json(quant['weight_block_size'])}: block-wise FP8 "
                              "scales are not supported (per-tensor and per-channel scales are)")
        return "fp8"
    if method == "compressed-tensors":
        groups = quant.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise ConfigError(f"{where}: compressed-tensors without config_groups: nothing says how weights are "
                              "stored")
        for name, group in groups.items():
            w = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(w, dict) or w.get("num_bits") != 8 or w.get("type") != "float" or \
                    w.get("strategy") not in ("tensor", "channel"):
                raise ConfigError(f"{where}: config_groups.{name}.weights={_json(w)}: only 8-bit float weights "
                                  "with per-tensor or per-channel scales (FP8) are supported")
        if quant.get("kv_cache_scheme"):
            raise ConfigError(f"{where}: kv_cache_scheme is not supported (use kv_cache_dtype='fp8', whose "
                              "scales are computed per row at run time)")
        return "fp8"
    raise ConfigError(f"{where} (quant_method {_json(method)}): this quantization is not supported; cupaged "
                      "reads FP8 safetensors checkpoints (quant_method fp8 or compressed-tensors FP8), "
                      "unquantized ones and GGUF files")


def _rope_parameters(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """transformers 5 moved the rope settings into `rope_parameters`; older configs have them at top level."""
    rope = cfg.get("rope_parameters")
    if rope is None:
        return {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {_json(rope)}")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(f"{source}: rope_parameters per layer type ({', '.join(rope)}) are not supported")
    partial = rope.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: rope_parameters.partial_rotary_factor={_json(partial)} is not supported "
                          "(rotary embedding over part of each head only)")
    return dict(rope)


def _rope_scaling(cfg: dict[str, Any], rope: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The rope scaling dict (None for plain rope), its type and parameters checked."""
    scaling = cfg.get("rope_scaling")
    where = "rope_scaling"
    if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
        scaling, where = rope, "rope_parameters"
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: {where} must be an object or null, got {_json(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: {where}.rope_type={_json(kind)}: this rope scaling is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")

    def number(key: str, default: Any = None) -> float:
        value = scaling.get(key, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ConfigError(f"{source}: {where}.{key} must be a positive number for {kind!r} rope scaling, "
                              f"got {_json(value)}")
        return float(value)

    if kind in ("linear", "dynamic", "llama3"):
        number("factor")
    if kind == "llama3":
        number("original_max_position_embeddings")
        low, high = number("low_freq_factor", 1.0), number("high_freq_factor", 4.0)
        if high <= low:
            raise ConfigError(f"{source}: {where}: high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    return scaling if kind != "default" else None


def _sliding_window(cfg: dict[str, Any], arch: str, num_layers: int, r: _Reader) -> int | None:
    """The window of the layers that use sliding-window attention, None when every layer attends fully.

    As transformers decides it: `layer_types` when the config lists them; else Mistral slides in every layer when
    sliding_window is set; Qwen2/Qwen3 only with use_sliding_window, in layers from max_window_layers on; Llama's
    attention has no sliding window."""
    source = r.source
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ConfigError(f"{source}: layer_types must list one type per layer ({num_layers}), got "
                              f"{_json(layer_types)}")
        unknown = sorted({t for t in layer_types if t not in LAYER_TYPES}, key=str)
        if unknown:
            raise ConfigError(f"{source}: layer_types {_json(unknown)} are not supported (supported: "
                              f"{', '.join(LAYER_TYPES)})")
        slides = "sliding_attention" in layer_types
    elif arch == "MistralForCausalLM":
        slides = cfg.get("sliding_window") is not None
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        slides = r.flag("use_sliding_window", False) and r.integer("max_window_layers", 28) < num_layers
    else:
        slides = False
    # a sliding layer without a window attends fully (transformers: sliding_window None means no window)
    return r.integer("sliding_window", None) if slides else None


def check_runnable(config: ModelConfig, device: str, dtype: Any, *, cuda_graphs: bool = True) -> None:
    """Refuse, with ConfigError, a model that this device cannot run in this dtype: called by the engine once
    the device is chosen, so that a bad head size fails at load and not at the first decode step.

    On the CPU every config that ModelConfig accepts runs (NumPy reference ops). On the GPU the decode attention
    kernels cover head_dim = (16 // itemsize) * {1, 2, 4, 8, 16, 32} (8..256 for fp16/bf16, 4..128 for fp32);
    other head sizes fall back to the reference math op by op, which the eager path runs (slowly) but a CUDA graph
    cannot (it would freeze the host-side loop over the batch into the graph), so they are refused when
    `cuda_graphs` is set and warned about otherwise.
    """
    if device == "cpu":
        return
    if device != "cuda":
        raise ValueError(f"unknown device {device!r}: choose cpu or cuda")
    name, _ = _dtype_name_and_size(dtype)
    head_dims = cuda_decode_head_dims(dtype)
    if config.head_dim in head_dims:
        return
    supported = ", ".join(map(str, head_dims))
    if cuda_graphs:
        raise ConfigError(f"head_dim {config.head_dim} is not supported by the CUDA decode kernels in {name} "
                          f"(head_dim {supported}), which CUDA graphs need: run with --enforce-eager (slow "
                          "reference attention) or --device cpu")
    logger.warning("head_dim %d has no CUDA decode kernel in %s (head_dim %s): attention runs through the slow "
                   "reference math", config.head_dim, name, supported)


def cuda_decode_head_dims(dtype: Any) -> tuple[int, ...]:
    """The head sizes the CUDA decode attention kernels take for this dtype (see check_runnable)."""
    return tuple(16 // _dtype_name_and_size(dtype)[1] * lanes for lanes in _CUDA_DECODE_LANES)


def _dtype_name_and_size(dtype: Any) -> tuple[str, int]:
    """(name, item size) of a dtype or a dtype name, without needing ml_dtypes for "bfloat16"."""
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(dtype, dtype)
        sizes = {"float32": 4, "float16": 2, "bfloat16": 2}
        if name not in sizes:
            raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(sizes)}")
        return name, sizes[name]
    dt = np.dtype(dtype)
    return dt.name, dt.itemsize


def resolve_max_model_len(config: ModelConfig, requested: int | None) -> int:
    """The context length to serve: `requested` (--max-model-len) checked against the model's, or the model's.

    A value that cannot work is refused, not changed: 0 or less, not an integer, or longer than the model's
    context (max_position_embeddings, or the sliding window that caps it): positions past it were never trained
    and the rotary tables do not reach them.
    """
    limit = config.max_position_embeddings
    if requested is None:
        return limit
    if isinstance(requested, bool) or not isinstance(requested, numbers.Integral):
        raise ConfigError(f"max_model_len must be a positive integer, got {requested!r}")
    if requested <= 0:
        raise ConfigError(f"max_model_len must be a positive integer, got {requested}")
    if requested > limit:
        why = (f"its sliding window of {config.sliding_window} tokens (sliding_window), which cupaged runs as full "
               "attention up to the window" if config.sliding_window is not None
               else "max_position_embeddings in its config")
        raise ConfigError(f"max_model_len {requested} is larger than the model's context of {limit} tokens "
                          f"({why}); use --max-model-len {limit} or less")
    return int(requested)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, float64 [head_dim // 2], with Llama 3 or linear scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = config.rope_scaling
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("default", "dynamic"):  # dynamic: the default up to max_position_embeddings (see ROPE_TYPES)
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return np.where(middle, smoothed, out)
    raise ConfigError(f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


def rope_cos_sin(config: ModelConfig, max_positions: int) -> np.ndarray:
    """float32 [max_positions, head_dim]: cos of each frequency in the first half, sin in the second."""
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), rope_inv_freq(config))
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=1).astype(np.float32)
