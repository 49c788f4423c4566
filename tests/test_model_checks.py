"""Models cupaged cannot run are refused at load, by name, instead of giving garbage or failing mid-step.

One test per failure of the issue: a `hidden_act: "gelu"` config, NaN and Inf weights (safetensors, bf16 bits and
GGUF), head_dim 95, a config.json that is a JSON list, wrong field types, and --max-model-len 0 / too large. Then
the other config fields that change the math (implemented or refused), weights the model would leave out, the
device check (`check_runnable`) and the messages about missing CUDA libraries, built on the CPU with faked
failures.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import load_model

from cupaged import device
from cupaged.checkpoint import CheckpointError, open_checkpoint
from cupaged.config import ConfigError, ModelConfig
from cupaged.layers import reference

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------- helpers
def copy_checkpoint(src: Path, dst: Path, **config_changes: object) -> Path:
    """A copy of checkpoint `src` with config.json entries replaced (None deletes one)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def poke(path: Path, tensor: str, index: int, value: float) -> None:
    """Overwrite flat element `index` of `tensor` in a safetensors file, in place, in the tensor's dtype."""
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_len))[tensor]
        bits = np.array([value], np.float32)
        raw = {"F32": lambda: bits.tobytes(), "F16": lambda: bits.astype(np.float16).tobytes(),
               "BF16": lambda: (bits.view(np.uint32) >> 16).astype(np.uint16).tobytes()}[info["dtype"]]()
        f.seek(8 + header_len + info["data_offsets"][0] + index * len(raw))
        f.write(raw)


LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def config_with(base: dict | None = None, **changes: object) -> dict:
    cfg = copy.deepcopy(base or LLAMA)
    cfg.update(changes)
    return cfg


# ------------------------------------------------------------------------------------- the failures
def test_gelu_activation_is_refused(checkpoints, tmp_path) -> None:
    path = copy_checkpoint(checkpoints("llama-tiny"), tmp_path / "gelu", hidden_act="gelu")
    with pytest.raises(ConfigError, match=r'hidden_act="gelu" is not supported.*silu'):
        open_checkpoint(path)


@pytest.mark.parametrize("value, what", [(float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "-Inf")])
def test_nonfinite_weights_are_refused_by_name(checkpoints, tmp_path, value: float, what: str) -> None:
    path = copy_checkpoint(checkpoints("llama-tiny"), tmp_path / "bad")
    poke(path / "model.safetensors", "model.layers.1.mlp.up_proj.weight", 123, value)
    with pytest.raises(CheckpointError, match=r"1 weight tensor hold NaN or Inf values: "
                                              r"model\.layers\.1\.mlp\.up_proj\.weight;"):
        load_model(path, "float32", reference, np)


def test_nan_in_bf16_checkpoint_is_refused(tmp_path) -> None:
    """bf16 bits are converted on the way (here to float32: no ml_dtypes needed); the NaN survives and is found."""
    from tools.make_checkpoint import make_checkpoint

    path = make_checkpoint(tmp_path / "bf16", "qwen2-tiny", dtype="bfloat16")
    poke(path / "model.safetensors", "model.embed_tokens.weight", 7, float("nan"))
    poke(path / "model.safetensors", "model.layers.0.self_attn.k_proj.bias", 0, float("inf"))
    with pytest.raises(CheckpointError, match=r"2 weight tensors hold NaN or Inf values: model\.embed_tokens\.weight, "
                                              r"model\.layers\.0\.self_attn\.k_proj\.bias"):
        load_model(path, "float32", reference, np)


