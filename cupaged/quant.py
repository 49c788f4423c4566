"""GGUF block-quantized weights kept as they are in the file: their formats, NumPy dequantizers, and the types
the model holds them in.

A quantized matrix [rows, cols] (rows = output features, Hugging Face orientation) is stored row by row, each
row `cols / block_size` blocks of `type_size` bytes, exactly as llama.cpp writes it: `QuantizedWeight.blocks` is
that uint8 array [rows, bytes_per_row], on the host (a view of the memory-mapped file) or on the device.

The NumPy dequantizers here are the CPU path's and the CUDA kernels' reference (cuda/gguf_matmul.cu implements
the same formulas per 8-value chunk); the `gguf` package's own dequantizer is their oracle in the tests. They
follow ggml's block layouts (ggml-common.h) directly rather than calling the `gguf` package, so that the kernels'
reference is code we read and own, and the package stays an optional extra for reading files.

`QuantizedLinear` is what a fused projection (q|k|v, gate|up) becomes: its parts' output columns concatenated.
Neighbouring parts of one format are merged into one part (one kernel launch); a Q4_K_M file mixes formats
within a layer (Q6_K for some v_proj and down_proj), and parts of different formats stay separate products that
write disjoint column ranges of one output, which keeps every part's bytes as they are in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Array = Any
QK_K = 256


def _f16(raw: np.ndarray) -> np.ndarray:
    """float32 [n, 1] from 2 bytes per row of a uint8 [n, 2] array (little-endian fp16)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 2 * k] from packed bytes [n, k]: the low nibbles of all k bytes, then the high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 [n, count]: bit j of the little-endian bit string `packed` [n, count // 8]."""
    return np.unpackbits(packed, axis=1, bitorder="little")[:, :count]


def _q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * (_nibbles(b[:, 2:18]).astype(np.float32) - 8)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * _nibbles(b[:, 4:20]).astype(np.float32) + _f16(b[:, 2:4])


def _q5(b: np.ndarray, qh: int) -> np.ndarray:
    return (_nibbles(b[:, qh + 4:qh + 20]) | (_bits(b[:, qh:qh + 4], 32) << 4)).astype(np.float32)


def _q5_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * (_q5(b, 2) - 16)


def _q5_1(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * _q5(b, 4) + _f16(b[:, 2:4])


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * b[:, 2:34].view(np.int8).astype(np.float32)


def k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of each Q4_K/Q5_K super-block from its 12 packed bytes (ggml's
    get_scale_min_k4): sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7
    from the nibbles of bytes 8-11 with the top 2 bits from bytes 0-7."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_quant(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """value = d * scale[s] * q - dmin * min[s] over the 8 sub-blocks s of 32 values (Q4_K, Q5_K)."""
    sc, mn = k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = q.reshape(len(b), 8, 32).astype(np.float32)
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(len(b), QK_K)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 256]: the 4-bit parts of Q4_K/Q5_K: each 32 bytes hold two sub-blocks (low nibbles, then high)."""
    return np.concatenate([_nibbles(qs[:, 32 * i:32 * i + 32]) for i in range(4)], axis=1)


def _q4_k(b: np.ndarray) -> np.ndarray:
    return _k_quant(b, _k_low_nibbles(b[:, 16:144]))


def _q5_k(b: np.ndarray) -> np.ndarray:
    # value 32 s + i takes bit s of qh[i] as its fifth bit
    high = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(len(b), 32, 8).transpose(0, 2, 1)
    return _k_quant(b, _k_low_nibbles(b[:, 48:176]) | (high.reshape(len(b), QK_K) << 4))


def _q6_k(b: np.ndarray) -> np.ndarray:
    # value v = 128 h + r: low 4 bits from ql[64 h + r % 64] (nibble r // 64), high 2 bits from
    # qh[32 h + r % 32] (bits 2 (r // 32)); signed by -32, scaled by d * scales[v // 16]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    halves = []
    for h in range(2):
        low = _nibbles(ql[:, 64 * h:64 * h + 64])
        high = np.concatenate([(qh[:, 32 * h:32 * h + 32] >> (2 * k)) & 3 for k in range(4)], axis=1)
        halves.append(low | (high << 4))
    q = np.concatenate(halves, axis=1).astype(np.float32) - 32
    return (d * scales).repeat(16, axis=1) * q


def _plain(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    def dequantize(b: np.ndarray) -> np.ndarray:
        if dtype == "bfloat16":
            return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(b).view(dtype).astype(np.float32)
    return dequantize


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF tensor type: `block_size` values in `type_size` bytes, and its NumPy dequantizer
    (uint8 [n, type_size] -> float32 [n, block_size]). `kernel`: it has a CUDA kernel (cuda/gguf_matmul.cu).
    `scale_offsets`: byte offsets of the block's fp16 scales (d, and dmin or m), which alone can be NaN or Inf."""
    name: str
    block_size: int
    type_size: int
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]
    kernel: bool
    scale_offsets: tuple[int, ...] = ()


FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("Q4_0", 32, 18, _q4_0, True, (0,)),
    BlockFormat("Q4_1", 32, 20, _q4_1, True, (0, 2)),
    BlockFormat("Q5_0", 32, 22, _q5_0, True, (0,)),
    BlockFormat("Q5_1", 32, 24, _q5_1, True, (0, 2)),
    BlockFormat("Q8_0", 32, 34, _q8_0, True, (0,)),
    BlockFormat("Q4_K", QK_K, 144, _q4_k, True, (0, 2)),
    BlockFormat("Q5_K", QK_K, 176, _q5_k, True, (0, 2)),
    BlockFormat("Q6_K", QK_K, 210, _q6_k, True, (208,)),
    BlockFormat("F32", 1, 4, _plain("float32"), False),
    BlockFormat("F16", 1, 2, _plain("float16"), False),
    BlockFormat("BF16", 1, 2, _plain("bfloat16"), False),
)}
# the formats that stay quantized on the GPU; F16/BF16/F32 tensors become plain arrays of the engine's dtype
KERNEL_FORMATS = tuple(name for name, f in FORMATS.items() if f.kernel)


