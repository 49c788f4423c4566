"""Reference ops: clear array code that runs on NumPy (CPU) or CuPy (GPU) arrays alike.

These define what every op means. Internals are computed in float32 and results returned in the input dtype,
as the CUDA kernels do. The CUDA kernels in `cuda_ops` are tested against these functions.

An FP8 KV cache (kv_cache.KVCache with kv_cache_dtype fp8_e4m3) holds uint8 codes and per-row scale exponents;
the cache ops take the scales as `kv_scales=(k_scale, v_scale)` and quantize / dequantize through cupaged/fp8.py,
which is NumPy: CuPy arrays make a round trip through the host there (a test oracle, not a fast path).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

from cupaged import fp8
from cupaged.device import array_module
from cupaged.kv_cache import AttentionMetadata

Array = Any  # numpy.ndarray or cupy.ndarray


def matmul(x: Array, w: Array, out_dtype: Any = None, out: Array | None = None) -> Array:
    """x [M, K] @ w [K, N] in out_dtype (x's dtype if None), written into `out` if given."""
    y = x @ w
    if out is not None:
        out[...] = y
        return out
    return y if out_dtype is None else y.astype(out_dtype)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    xp = array_module(x)
    x32 = x.astype(xp.float32)
    inv = 1.0 / xp.sqrt(xp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv * weight.astype(xp.float32)).astype(x.dtype)


def add_rms_norm(x: Array, residual: Array, weight: Array, eps: float) -> tuple[Array, Array]:
    """residual = x + residual (kept in residual's dtype), then (rms_norm(residual) in x's dtype, residual)."""
    xp = array_module(x)
    residual = (x.astype(xp.float32) + residual.astype(xp.float32)).astype(residual.dtype)
    return rms_norm(residual, weight, eps).astype(x.dtype), residual


def apply_rotary(q: Array, k: Array, positions: Array, cos_sin: Array) -> tuple[Array, Array]:
    """Rotary embedding, Hugging Face's rotate_half (NeoX) convention, on q [T, Hq, D] and k [T, Hkv, D].

    cos_sin [max_pos, D] holds cos(pos * f_i) in its first D/2 columns and sin in the last D/2.
    """
    xp = array_module(q)
    half = q.shape[-1] // 2
    cs = cos_sin[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rotate(x: Array) -> Array:
        x1, x2 = x[..., :half].astype(xp.float32), x[..., half:].astype(xp.float32)
        return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x: Array) -> Array:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:]."""
    xp = array_module(x)
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter].astype(xp.float32), x[..., inter:].astype(xp.float32)
    return (gate / (1.0 + xp.exp(-gate)) * up).astype(x.dtype)


def _host(a: Array) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def write_kv(k: Array, v: Array, k_cache: Array, v_cache: Array, slot_mapping: Array,
             kv_scales: tuple[Array, Array] | None = None) -> None:
    """Store k, v [T, Hkv, D] into one layer's caches [num_blocks, Hkv, block_size, D] at their slots (-1: skip).

    With kv_scales (one layer's k_scale, v_scale [num_blocks, Hkv, block_size]) the caches hold FP8 codes: each
    (token, head) row is quantized with its own scale (fp8.quantize_rows)."""
    block_size = k_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    if kv_scales is None:
        k_cache[blocks, :, offsets] = k[keep]
        v_cache[blocks, :, offsets] = v[keep]
        return
    xp = array_module(k_cache)
    for x, cache, scales in ((k, k_cache, kv_scales[0]), (v, v_cache, kv_scales[1])):
        codes, exponents = fp8.quantize_rows(_host(x[keep]).astype(np.float32))
        cache[blocks, :, offsets] = xp.asarray(codes)
        scales[blocks, :, offsets] = xp.asarray(exponents)


def qkv_rotary_cache(qkv: Array, num_heads: int, num_kv_heads: int, positions: Array, cos_sin: Array,
                     k_cache: Array, v_cache: Array, slot_mapping: Array, bias: Array | None = None,
                     q_norm: Array | None = None, k_norm: Array | None = None, eps: float = 1e-6,
                     kv_scales: tuple[Array, Array] | None = None, ops: ModuleType | None = None) -> Array:
    """From the fused projection qkv [T, (Hq + 2 Hkv) * D] to attention's inputs: returns q [T, Hq, D] and writes
    k, v into one layer's caches at slot_mapping (as write_kv).

    In order: qkv + bias (when given), the per-head RMSNorm of q with q_norm and of k with k_norm (Qwen3; both or
    neither), rotary on q and k (apply_rotary), then the cache write. This composition of the separate ops is what
    the GPU's fused kernel computes; `ops` is the op set that runs it (this module when None; cuda_ops passes its
    own separate kernels for what its fused kernel does not cover)."""
    ops = ops or sys.modules[__name__]
    if bias is not None:
        qkv = qkv + bias
    tokens, width = qkv.shape
    head_dim = width // (num_heads + 2 * num_kv_heads)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].reshape(tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].reshape(tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].reshape(tokens, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = ops.rms_norm(q, q_norm, eps), ops.rms_norm(k, k_norm, eps)
    q, k = ops.apply_rotary(q, k, positions, cos_sin)
    ops.write_kv(k, v, k_cache, v_cache, slot_mapping, kv_scales=kv_scales)
    return q


def copy_blocks(k_cache: Array, v_cache: Array, src: Array, dst: Array,
                kv_scales: tuple[Array, Array] | None = None) -> None:
    """Copy blocks src[i] -> dst[i] in every layer of the caches [layers, blocks, Hkv, block_size, D] (and of the
    FP8 scales [layers, blocks, Hkv, block_size] when given)."""
    for cache in (k_cache, v_cache) + (tuple(kv_scales) if kv_scales is not None else ()):
        cache[:, dst] = cache[:, src]


def tempered_probs(logits: Array, temperature: Array, min_p: Array) -> Array:
    """softmax(logits / temperature) per row [B, V], entries under min_p x the row's largest set to 0."""
    xp = array_module(logits)
    scaled = logits / temperature[:, None]
    probs = xp.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return xp.where(probs >= min_p[:, None] * probs.max(axis=-1, keepdims=True), probs, 0.0)


