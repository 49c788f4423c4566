"""Finding a checkpoint and reading its safetensors weights.

A model is named by a local directory, a local `.gguf` file, or a Hugging Face hub id resolved through
huggingface_hub (its cache, HF_HOME and HF_HUB_OFFLINE are respected). Safetensors files are parsed here
directly (an 8-byte header length, a JSON header, then raw little-endian data) and memory-mapped, so that
bf16 reads without torch and a truncated or mismatched file is reported with the tensor and file it concerns.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from types import ModuleType

from collections.abc import Iterator, Mapping
from typing import Any, Callable

import numpy as np

from cupaged.config import ModelConfig
from cupaged.device import array_module, resolve_dtype, to_numpy
from cupaged.layers.fp8_linear import LINEAR_SUFFIXES, Fp8Weight, QuantizeAtLoad, dequantize_rows
from cupaged.progress import progress
from cupaged.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# (expected name -> shape, dtype name, dequantize=True) -> host tensors; reading is deferred until the model's
# shapes are known. With dequantize=False a GGUF's block-quantized matrices come as quant.QuantizedWeight.
TensorSource = Callable[..., Mapping[str, Any]]

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


class CheckpointError(ValueError):
    """A checkpoint cannot be found or its weights do not match the model."""


def resolve_model_path(name: str | Path) -> Path:
    """A local directory or .gguf file for `name`, downloading a hub id into the hub cache if needed."""
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".gguf":
            return path
        raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
    if str(name).startswith((".", "/", "~")) or str(name).count("/") != 1:
        raise CheckpointError(f"{name}: no such directory or file, and not a hub id of the form 'org/model'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), allow_patterns=WEIGHT_PATTERNS))
    except Exception as exc:
        raise CheckpointError(
            f"{name}: could not get it from the Hugging Face hub or its cache ({type(exc).__name__}: {exc}). "
            "Pass a local checkpoint directory or .gguf file with --model."
        ) from None


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": "float8_e4m3",
}
# The tensors next to an FP8 weight: its scales (read), its static input scale (ignored: activations get dynamic
# per-token scales, layers/fp8_linear.py)
FP8_SCALE_SUFFIXES = (".weight_scale", ".input_scale")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped, zero-copy views of every tensor in one safetensors file (bf16 as raw uint16 bits)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {data_start + end}, "
                                  f"the file has {size}")
        view_dtype = np.uint16 if dtype == "bfloat16" else np.uint8 if dtype == "float8_e4m3" else dtype
        shape = tuple(info["shape"])
        if (end - begin) != int(np.prod(shape)) * np.dtype(view_dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {name}: {end - begin} bytes do not fit shape {shape}")
        arr = raw[data_start + begin:data_start + end].view(view_dtype).reshape(shape)
        tensors[name] = BF16Bits(arr) if dtype == "bfloat16" else E4M3Bits(arr) if dtype == "float8_e4m3" else arr
    return tensors


class BF16Bits(np.ndarray):
    """A uint16 array that holds bfloat16 bit patterns (NumPy has no bf16 of its own)."""

    def __new__(cls, bits: np.ndarray) -> "BF16Bits":
        return bits.view(cls)


class E4M3Bits(np.ndarray):
    """A uint8 array that holds float8 e4m3fn codes (safetensors' F8_E4M3; decoded by fp8.decode_e4m3)."""

    def __new__(cls, bits: np.ndarray) -> "E4M3Bits":
        return bits.view(cls)


def to_dtype(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert a host tensor (bf16 bits included) to `dtype`. A value out of the dtype's range becomes Inf
    silently here: FiniteCheck reports it, by tensor, when the model loads."""
    if isinstance(arr, E4M3Bits):
        from cupaged.fp8 import decode_e4m3

        arr = decode_e4m3(np.asarray(arr))
    elif isinstance(arr, BF16Bits):
        if dtype.name == "bfloat16":
            return np.asarray(arr).view(dtype)
        arr = (np.asarray(arr).astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore"):
        return np.asarray(arr).astype(dtype, copy=False)


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory: one file, or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    return files


def load_tensors(path: Path, expected: dict[str, tuple[int, ...]], dtype: str) -> dict[str, np.ndarray]:
    """Read the tensors named in `expected` (name -> shape) from a checkpoint directory, as host arrays of dtype.

    Names not in `expected` are ignored (e.g. rotary caches some checkpoints carry). A missing tensor or a
    shape mismatch raises CheckpointError naming the tensor and the file.
    """
    target = resolve_dtype(dtype)
    found: dict[str, tuple[np.ndarray, Path]] = {}
    files = safetensors_files(path)
    for file in files:
        for name, arr in read_safetensors(file).items():
            found[name] = (arr, file)
    _check_ignored([n for n in found if not _is_fp8_scale(n, found, expected)], expected, path)
    out = {}
    label = f"reading {files[0].name}" if len(files) == 1 else f"reading {len(files)} safetensors files"
    with progress(label, len(expected)) as bar:
        for name, shape in expected.items():
            if name not in found:
                raise CheckpointError(f"{path}: tensor {name} is missing from {', '.join(f.name for f in files)}")
            arr, file = found[name]
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"{file}: tensor {name} has shape {tuple(arr.shape)}, the config implies "
                                      f"{shape}")
            out[name] = _fp8_weight(name, arr, file, found, target) if isinstance(arr, E4M3Bits) else \
                to_dtype(arr, target)
            bar.update()
    return out


def _is_fp8_scale(name: str, found: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> bool:
    """Whether `name` is the scale of an expected FP8 weight (FP8_SCALE_SUFFIXES)."""
    for suffix in FP8_SCALE_SUFFIXES:
        if name.endswith(suffix):
            weight = name[:-len(suffix)] + ".weight"
            return weight in expected and isinstance(found.get(weight, (None,))[0], E4M3Bits)
    return False


def _fp8_weight(name: str, codes: np.ndarray, file: Path, found: dict[str, tuple[np.ndarray, Path]],
                target: np.dtype) -> Any:
    """An FP8 weight [out, in] and its `weight_scale` (per tensor: [] or [1]; per channel: [out] or [out, 1]) as
    fp8_linear.Fp8Weight with one float32 scale per output channel; a tensor that is not a linear layer's (an
    LM head stored in FP8) dequantized to `target`, as cupaged keeps those in the model dtype."""
    scale_name = name[:-len("weight")] + "weight_scale"
    if scale_name not in found:
        raise CheckpointError(f"{file}: FP8 tensor {name} has no {scale_name}")
    scale = to_dtype(found[scale_name][0], np.dtype(np.float32)).reshape(-1)
    rows = codes.shape[0]
    if scale.size not in (1, rows):
        raise CheckpointError(f"{found[scale_name][1]}: {scale_name} has {scale.size} values; an FP8 weight of "
                              f"{rows} rows needs 1 (per tensor) or {rows} (per channel)")
    weight = Fp8Weight(np.asarray(codes), np.ascontiguousarray(np.broadcast_to(scale, (rows,))))
    if name.endswith(LINEAR_SUFFIXES):
        return weight
    return to_dtype(dequantize_rows(weight.codes, weight.scales), target)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _check_ignored(names: Any, expected: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse a checkpoint with weights that the model would leave out although they change its math: a bias
    anywhere (o_proj's, the MLP's, the LM head's) or anything else inside a layer the model runs (an extra norm).
    They belong to an architecture variant the config did not announce. Rotary caches, layers past the model's
    (e.g. multi-token-prediction heads) and an lm_head next to tied embeddings are left out harmlessly."""
    layers = {m.group(0) for m in map(_LAYER.match, expected) if m}
    ignored = [n for n in names if n not in expected and "rotary_emb" not in n
               and (n.endswith(".bias") or ((m := _LAYER.match(n)) is not None and m.group(0) in layers))]
    if ignored:
        more = f" and {len(ignored) - 6} more" if len(ignored) > 6 else ""
        raise CheckpointError(f"{path}: tensors {', '.join(sorted(ignored)[:6])}{more} are not part of the "
                              "Llama-family model the config describes, and leaving them out would change its "
                              "output: an architecture variant cupaged does not implement")


def open_checkpoint(name: str | Path) -> tuple[ModelConfig, Tokenizer, TensorSource]:
    """Config, tokenizer and a loader of the weights for a checkpoint directory, hub id or .gguf file."""
    path = resolve_model_path(name)
    if path.suffix == ".gguf":
        from cupaged.gguf import load_gguf

        gguf = load_gguf(path)
        config = ModelConfig.from_dict(gguf.config, source=str(path))
        tc = gguf.tokenizer_config
        tokenizer = Tokenizer(gguf.tokenizer, tc.get("chat_template"), tc.get("bos_token"),
                              list(tc.get("eos_token_ids", [])) + list(config.eos_token_ids), tc.get("eos_token"))
        return config, tokenizer, lambda expected, dtype, dequantize=True: _gguf_weights(
            gguf.tensors, expected, dtype, path, keep_quantized=not dequantize)
    config = ModelConfig.from_file(path / "config.json")
    tokenizer = Tokenizer.from_dir(path, config.eos_token_ids)
    return config, tokenizer, lambda expected, dtype, dequantize=True: load_tensors(path, expected, dtype)


def dummy_weights(expected: dict[str, tuple[int, ...]], dtype: np.dtype, xp: ModuleType,
                  seed: int = 0) -> dict[str, Any]:
    """Random weights of the expected shapes, made on the device (vLLM's load_format="dummy"): for benchmarks of
    shapes that have no checkpoint at hand. The scales are tools/make_checkpoint.py's, which keep activations
    and logits O(1): matrices N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1)."""
    rng = xp.random.default_rng(seed)
    out = {}
    for name, shape in sorted(expected.items()):
        x = rng.standard_normal(shape, dtype=xp.float32)
        if len(shape) == 2:
            x *= shape[1] ** -0.5
        elif name.endswith("norm.weight"):
            x = 1 + 0.1 * x
        else:
            x *= 0.1
        out[name] = x.astype(dtype)
    return out


class LazyTensors(Mapping[str, Any]):
    """Tensors by name, each made by `load(name)` when it is asked for and not kept: a model that uploads them one
    by one holds about one tensor in host memory at a time."""

    def __init__(self, names: list[str], load: Callable[[str], Any]):
        self._names, self._load = list(names), load
        self._known = set(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __getitem__(self, name: str) -> Any:
        if name not in self._known:
            raise KeyError(name)
        return self._load(name)


def _gguf_weights(tensors: Any, expected: dict[str, tuple[int, ...]], dtype: str, path: Path,
                  keep_quantized: bool) -> LazyTensors:
    """The expected tensors of a GGUF file (gguf.GGUFTensors), checked by name and shape now, read and converted
    like load_tensors' when asked for; with `keep_quantized`, block-quantized matrices that have a CUDA kernel
    come as quant.QuantizedWeight (the others are dequantized, as on the CPU)."""
    from cupaged import quant

    target = resolve_dtype(dtype)
    _check_ignored(tensors, expected, path)
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        if tuple(tensors.shape(name)) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensors.shape(name))}, "
                                  f"the config implies {shape}")
    if keep_quantized:
        slow = sorted({tensors.format(n) for n in expected if len(expected[n]) == 2}
                      - set(quant.KERNEL_FORMATS) - {"F32", "F16", "BF16"})
        if slow:
            logger.info("%s: tensors of type %s have no quantized kernel: dequantized to %s at load", path,
                        ", ".join(slow), target.name)

    def load(name: str) -> Any:
        w = tensors.load(name, keep_quantized)
        return w if isinstance(w, quant.QuantizedWeight) else to_dtype(w, target)

    return LazyTensors(list(expected), load)


