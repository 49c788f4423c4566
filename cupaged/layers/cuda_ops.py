"""The ops of layers/reference.py as CUDA kernels (cuda/*.cu), on CuPy arrays.

Same names, arguments and results as the reference, which is their test oracle. Two differences, both safe
for the model's use: `add_rms_norm` updates `residual` (float32 or x's dtype) in place, and `apply_rotary`
rotates q and k in place.
Prefill attention still uses the reference's math on the GPU (gather + matmul, in query chunks); the flash
kernel for it comes later. Shapes the kernels do not cover fall back to the reference.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import cupy
import numpy as np

from cupaged.kernels import ctype, kernel
from cupaged.kv_cache import AttentionMetadata
from cupaged.layers import reference

Array = Any
THREADS = 128
PREFILL_CHUNK = 2048  # query rows per reference-attention chunk: bounds the [H, n, L] score matrix


def _vec(dtype: np.dtype) -> int:
    return 16 // np.dtype(dtype).itemsize


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    width = x.shape[-1]
    if width % _vec(x.dtype):
        return reference.rms_norm(x, weight, eps)
    rows = cupy.ascontiguousarray(x.reshape(-1, width)) if x.ndim != 2 or x.strides[1] != x.itemsize \
        else x
    out = cupy.empty((rows.shape[0], width), dtype=x.dtype)
    per_block = THREADS // 32
    kernel("norm.cu", f"rms_norm<{ctype(x.dtype)}>")(
        (math.ceil(rows.shape[0] / per_block),), (THREADS,),
        (out, rows, weight, np.int32(rows.shape[0]), np.int32(width), np.int64(rows.strides[0] // x.itemsize),
         np.float32(eps)))
    return out.reshape(x.shape)


def add_rms_norm(x: Array, residual: Array, weight: Array, eps: float) -> tuple[Array, Array]:
    width = x.shape[-1]
    if width % _vec(x.dtype) or not (x.flags.c_contiguous and residual.flags.c_contiguous):
        return reference.add_rms_norm(x, residual, weight, eps)
    rows = x.size // width
    out = cupy.empty_like(x)
    per_block = THREADS // 32
    kernel("norm.cu", f"add_rms_norm<{ctype(x.dtype)}, {ctype(residual.dtype)}>")(
        (math.ceil(rows / per_block),), (THREADS,),
        (out, x, residual, weight, np.int32(rows), np.int32(width), np.float32(eps)))
    return out, residual


def _heads_view(x: Array) -> tuple[Array, int]:
    """x [T, H, D] whose heads and elements are contiguous, with its row stride in elements (copy if not)."""
    item = x.itemsize
    if x.strides[2] != item or x.strides[1] != x.shape[2] * item:
        x = cupy.ascontiguousarray(x)
    return x, x.strides[0] // item


def apply_rotary(q: Array, k: Array, positions: Array, cos_sin: Array) -> tuple[Array, Array]:
    q, q_stride = _heads_view(q)
    k, k_stride = _heads_view(k)
    tokens, num_heads, head_dim = q.shape
    if tokens:
        kernel("rotary.cu", f"rotary<{ctype(q.dtype)}>")(
            (tokens,), (THREADS,),
            (q, k, positions, cos_sin, np.int32(num_heads), np.int32(k.shape[1]), np.int32(head_dim),
             np.int64(q_stride), np.int64(k_stride)))
    return q, k


def silu_and_mul(x: Array) -> Array:
    inter = x.shape[-1] // 2
    if inter % _vec(x.dtype) or not x.flags.c_contiguous:
        return reference.silu_and_mul(x)
    tokens = x.size // (2 * inter)
    out = cupy.empty(x.shape[:-1] + (inter,), dtype=x.dtype)
    total = tokens * inter // _vec(x.dtype)
    if total:
        kernel("activation.cu", f"silu_and_mul<{ctype(x.dtype)}>")(
            (math.ceil(total / 256),), (256,), (out, x, np.int32(tokens), np.int32(inter)))
    return out


def write_kv(k: Array, v: Array, k_cache: Array, v_cache: Array, slot_mapping: Array) -> None:
    k, k_stride = _heads_view(k)
    v, v_stride = _heads_view(v)
    tokens, num_kv_heads, head_dim = k.shape
    total = tokens * num_kv_heads * head_dim // _vec(k.dtype)
    if total:
        kernel("cache.cu", f"write_kv<{ctype(k.dtype)}>")(
            (math.ceil(total / 256),), (256,),
            (k, v, k_cache, v_cache, slot_mapping, np.int32(tokens), np.int32(num_kv_heads), np.int32(head_dim),
             np.int32(k_cache.shape[2]), np.int64(k_stride), np.int64(v_stride)))


def copy_blocks(k_cache: Array, v_cache: Array, src: Array, dst: Array) -> None:
    layers, num_blocks = k_cache.shape[:2]
    block_vecs = k_cache[0, 0].nbytes // 16
    kernel("cache.cu", "copy_blocks")((len(src), layers), (256,),
                                      (k_cache, v_cache, src, dst, np.int64(num_blocks), np.int32(block_vecs)))


@functools.cache
def _num_sms() -> int:
    return cupy.cuda.Device().attributes["MultiProcessorCount"]


def decode_partition(batch: int, head_chunks: int, heads_per_cta: int, max_seq_len: int) -> int:
    """Tokens per thread block: small enough that batch x head chunks x partitions fills the GPU 4 times over,
    large enough to keep the reduction cheap, and within 32 KiB of scores."""
    splits = max(1, math.ceil(4 * _num_sms() / max(1, batch * head_chunks)))
    partition = 64 * math.ceil(math.ceil(max_seq_len / splits) / 64)
    return max(64, min(partition, 2048, 8192 // heads_per_cta // 64 * 64))


def heads_per_cta(group: int) -> int:
    """Query heads a thread block takes: the whole group up to 8, else the largest divisor of it up to 8."""
    return max(h for h in range(1, min(group, 8) + 1) if group % h == 0)


def paged_decode_attention(out: Array, q: Array, k_cache: Array, v_cache: Array, block_tables: Array,
                           seq_lens: Array, max_seq_len: int, scale: float) -> None:
    """out [B, Hq, D] = attention of one query per sequence, q [B, Hq, D], over the paged cache."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    heads = heads_per_cta(group)
    q, q_stride = _heads_view(q)
    partition = decode_partition(batch, num_heads // heads, heads, max_seq_len)
    splits = math.ceil(max_seq_len / partition)
    name = f"paged_decode_attention<{ctype(q.dtype)}, {head_dim}, {heads}>"
    attend = kernel("paged_attention.cu", name)
    smem = 4 * max(heads * partition, 4 * heads * head_dim)  # at most 32 KiB: no opt-in needed
    part_out = cupy.empty((batch, num_heads, splits, head_dim), cupy.float32) if splits > 1 else out
    part_max = cupy.empty((batch, num_heads, splits), cupy.float32) if splits > 1 else out
    part_sum = cupy.empty((batch, num_heads, splits), cupy.float32) if splits > 1 else out
    attend((splits, num_heads // heads, batch), (THREADS,),
           (out, part_out, part_max, part_sum, q, np.int64(q_stride), k_cache, v_cache, block_tables,
            np.int32(block_tables.shape[1]), seq_lens, np.int32(num_kv_heads), np.int32(group),
            np.int32(block_size), np.int32(partition), np.float32(scale)), shared_mem=smem)
    if splits > 1:
        kernel("paged_attention.cu", f"paged_decode_reduce<{ctype(q.dtype)}, {head_dim}>")(
            (num_heads, batch), (min(head_dim, 128),),
            (out, part_out, part_max, part_sum, seq_lens, np.int32(partition), np.int32(splits)),
            shared_mem=4 * splits)


def _decode_supported(dtype: np.dtype, head_dim: int) -> bool:
    tpt = head_dim // _vec(dtype)
    return head_dim % _vec(dtype) == 0 and tpt <= 32 and 32 % tpt == 0


def paged_attention(q: Array, k_cache: Array, v_cache: Array, meta: AttentionMetadata, scale: float) -> Array:
    """Decode rows through the decode kernel; prefill rows (and shapes it does not cover) through the
    reference math on the GPU, in query chunks."""
    out = cupy.empty(q.shape, dtype=q.dtype)
    prefill_tokens, prefills = meta.num_prefill_tokens, meta.num_prefills
    qsl, seq_lens = meta.query_start_loc_host, meta.seq_lens_host
    use_kernel = _decode_supported(q.dtype, q.shape[2])
    for b in range(prefills if use_kernel else len(seq_lens)):
        start, end, seq_len = int(qsl[b]), int(qsl[b + 1]), int(seq_lens[b])
        keys = reference.gather_kv(k_cache, meta.block_tables[b], seq_len).astype(cupy.float32)
        values = reference.gather_kv(v_cache, meta.block_tables[b], seq_len).astype(cupy.float32)
        first = seq_len - (end - start)
        for c in range(start, end, PREFILL_CHUNK):
            stop = min(c + PREFILL_CHUNK, end)
            visible = first + stop - start  # keys the chunk's last query sees
            out[c:stop] = reference.attend(q[c:stop], keys[:, :visible], values[:, :visible],
                                           first + c - start, scale).astype(q.dtype)
    if use_kernel and q.shape[0] > prefill_tokens:
        paged_decode_attention(out[prefill_tokens:], q[prefill_tokens:], k_cache, v_cache,
                               meta.block_tables[prefills:], meta.seq_lens[prefills:], meta.max_seq_len, scale)
    return out
