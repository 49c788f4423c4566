"""NumPy encoders for ggml's K-quants (Q4_K, Q5_K, Q6_K), which the `gguf` package can only decode.

    from tools.gguf_quants import quantize
    raw = quantize(w, "Q4_K")          # w: float32 [rows, cols], cols a multiple of 256 -> uint8 [rows, bytes]
    gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)   # ~ w

Byte layouts are ggml's (those `gguf.quants` decodes), per super-block of 256 values:

- Q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins of 8 sub-blocks of 32, then 128 bytes of
  4-bit q (sub-block 2j in the low nibbles of bytes 32j..32j+31, sub-block 2j+1 in the high ones).
  x = d * scale_j * q - dmin * min_j, q in 0..15.
- Q5_K (176 bytes): as Q4_K, with 32 bytes of fifth bits before the nibbles (bit j of byte l: value l of
  sub-block j). q in 0..31.
- Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales of sub-blocks of 16,
  fp16 d. x = d * scale_j * (q - 32), q in 0..63.

The encoding is simple and guaranteed rather than llama.cpp's searched one: each sub-block's grid is made to cover
its range, so no value is clipped and every error is at most half a grid step. For Q4_K/Q5_K the grid's low end is
-dmin * min_j <= the sub-block's minimum (the format's mins are non-negative, so the covered range always includes
0), the 6-bit min and scale are rounded *up* (a rounded-down scale would clip the top of the range) against fp16 d
and dmin rounded up too. Hence, with `span_j` = max(x_max, 0) - min(x_min, 0) of the sub-block and L = 15 (Q4_K)
or 31 (Q5_K) levels:

    |x - decoded| <= (span_j + dmin) / (2 L) + d / 2

and for Q6_K, with amax_j the sub-block's largest |x| (q - 32 in -31..31, the scale rounded up):

    |x - decoded| <= amax_j / 62 + d / 2

d is the super-block's largest needed scale / 63 (/ 127 for Q6_K), so for sub-blocks of similar range the d terms
are small: on Gaussian data the errors are about 1/30, 1/62 and 1/62 of the sub-block's range at most.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per super-block
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def _fp16_up(x: np.ndarray) -> np.ndarray:
    """x (non-negative float32) rounded to an fp16 >= x, so that a scale stored in fp16 never shrinks the grid."""
    h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _ceil_div(num: np.ndarray, den: np.ndarray, limit: int) -> np.ndarray:
    """ceil(num / den) clipped to 0..limit, 0 where den is 0 (an all-zero super-block)."""
    out = np.zeros(num.shape, np.float32)
    np.divide(num, den, out=out, where=den > 0)
    return np.clip(np.ceil(out), 0, limit).astype(np.uint8)


def _grid_q(x: np.ndarray, step: np.ndarray, low: np.ndarray, top: int) -> np.ndarray:
    """Nearest grid index of each value of x [..., n] on the grid low + step * q, q in 0..top."""
    q = np.zeros(x.shape, np.float32)
    np.divide(x - low, step, out=q, where=step > 0)
    return np.clip(np.rint(q), 0, top).astype(np.uint8)


def _blocks(w: np.ndarray) -> np.ndarray:
    """The values of w [rows, cols] (cols a multiple of 256) as float32 super-blocks [n, 256]."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK_K:
        raise ValueError(f"K-quants need a 2-D array of rows that are multiples of {QK_K} values, got {w.shape}")
    return w.reshape(-1, QK_K)