class FiniteCheck:
    """Weights checked for NaN and Inf as they load, so that a corrupt or badly converted checkpoint is refused
    by name instead of generating garbage (NaN logits sample token 0 forever).

    `add(name, array)` costs one reduction per tensor (in chunks of CHUNK elements, which bounds the temporary
    memory), on the array's own device; on the GPU the per-tensor flags stay there and `raise_if_any` reads
    them all at once: one host sync for the whole model, not one per tensor. bfloat16 is checked on its bits
    (exponent all ones), so neither NumPy nor CuPy needs a bfloat16 isfinite.
    """

    CHUNK = 1 << 24

    def __init__(self) -> None:
        self._names: list[str] = []
        self._flags: list[Any] = []  # one 0-d bool array per tensor, on the tensor's device
        self._dtypes: set[str] = set()

    def add(self, name: str, a: Any) -> None:
        """Queue tensor `a` (NumPy or CuPy) for the check."""
        if (a.dtype.kind != "f" and a.dtype.name != "bfloat16") or a.size == 0:
            return
        xp = array_module(a)
        flat = a.reshape(-1)
        if a.dtype.name == "bfloat16":
            bits = flat.view(xp.uint16)
            chunks = [((bits[i:i + self.CHUNK] & 0x7F80) == 0x7F80).any() for i in range(0, bits.size, self.CHUNK)]
        else:
            chunks = [xp.logical_not(xp.isfinite(flat[i:i + self.CHUNK]).all())
                      for i in range(0, flat.size, self.CHUNK)]
        flag = chunks[0]
        for c in chunks[1:]:
            flag = flag | c
        self._names.append(name)
        self._flags.append(flag)
        self._dtypes.add(a.dtype.name)

    def bad(self) -> list[str]:
        """Names of the tensors added so far that hold a NaN or an Inf (reads the flags: one sync per device)."""
        if not self._flags:
            return []
        found = np.zeros(len(self._flags), dtype=bool)
        by_module: dict[Any, list[int]] = {}
        for i, flag in enumerate(self._flags):
            by_module.setdefault(array_module(flag), []).append(i)
        for xp, rows in by_module.items():
            found[rows] = to_numpy(xp.stack([xp.asarray(self._flags[i]) for i in rows]))
        return [n for n, b in zip(self._names, found) if b]

    def raise_if_any(self) -> None:
        """CheckpointError naming the tensors that hold NaN or Inf, if any."""
        bad = self.bad()
        if not bad:
            return
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        hint = (" (float16 overflows to Inf past 65504: a checkpoint with larger weights needs --dtype bfloat16 or "
                "float32)" if "float16" in self._dtypes else "")
        raise CheckpointError(f"{len(bad)} weight tensor{'s' if len(bad) > 1 else ''} hold NaN or Inf values: "
                              f"{', '.join(bad[:8])}{more}; the checkpoint is corrupt or was converted wrongly"
                              f"{hint}")


def quantize_at_load(tensors: Mapping[str, Any]) -> Mapping[str, Any]:
    """For quantization="fp8": `tensors` with every linear layer's weight (LINEAR_SUFFIXES; not embeddings, norms,
    LM head) wrapped in fp8_linear.QuantizeAtLoad; read on access like `tensors`. Weights already in FP8 are left
    as they are."""
    def load(name: str) -> Any:
        w = tensors[name]
        if name.endswith(LINEAR_SUFFIXES) and not isinstance(w, Fp8Weight):
            return QuantizeAtLoad(w)
        return w

    return LazyTensors(list(tensors), load)
