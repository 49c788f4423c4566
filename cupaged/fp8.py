"""FP8 e4m3 ("e4m3fn": no infinities, one NaN pattern per sign) in NumPy bit arithmetic, and the scaled form the
KV cache stores.

The codec is exact: `encode_e4m3` rounds float32 to the nearest e4m3 value, ties to even, saturating to +-448
(CUDA's `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)` and PTX `cvt.rn.satfinite.e4m3x2.f32`: infinities
become +-448, NaN becomes the NaN code 0x7f); `decode_e4m3` gives every code's exact value. e4m3: 1 sign bit,
4 exponent bits (bias 7), 3 mantissa bits; normals 2^-6 .. 448, subnormals m * 2^-9.

KV-cache quantization (`quantize_rows` / `dequantize_rows`): each (token, KV head) row of head_dim values gets
its own power-of-two scale, stored as one byte, its float32 biased exponent (an "e8m0" scale): the smallest
2^e with max|row| <= 448 * 2^e. Why per row and a power of two:
- per row: nothing to calibrate and nothing can saturate, whatever the checkpoint (random weights give K/V of
  any magnitude; real models have a few outlier tokens, e.g. attention sinks, whose K dwarfs the rest). The
  scale travels with the block's contents, so prefix-cache hits and copy-on-write copies stay valid, and the
  CUDA-graph steps hold no scale state. It costs head_dim + 1 bytes per row instead of head_dim.
- a power of two: x / 2^e is exact, so the kernels and this reference give bit-identical codes, and the kernels
  fold the scale into the fp32 scores (K) and the softmax weights (V) with one multiply per token.
"""

from __future__ import annotations

import numpy as np

E4M3_MAX = 448.0
E4M3_NAN = 0x7F
# scale exponents (biased, float32) stay in [SCALE_EXP_MIN, SCALE_EXP_MAX]: 2^-126 .. 2^15. The decode kernel
# multiplies the softmax weights by scale * 2^112 (its V operand is bf16 code values times 2^-112), which must
# stay finite: K/V values beyond 448 * 2^15 (1.5e7) saturate.
SCALE_EXP_MIN, SCALE_EXP_MAX = 1, 142


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> uint8 e4m3fn codes: round to nearest even, saturate to +-448 (infinities too), NaN -> 0x7f."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    nan = np.isnan(x)
    a = np.where(nan, np.float32(0.0), np.minimum(np.abs(x), np.float32(E4M3_MAX)))  # saturate; NaN at the end
    abits = a.view(np.uint32)
    # normals (|x| >= 2^-6): round the 23-bit mantissa to 3 bits, ties to even, through the integer add; a carry
    # into the exponent is the right result. The float32 exponent's bias 127 becomes e4m3's 7.
    rounded = (abits + np.uint32(0x7FFFF) + ((abits >> 20) & 1)) >> 20
    normal = (rounded.astype(np.int64) - ((127 - 7) << 3)).clip(0, 0x7E)
    # subnormals (|x| < 2^-6): m * 2^-9 with m = round_half_even(|x| * 2^9), exact in float32; m == 8 is 2^-6
    sub = np.rint(a * np.float32(512.0)).astype(np.int64)
    code = np.where(a >= np.float32(2.0 ** -6), normal, sub).astype(np.uint8)
    return np.where(nan, np.uint8(E4M3_NAN), code | sign).astype(np.uint8)


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """uint8 e4m3fn codes -> float32 values (0x7f and 0xff are NaN)."""
    c = np.asarray(codes, dtype=np.uint8).astype(np.uint32)
    exp, mant = (c >> 3) & 0xF, c & 0x7
    normal = ((exp + (127 - 7)) << 23 | mant << 20).astype(np.uint32).view(np.float32)
    value = np.where(exp == 0, mant.astype(np.float32) * np.float32(2.0 ** -9), normal)
    value = np.where((c & 0x80) != 0, -value, value)
    return np.where((c & 0x7F) == E4M3_NAN, np.float32(np.nan), value).astype(np.float32)


def scale_exponents(amax: np.ndarray) -> np.ndarray:
    """uint8 biased exponent e of the smallest power-of-two scale 2^(e-127) with amax <= 448 * 2^(e-127).

    amax = 1.m * 2^(E-127) <= 1.75 * 2^(8 + s)  <=>  s = E - 135 if 1.m <= 1.75, else E - 134.
    Clamped to [SCALE_EXP_MIN, SCALE_EXP_MAX] (zero and tiny rows take the smallest scale)."""
    bits = np.asarray(amax, dtype=np.float32).view(np.uint32)
    biased = ((bits >> 23) & 0xFF).astype(np.int64)
    e = np.where((bits & 0x7FFFFF) <= 0x600000, biased - 8, biased - 7)
    return e.clip(SCALE_EXP_MIN, SCALE_EXP_MAX).astype(np.uint8)


def exponent_scale(e: np.ndarray, negate: bool = False) -> np.ndarray:
    """float32 2^(e-127) for biased exponents e, or 2^(127-e) with negate (exact: e in [1, 253])."""
    e = np.asarray(e, dtype=np.uint32)
    return ((np.uint32(254) - e if negate else e) << 23).astype(np.uint32).view(np.float32)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., D] -> (uint8 codes [..., D], uint8 scale exponents [...]): x ~= decode(codes) * 2^(scale - 127)."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.fmax.reduce(np.abs(x), axis=-1, initial=0.0)  # fmax skips NaN, as the kernel's fmaxf does
    e = scale_exponents(amax)
    return encode_e4m3(x * exponent_scale(e, negate=True)[..., None]), e


def dequantize_rows(codes: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """float32 values of quantize_rows' output."""
    return decode_e4m3(codes) * exponent_scale(exponents)[..., None]