def _scales_mins(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K parameters of super-blocks x [n, 8, 32]: fp16 d, fp16 dmin [n], 6-bit scales and mins [n, 8],
    and q [n, 8, 32] in 0..levels."""
    neg_low = np.maximum(-x.min(axis=2), 0)  # the grid starts at -dmin * min_j <= min(x_min, 0)
    dmin = _fp16_up(neg_low.max(axis=1) / 63)
    mins = _ceil_div(neg_low, dmin.astype(np.float32)[:, None], 63)
    low = -dmin.astype(np.float32)[:, None] * mins
    need = (np.maximum(x.max(axis=2), 0) - low) / levels  # the step that reaches the top from the grid's start
    d = _fp16_up(need.max(axis=1) / 63)
    scales = _ceil_div(need, d.astype(np.float32)[:, None], 63)
    step = d.astype(np.float32)[:, None] * scales
    q = _grid_q(x, step[..., None], low[..., None], levels)
    return d, dmin, scales, mins, q


def _pack_scales_mins(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """ggml's 12-byte packing of 8 six-bit scales and mins: bytes 0-3 and 4-7 hold scales/mins 0-3 in their low
    6 bits and the top 2 bits of scales/mins 4-7 in their high 2; bytes 8-11 hold the low 4 bits of scales 4-7
    (low nibble) and mins 4-7 (high nibble)."""
    lo_s, hi_s, lo_m, hi_m = scales[:, :4], scales[:, 4:], mins[:, :4], mins[:, 4:]
    return np.concatenate([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0xF) | ((hi_m & 0xF) << 4)],
                          axis=1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """The low 4 bits of q [n, 8, 32], two sub-blocks per 32 bytes (even ones low): [n, 128]."""
    return ((q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)).reshape(len(q), -1)


def _fp16_bytes(h: np.ndarray) -> np.ndarray:
    return h.astype("<f2").view(np.uint8).reshape(len(h), 2)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """w [rows, cols] -> Q4_K bytes [rows, cols / 256 * 144]."""
    x = _blocks(w)
    d, dmin, scales, mins, q = _scales_mins(x.reshape(-1, 8, 32), 15)
    out = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales_mins(scales, mins), _nibbles(q)], axis=1)
    return out.reshape(w.shape[0], -1)


def quantize_q5_k(w: np.ndarray) -> np.ndarray:
    """w [rows, cols] -> Q5_K bytes [rows, cols / 256 * 176]."""
    x = _blocks(w)
    d, dmin, scales, mins, q = _scales_mins(x.reshape(-1, 8, 32), 31)
    bit = np.arange(8, dtype=np.uint8)[None, :, None]
    qh = (((q >> 4) & 1) << bit).sum(axis=1, dtype=np.uint8)  # [n, 32]: bit j of byte l from sub-block j
    out = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales_mins(scales, mins), qh, _nibbles(q)],
                         axis=1)
    return out.reshape(w.shape[0], -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """w [rows, cols] -> Q6_K bytes [rows, cols / 256 * 210] (symmetric: q - 32 in -31..31 times a signed scale)."""
    x = _blocks(w).reshape(-1, 16, 16)
    need = np.abs(x).max(axis=2) / 31
    d = _fp16_up(need.max(axis=1) / 127)
    scales = _ceil_div(need, d.astype(np.float32)[:, None], 127)
    step = (d.astype(np.float32)[:, None] * scales)[..., None]
    q = (_grid_q(x, step, -31 * step, 62) + 1).reshape(-1, 2, 2, 2, 32)  # 1..63, [n, half, nibble, pair, l]
    # value half*128 + 64*nibble + 32*pair + l: its low 4 bits in byte half*64 + 32*pair + l (nibble picks low or
    # high), its top 2 bits in byte half*32 + l at bits 2 * (2 * nibble + pair)
    ql = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(len(q), 128)
    shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    qh = ((q.reshape(-1, 2, 4, 32) >> 4) << shift).sum(axis=2, dtype=np.uint8).reshape(len(q), 64)
    out = np.concatenate([ql, qh, scales.view(np.uint8), _fp16_bytes(d)], axis=1)
    return out.reshape(w.shape[0], -1)


ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """w [rows, cols] float32 -> the bytes a GGUF stores for it in `qtype` ([rows, row bytes], uint8 for block
    formats): the K-quants here, F32/F16/BF16 and the legacy formats (Q4_0..Q8_0) by the `gguf` package."""
    if qtype in ENCODERS:
        return ENCODERS[qtype](w)
    import gguf

    return gguf.quants.quantize(np.asarray(w, dtype=np.float32), gguf.GGMLQuantizationType[qtype])