def block_format(name: str) -> BlockFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"GGUF tensor type {name!r} has no dequantizer in cupaged.quant (known: "
                         f"{', '.join(FORMATS)})") from None


def dequantize(raw: np.ndarray, format: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of `shape` from the bytes of a tensor of `format` (any shape of uint8 holding them)."""
    f = block_format(format)
    count = int(np.prod(shape))
    if count % f.block_size:
        raise ValueError(f"a {format} tensor of shape {shape}: {count} values are not whole blocks of "
                         f"{f.block_size}")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if blocks.size != count // f.block_size * f.type_size:
        raise ValueError(f"a {format} tensor of shape {shape} needs {count // f.block_size * f.type_size} bytes, "
                         f"got {blocks.size}")
    return f.dequantize_blocks(blocks.reshape(-1, f.type_size)).reshape(shape)


@dataclass
class QuantizedWeight:
    """A [rows, cols] matrix in a GGUF block format: `blocks` uint8 [rows, cols / block_size * type_size], as
    in the file (host or device array)."""
    format: str
    shape: tuple[int, int]
    blocks: Array

    def __post_init__(self) -> None:
        f = block_format(self.format)
        rows, cols = self.shape
        if not f.kernel:
            raise ValueError(f"QuantizedWeight: format {self.format} is a plain float type, not a block format")
        if cols % f.block_size:
            raise ValueError(f"QuantizedWeight: {cols} columns are not whole {self.format} blocks of "
                             f"{f.block_size}")
        expected = (rows, cols // f.block_size * f.type_size)
        if tuple(self.blocks.shape) != expected or self.blocks.dtype != np.uint8:
            raise ValueError(f"QuantizedWeight: blocks of a {self.format} {self.shape} matrix must be uint8 "
                             f"{expected}, got {self.blocks.dtype} {tuple(self.blocks.shape)}")

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes)

    def scales(self) -> Array:
        """The blocks' fp16 scales as a float16 array (a copy, on the blocks' device): what FiniteCheck reads."""
        from cupaged.device import array_module

        f, xp = FORMATS[self.format], array_module(self.blocks)
        flat = self.blocks.reshape(-1, f.type_size)
        return xp.concatenate([xp.ascontiguousarray(flat[:, o:o + 2]).view(xp.float16).reshape(-1)
                               for o in f.scale_offsets])

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols] on the host."""
        from cupaged.device import to_numpy

        return dequantize(to_numpy(self.blocks), self.format, self.shape)


@dataclass
class QuantizedLinear:
    """A projection whose weight is quantized: output columns = the parts' rows, concatenated in order."""
    parts: list[QuantizedWeight]

    @property
    def in_features(self) -> int:
        return self.parts[0].shape[1]

    @property
    def out_features(self) -> int:
        return sum(p.shape[0] for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @classmethod
    def fuse(cls, weights: list[QuantizedWeight], xp: Any) -> "QuantizedLinear":
        """Neighbours of one format merged into one part (their rows stacked), on the array module `xp`."""
        cols = {w.shape[1] for w in weights}
        if len(cols) != 1:
            raise ValueError(f"QuantizedLinear: parts with different input sizes {sorted(cols)}")
        runs: list[list[QuantizedWeight]] = []
        for w in weights:
            if runs and runs[-1][0].format == w.format:
                runs[-1].append(w)
            else:
                runs.append([w])
        parts = [QuantizedWeight(run[0].format, (sum(w.shape[0] for w in run), run[0].shape[1]),
                                 xp.concatenate([xp.asarray(w.blocks) for w in run]) if len(run) > 1
                                 else xp.asarray(run[0].blocks)) for run in runs]
        return cls(parts)
