"""The transformer against Hugging Face transformers, and clear errors for bad checkpoints.

The reference logits in tests/fixtures/reference_logits/ come from transformers itself, on checkpoints that
tools/make_checkpoint.py makes deterministically. Regenerate them with `python -m tools.make_reference_logits`
(needs torch and transformers).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import FIXTURES, TINY_PRESETS, load_model, relative_error, teacher_forced_logits

from cupaged.checkpoint import CheckpointError, open_checkpoint, resolve_model_path
from cupaged.config import ConfigError, ModelConfig
from cupaged.layers import reference
from tools.make_checkpoint import make_checkpoint, weights_digest


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_logits_match_transformers(preset: str, checkpoints) -> None:
    fixture = np.load(FIXTURES / "reference_logits" / f"{preset}.npz")
    path = checkpoints(preset)
    assert weights_digest(path) == str(fixture["weights_digest"]), \
        "tools/make_checkpoint.py now makes different weights: run `python -m tools.make_reference_logits`"
    n = len([k for k in fixture.files if k.startswith("seq_")])
    sequences = [fixture[f"seq_{i}"] for i in range(n)]
    expected = [fixture[f"logits_{i}"] for i in range(n)]
    model = load_model(path, "float32", reference, np)
    # prompts of different lengths, continued by decode steps that cross block boundaries (block size 16)
    prompt_lens = [max(1, len(s) // 3) for s in sequences]
    actual = teacher_forced_logits(model, sequences, prompt_lens)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert relative_error(a, e) < 1e-4


def test_sharded_checkpoint_equals_single_file(checkpoints, tmp_path) -> None:
    single = checkpoints("qwen3-tiny")
    sharded = make_checkpoint(tmp_path / "sharded", "qwen3-tiny", shard_bytes=200_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = (load_model(p, "float32", reference, np) for p in (single, sharded))
    assert np.array_equal(a.layers[1].w_qkv.weight, b.layers[1].w_qkv.weight)
    assert np.array_equal(a.lm_head.weight, b.lm_head.weight)


def test_bfloat16_checkpoint_reads_like_float32(checkpoints, tmp_path) -> None:
    pytest.importorskip("ml_dtypes")
    f32 = load_model(checkpoints("llama-tiny"), "float32", reference, np)
    bf16 = load_model(make_checkpoint(tmp_path / "bf16", "llama-tiny", dtype="bfloat16"), "float32", reference, np)
    assert relative_error(bf16.layers[0].w_down.weight, f32.layers[0].w_down.weight) < 1e-2


def test_missing_config(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        open_checkpoint(tmp_path)


def test_missing_path_is_clear() -> None:
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_model_path("./does/not/exist")


def test_unknown_architecture_names_supported_ones() -> None:
    with pytest.raises(ConfigError, match="unsupported architecture.*GPT2LMHeadModel.*LlamaForCausalLM"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"]})


def test_unsupported_rope_scaling() -> None:
    cfg = json.loads(json.dumps(_tiny_config()))
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_dict(cfg)


def _tiny_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_names_tensor_and_file(checkpoints, tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    path = _copy(checkpoints("llama-tiny"), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing.*model.safetensors"):
        load_model(path, "float32", reference, np)


def test_wrong_shape_names_tensor_and_file(checkpoints, tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    path = _copy(checkpoints("llama-tiny"), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = np.ones(7, np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model\.norm\.weight has shape \(7,\)"):
        load_model(path, "float32", reference, np)


def test_truncated_file_is_reported(checkpoints, tmp_path) -> None:
    path = _copy(checkpoints("llama-tiny"), tmp_path / "ckpt")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path, "float32", reference, np)