def inverse_cdf(weights: Array, uniform: Array) -> Array:
    """Per row, the first index whose running sum of weights reaches uniform x the row's total."""
    xp = array_module(weights)
    # float64: a float32 running sum drifts by ~1e-6 with the array's shape, enough to move a draw that lands near
    # a boundary to the neighbouring token and break per-request seeds
    cdf = xp.cumsum(weights.astype(xp.float64), axis=-1)
    return xp.minimum((cdf < uniform[:, None] * cdf[:, -1:]).sum(axis=-1), weights.shape[-1] - 1)


def sample_rows(logits: Array, temperature: Array, min_p: Array, uniform: Array) -> Array:
    """Token per row of float32 logits [B, V]: argmax where temperature <= 0, else an inverse-CDF draw with
    uniform [B] from softmax(logits / temperature) after the min-p filter. The per-row parameters may be host
    (NumPy) arrays."""
    xp = array_module(logits)
    temperature, min_p, uniform = (xp.asarray(a) for a in (temperature, min_p, uniform))
    greedy = temperature <= 0
    probs = tempered_probs(logits, xp.where(greedy, 1.0, temperature).astype(xp.float32), min_p)
    return xp.where(greedy, xp.argmax(logits, axis=-1), inverse_cdf(probs, uniform)).astype(xp.int32)


def gather_kv(cache: Array, block_table: Array, seq_len: int, scale: Array | None = None) -> Array:
    """The first seq_len tokens of one sequence from one layer's cache, as [Hkv, seq_len, D]; with `scale` (the
    layer's FP8 scale exponents [num_blocks, Hkv, block_size]) the codes dequantized to float32."""
    xp = array_module(cache)
    num_blocks = -(-seq_len // cache.shape[2])

    def tokens(a: Array) -> Array:  # [nb, Hkv, bs, ...] -> [Hkv, seq_len, ...]
        a = xp.moveaxis(a[block_table[:num_blocks]], 1, 0)
        return a.reshape((a.shape[0], -1) + a.shape[3:])[:, :seq_len]

    if scale is None:
        return tokens(cache)
    return xp.asarray(fp8.dequantize_rows(_host(tokens(cache)), _host(tokens(scale))))


def attend(queries: Array, keys: Array, values: Array, first_position: int, scale: float) -> Array:
    """Causal attention of n queries at positions first_position.. over keys/values [Hkv, L, D] (float32).

    queries [n, Hq, D]; query j sees keys 0..first_position + j. Returns [n, Hq, D] in float32.
    """
    xp = array_module(queries)
    n, num_heads, head_dim = queries.shape
    num_kv_heads, seq_len = keys.shape[0], keys.shape[1]
    q = queries.astype(xp.float32).reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    q = q.transpose(1, 2, 0, 3)                                                         # [Hkv, G, n, D]
    scores = xp.matmul(q, keys[:, None].swapaxes(-1, -2)) * scale                        # [Hkv, G, n, L]
    query_pos = xp.arange(first_position, first_position + n)[:, None]
    scores = xp.where(xp.arange(seq_len)[None, :] <= query_pos, scores, -xp.inf)
    scores = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    context = xp.matmul(probs, values[:, None])                                          # [Hkv, G, n, D]
    return context.transpose(2, 0, 1, 3).reshape(n, num_heads, head_dim)


def paged_attention(q: Array, k_cache: Array, v_cache: Array, meta: AttentionMetadata, scale: float,
                    out: Array | None = None, kv_scales: tuple[Array, Array] | None = None) -> Array:
    """Causal grouped-query attention of q [T, Hq, D] over one layer's paged cache; returns [T, Hq, D] (`out` if
    given).

    Sequence b owns query rows query_start_loc[b]:query_start_loc[b+1]; its j-th new token sits at position
    seq_len - query_len + j and sees every cached position up to its own. kv_scales: as in write_kv (FP8 cache).
    """
    xp = array_module(q)
    out = xp.empty_like(q) if out is None else out
    qsl, seq_lens = meta.query_start_loc_host, meta.seq_lens_host
    for b in range(len(seq_lens)):
        start, end, seq_len = int(qsl[b]), int(qsl[b + 1]), int(seq_lens[b])
        k_scale, v_scale = kv_scales if kv_scales is not None else (None, None)
        keys = gather_kv(k_cache, meta.block_tables[b], seq_len, k_scale).astype(xp.float32)      # [Hkv, L, D]
        values = gather_kv(v_cache, meta.block_tables[b], seq_len, v_scale).astype(xp.float32)
        out[start:end] = attend(q[start:end], keys, values, seq_len - (end - start), scale).astype(q.dtype)
    return out
