"""Model configuration, read from a Hugging Face `config.json` of the Llama family."""

from __future__ import annotations

import json
import logging
import math
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
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"cupaged supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        if cfg.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            # transformers 5 moved rope settings into `rope_parameters`; older configs have them at top level
            rope = dict(cfg.get("rope_parameters") or {})
            theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            eos = cfg.get("eos_token_id")
            config = cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias or bool(cfg.get("attention_bias", False)),
                qk_norm=qk_norm,
                rope_scaling=scaling,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                extra=cfg,
            )
        except KeyError as exc:
            raise ConfigError(f"{source}: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed value: {exc}") from None
        if config.num_heads % config.num_kv_heads:
            raise ConfigError(f"{source}: {config.num_heads} attention heads not divisible by "
                              f"{config.num_kv_heads} key/value heads")
        window = cfg.get("sliding_window")
        if window and cfg.get("use_sliding_window", True) and window < config.max_position_embeddings:
            logger.warning("%s: sliding-window attention (%d) is not implemented; the context is capped at %d "
                           "tokens, where full attention is exact", source, window, window)
            config = replace(config, max_position_embeddings=int(window))
        rope_inv_freq(config)  # reject unsupported rope scaling now, not mid-forward
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(cfg, source=str(path))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, float64 [head_dim // 2], with Llama 3 or linear scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = config.rope_scaling
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
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
    raise ConfigError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


def rope_cos_sin(config: ModelConfig, max_positions: int) -> np.ndarray:
    """float32 [max_positions, head_dim]: cos of each frequency in the first half, sin in the second."""
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), rope_inv_freq(config))
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=1).astype(np.float32)