def test_nan_in_gguf_is_refused(tmp_path) -> None:
    pytest.importorskip("gguf")
    import gguf
    from test_gguf import write_tiny

    path = tmp_path / "tiny.gguf"
    write_tiny(path, np.random.default_rng(0))  # float32 tensors
    offset = next(t.data_offset for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_down.weight")
    with open(path, "r+b") as f:
        f.seek(offset + 4 * 5)
        f.write(np.array([np.nan], np.float32).tobytes())
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(path, "float32", reference, np)


def test_float16_overflow_is_reported_with_a_hint(checkpoints, tmp_path) -> None:
    path = copy_checkpoint(checkpoints("llama-tiny"), tmp_path / "big")
    poke(path / "model.safetensors", "model.norm.weight", 0, 1e6)  # fine in float32, Inf in float16
    load_model(path, "float32", reference, np)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*float16 overflows to Inf"):
        load_model(path, "float16", reference, np)


def test_odd_head_dim_is_refused_at_load(checkpoints, tmp_path) -> None:
    path = copy_checkpoint(checkpoints("llama-tiny"), tmp_path / "hd95", head_dim=95)
    with pytest.raises(ConfigError, match=r"head_dim 95 is not supported.*even head_dim"):
        open_checkpoint(path)


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ('"LlamaForCausalLM"', "string"), ("null", "null"),
                                        ("3", "number")])
def test_config_json_that_is_not_an_object(checkpoints, tmp_path, text: str, kind: str) -> None:
    path = copy_checkpoint(checkpoints("llama-tiny"), tmp_path / "cfg")
    (path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"config\.json: expected a JSON object .* got a JSON {kind}"):
        open_checkpoint(path)


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", "1024", "a positive integer"),
    ("num_hidden_layers", 2.0, "a positive integer"),
    ("vocab_size", True, "a positive integer"),
    ("rms_norm_eps", "1e-5", "a number"),
    ("tie_word_embeddings", "false", "true or false"),
    ("eos_token_id", "2", "a token id"),
    ("max_position_embeddings", 0, "a positive integer"),
])
def test_wrong_types_name_the_field(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} must be {expected}.*, got {json.dumps(value)}"):
        ModelConfig.from_dict(config_with(**{key: value}))


def test_max_model_len_zero_is_refused() -> None:
    from cupaged.config import resolve_max_model_len

    config = ModelConfig.from_dict(LLAMA)
    for bad in (0, -5, 2.5, "2048", True):
        with pytest.raises(ConfigError, match="max_model_len must be a positive integer"):
            resolve_max_model_len(config, bad)


def test_max_model_len_larger_than_the_context_is_refused() -> None:
    from cupaged.config import resolve_max_model_len

    config = ModelConfig.from_dict(LLAMA)
    with pytest.raises(ConfigError, match=r"max_model_len 100000 is larger than the model's context of 4096 "
                                          r"tokens \(max_position_embeddings"):
        resolve_max_model_len(config, 100000)
    assert resolve_max_model_len(config, None) == 4096
    assert resolve_max_model_len(config, 4096) == 4096
    assert resolve_max_model_len(config, 17) == 17


# ---------------------------------------------------------------------- other fields that change the math
@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "gelu_pytorch_tanh"}, r'hidden_act="gelu_pytorch_tanh"'),
    ({"hidden_activation": "gelu"}, r'hidden_activation="gelu"'),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     r'rope_scaling\.rope_type="yarn".*supported: default, linear, dynamic, llama3'),
    ({"rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}}, r'"longrope"'),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}}, r'rope_parameters\.rope_type="yarn"'),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling\.factor must be a positive number"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}}, r"partial_rotary_factor=0\.25"),
    ({"mlp_bias": True}, r"mlp_bias=true"),
    ({"attention_bias": True}, r"attention_bias=true.*o_proj"),
    ({"attn_logit_softcapping": 50.0}, r"attn_logit_softcapping=50\.0"),
    ({"final_logit_softcapping": 30.0}, r"final_logit_softcapping=30\.0"),
    ({"query_pre_attn_scalar": 256}, r"query_pre_attn_scalar=256"),
    ({"logits_scaling": 8.0}, r"logits_scaling=8\.0"),
    ({"use_qk_norm": True}, r"use_qk_norm=true"),
    ({"num_local_experts": 8}, r"num_local_experts=8"),
    ({"norm_type": "layernorm"}, r'norm_type="layernorm"'),
    ({"rms_norm_eps": None, "layer_norm_eps": 1e-5}, r"layer_norm_eps.*RMSNorm"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, r'quantization_config \(quant_method "awq"\)'),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, r"weight_block_size"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, r'layer_types \["chunked_attention"\]'),
    ({"layer_types": ["full_attention"]}, r"layer_types must list one type per layer \(2\)"),
    ({"architectures": ["GemmaForCausalLM"]}, r"unsupported architecture"),
])
def test_unsupported_fields_are_refused_by_name(changes: dict, message: str) -> None:
    cfg = config_with(**changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(cfg)


@pytest.mark.parametrize("changes", [
    {"hidden_act": "swish"},
    {"mlp_bias": False, "attention_bias": False, "pretraining_tp": 1, "attention_dropout": 0.0},
    {"partial_rotary_factor": 1.0, "attn_logit_softcapping": None, "quantization_config": None},
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    {"layer_types": ["full_attention", "full_attention"], "sliding_window": 128},
    {"sliding_window": 128},  # Llama's attention has no sliding window (transformers ignores the field)
    {"architectures": ["MistralForCausalLM"], "attention_bias": True},  # Mistral's attention has no biases at all
])
def test_fields_that_change_nothing_or_are_implemented(changes: dict) -> None:
    config = ModelConfig.from_dict(config_with(**changes))
    assert config.max_position_embeddings == 4096 and config.sliding_window is None
    assert not config.qkv_bias


def test_dynamic_rope_is_the_default_rope_within_the_context() -> None:
    from cupaged.config import rope_inv_freq

    plain = ModelConfig.from_dict(LLAMA)
    dynamic = ModelConfig.from_dict(config_with(rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
    np.testing.assert_array_equal(rope_inv_freq(plain), rope_inv_freq(dynamic))
    assert plain.rope_theta == ModelConfig.from_dict(config_with(rope_parameters={"rope_theta": 10000.0})).rope_theta


@pytest.mark.parametrize("arch, changes, window", [
    ("MistralForCausalLM", {"sliding_window": 1024}, 1024),
    ("MistralForCausalLM", {"sliding_window": None}, None),
    ("MistralForCausalLM", {"sliding_window": 8192}, None),  # wider than the context: no effect
    ("Qwen2ForCausalLM", {"sliding_window": 1024, "use_sliding_window": False}, None),
    ("Qwen2ForCausalLM", {"sliding_window": 1024, "use_sliding_window": True, "max_window_layers": 2}, None),
    ("Qwen2ForCausalLM", {"sliding_window": 1024, "use_sliding_window": True, "max_window_layers": 1}, 1024),
    ("Qwen3ForCausalLM", {"sliding_window": 512, "layer_types": ["full_attention", "sliding_attention"]}, 512),
    ("LlamaForCausalLM", {"sliding_window": 512, "layer_types": ["sliding_attention"] * 2}, 512),
])
def test_sliding_window_caps_the_context(arch: str, changes: dict, window: int | None, caplog) -> None:
    """Sliding-window attention is run as full attention up to the window, which is exact there: the context is
    capped (with a warning) and resolve_max_model_len refuses more, naming the window."""
    from cupaged.config import resolve_max_model_len

    with caplog.at_level(logging.WARNING, logger="cupaged.config"):
        config = ModelConfig.from_dict(config_with(architectures=[arch], **changes))
    assert config.sliding_window == window
    assert config.max_position_embeddings == (window or 4096)
    assert ("sliding-window attention" in caplog.text) == (window is not None)
    if window:
        with pytest.raises(ConfigError, match=rf"larger than the model's context of {window} tokens \(its sliding "
                                              r"window"):
            resolve_max_model_len(config, 4096)


def test_real_configs_load() -> None:
    """The presets of tools/make_checkpoint.py (Hugging Face configs of Qwen3, Llama 3.2, Llama 3) and Mistral
    v0.1's, whose sliding window caps the context."""
    from tools.make_checkpoint import PRESETS

    for name, cfg in PRESETS.items():
        ModelConfig.from_dict(cfg, source=name)
    mistral = {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
               "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
               "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
               "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
               "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
               "vocab_size": 32000}
    assert ModelConfig.from_dict(mistral).max_position_embeddings == 4096


# --------------------------------------------------------------------------- weights the model would ignore
def test_unused_bias_in_checkpoint_is_refused(checkpoints, tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    path = copy_checkpoint(checkpoints("llama-tiny"), tmp_path / "obias")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.ones(128, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(32, np.float32)  # harmless, ignored
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.bias are not part"):
        load_model(path, "float32", reference, np)


def test_gguf_qkv_biases_without_o_bias_load_as_qkv_biases() -> None:
    pytest.importorskip("gguf")
    from cupaged.config import QKV_BIAS_ONLY_KEY
    from cupaged.gguf import GGUFError, _biases

    names = {f"blk.0.{n}.bias" for n in ("attn_q", "attn_k", "attn_v")}
    config = dict(LLAMA)
    _biases(config, "llama", dict.fromkeys(names), Path("x.gguf"))
    assert config["attention_bias"] and config[QKV_BIAS_ONLY_KEY]
    assert ModelConfig.from_dict(config).qkv_bias
    config = dict(LLAMA)
    _biases(config, "llama", dict.fromkeys(names | {"blk.0.attn_output.bias"}), Path("x.gguf"))
    with pytest.raises(ConfigError, match="attention_bias=true.*o_proj"):
        ModelConfig.from_dict(config)
    config = dict(LLAMA)
    _biases(config, "qwen2", dict.fromkeys({"blk.0.ffn_up.bias"}), Path("x.gguf"))
    with pytest.raises(ConfigError, match="mlp_bias=true"):
        ModelConfig.from_dict(config)
    with pytest.raises(GGUFError, match="attn_output.bias"):
        _biases(dict(LLAMA), "qwen2", {"blk.0.attn_output.bias": None}, Path("x.gguf"))


# ----------------------------------------------------------------------------------------- device checks
def test_check_runnable_on_cuda_needs_a_decode_kernel_head_dim(caplog) -> None:
    from cupaged.config import check_runnable, cuda_decode_head_dims

    assert cuda_decode_head_dims("bfloat16") == (8, 16, 32, 64, 128, 256)
    assert cuda_decode_head_dims(np.float32) == (4, 8, 16, 32, 64, 128)
    ok = ModelConfig.from_dict(config_with(head_dim=128))
    odd = ModelConfig.from_dict(config_with(head_dim=96))
    check_runnable(ok, "cuda", "bfloat16")
    check_runnable(odd, "cpu", "float32")
    with pytest.raises(ConfigError, match=r"head_dim 96 is not supported by the CUDA decode kernels in bfloat16 "
                                          r"\(head_dim 8, 16, 32, 64, 128, 256\).*--enforce-eager"):
        check_runnable(odd, "cuda", "bfloat16")
    with pytest.raises(ConfigError, match=r"head_dim 256 .* in float32"):
        check_runnable(ModelConfig.from_dict(config_with(head_dim=256)), "cuda", np.dtype(np.float32))
    with caplog.at_level(logging.WARNING, logger="cupaged.config"):
        check_runnable(odd, "cuda", "bfloat16", cuda_graphs=False)
    assert "slow reference math" in caplog.text


@pytest.mark.gpu
def test_check_runnable_agrees_with_the_kernels() -> None:
    from cupaged.config import cuda_decode_head_dims
    from cupaged.device import resolve_dtype
    from cupaged.layers import cuda_ops

    for name in ("float32", "float16", "bfloat16"):
        dtype = resolve_dtype(name)
        for head_dim in range(2, 520, 2):
            assert (head_dim in cuda_decode_head_dims(dtype)) == cuda_ops.decode_supported(dtype, head_dim, 16), \
                (name, head_dim)


# ------------------------------------------------------------------------- missing CUDA pieces, by name
@pytest.mark.parametrize("cupy_major, driver_major, expected", [
    (None, 12, 'pip install "cupaged[cuda12]"'),
    (None, 13, 'pip install "cupaged[cuda13]"'),
    (12, 13, 'pip install "cupaged[cuda12]"'),
    (13, None, 'pip install "cupaged[cuda13]"'),
    (13, 12, 'pip uninstall cupy-cuda13x && pip install "cupaged[cuda12]"'),
    (None, 11, "the NVIDIA driver supports CUDA 11 only"),
    (None, None, 'pip install "cupaged[cuda12]" or "cupaged[cuda13]", matching'),
])
def test_install_hint_matches_the_machine(monkeypatch, cupy_major, driver_major, expected: str) -> None:
    monkeypatch.setattr(device, "cupy_cuda_major", lambda: cupy_major)
    monkeypatch.setattr(device, "driver_cuda_major", lambda: driver_major)
    assert device.install_hint().startswith(expected)


def test_no_cuda_messages_name_the_missing_piece(monkeypatch) -> None:
    monkeypatch.setattr(device, "cupy_cuda_major", lambda: None)
    monkeypatch.setattr(device, "driver_cuda_major", lambda: 12)
    no_cupy = ModuleNotFoundError("No module named 'cupy'", name="cupy")
    assert device.no_cuda_message(no_cupy).startswith('CuPy is not installed: pip install "cupaged[cuda12]"')
    nvrtc = RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open shared object")
    message = device.no_cuda_message(nvrtc)
    assert message.startswith('libnvrtc.so.12 not found: pip install "cupaged[cuda12]"') and "[ctk]" in message
    assert "libcublasLt.so.12" in device.no_cuda_message(OSError("libcublasLt.so.12: cannot open shared object"))
    old = RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")
    assert device.no_cuda_message(old).startswith("the NVIDIA driver is too old")
    monkeypatch.setattr(device, "driver_cuda_major", lambda: None)
    assert device.no_cuda_message(RuntimeError("cudaErrorNoDevice")).startswith("no NVIDIA driver was found")
    # what --device cuda says
    monkeypatch.setattr(device, "cuda_usable", lambda: False)
    monkeypatch.setattr(device, "_cuda_error", no_cupy)
    with pytest.raises(RuntimeError, match=r"device 'cuda' was asked for but CuPy is not installed: pip install"):
        device.set_device("cuda")


class _FakeCupy(types.ModuleType):
    """Just enough of `cupy` to import cublas.py and reach kernels.py's compile call on a machine without it."""

    def __init__(self, raw_module_error: Exception | None = None):
        super().__init__("cupy")
        error = raw_module_error

        class CompileException(Exception):
            pass

        def raw_module(**kwargs: object) -> None:
            raise error

        self.RawModule = raw_module
        self.cuda = types.SimpleNamespace(compiler=types.SimpleNamespace(CompileException=CompileException))


def test_cublas_not_found_names_library_and_command(monkeypatch) -> None:
    import ctypes

    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy())
    monkeypatch.setitem(sys.modules, "cuda", None)  # no cuda-pathfinder: the loader's path only
    monkeypatch.setattr(device, "cupy_cuda_major", lambda: 12)
    monkeypatch.setattr(device, "driver_cuda_major", lambda: 12)

    def no_library(name: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    spec = importlib.util.spec_from_file_location("cublas_under_test", ROOT / "cupaged" / "layers" / "cublas.py")
    cublas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cublas)
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    with pytest.raises(RuntimeError, match=r'cuBLAS \(libcublas\.so\.12\) not found: pip install "cupaged\[cuda12\]"'):
        cublas.load_library()


def test_nvrtc_missing_and_headers_missing_are_explained(monkeypatch) -> None:
    from cupaged import kernels

    monkeypatch.setattr(device, "cupy_cuda_major", lambda: 13)
    monkeypatch.setattr(device, "driver_cuda_major", lambda: 13)
    monkeypatch.setattr(kernels, "include_options", lambda: ())
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy(RuntimeError("CuPy failed to load libnvrtc.so.13: OSError")))
    with pytest.raises(kernels.KernelCompileError, match=r'NVRTC \(libnvrtc\.so\.13\) not found: pip install '
                                                         r'"cupaged\[cuda13\]"'):
        kernels._module.__wrapped__("norm.cu", ("rms_norm<float, float>",), (), "90")
    log = 'norm.cu(3): catastrophic error: cannot open source file "cuda_fp16.h"'
    assert 'pip install "cupaged[cuda13]"' in kernels._missing_headers_hint(log)
    assert kernels._missing_headers_hint("error: expected a ;") == ""
