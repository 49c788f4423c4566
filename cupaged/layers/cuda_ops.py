"""The ops of layers/reference.py as CUDA kernels (cuda/*.cu), on CuPy arrays.

Same names, arguments and results as the reference, which is their test oracle. float32, float16 and bfloat16
all run through the kernels (the tensor-core decode kernel takes fp16/bf16; fp32 decode runs on a CUDA-core
kernel). Two differences, both safe for the model's use, which rebinds both results:
- `add_rms_norm` updates `residual` in place (float32 or x's dtype) and returns it;
- `apply_rotary` rotates q and k in place (or a contiguous copy when their heads are not laid out contiguously).
Prefill attention (sequences with several new tokens) uses the reference's math on the GPU: a per-sequence gather
of its K/V and cuBLAS matmuls, in query chunks; a flash kernel replaces it later. Shapes no kernel covers (row
lengths that are not whole 16-byte vectors, unusual head sizes) fall back to the reference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import cupy
import numpy as np

from cupaged.device import lasting_empty
from cupaged.kernels import ctype, kernel
from cupaged.kv_cache import AttentionMetadata
from cupaged.layers import cublas, flash_prefill, reference

FLASH_PREFILL = True  # False: prefill through the reference math (bench/bench_ttft.py compares the two)

Array = Any
THREADS = 128
FLOATS = ("float32", "float16", "bfloat16")
SCORE_BUDGET = 1 << 24  # float32 entries of one prefill chunk's score matrix (64 MiB)
TC_PARTITION_MIN, TC_PARTITION_MAX = 128, 2048  # tokens per decode CTA (multiples of 64)
LOG2E = 1.4426950408889634


def _name(a: Array) -> str:
    return np.dtype(a.dtype).name


def _vec(dtype: np.dtype) -> int:
    """Elements in one 16-byte access."""
    return 16 // np.dtype(dtype).itemsize


def _aligned(a: Array) -> bool:
    return a.data.ptr % 16 == 0


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _require_float(what: str, a: Array) -> None:
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{what}: expected a cupy.ndarray, got {type(a).__name__}")
    if _name(a) not in FLOATS:
        raise TypeError(f"{what}: dtype {_name(a)} is not one of {', '.join(FLOATS)}")


def _rows_per_block() -> int:
    return THREADS // 32


# ---------------------------------------------------------------------------------------------------- GEMM
def matmul(x: Array, w: Array, out_dtype: Any = None, out: Array | None = None) -> Array:
    """x [M, K] @ w [K, N] through our own cuBLAS handle (capturable in CUDA graphs), in out_dtype (x's if None),
    into `out` (contiguous [M, N]) if given."""
    out_dtype = np.dtype(out.dtype if out is not None else out_dtype or x.dtype)
    if not cublas.supported(x, w, out_dtype) or (out is not None and not out.flags.c_contiguous):
        return reference.matmul(x, w, out_dtype, out)
    if out is None:
        out = cupy.empty((x.shape[0], w.shape[1]), dtype=out_dtype)
    return cublas.handle().matmul(x, w, out)


# ---------------------------------------------------------------------------------------------------- norms
def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    _require_float("rms_norm x", x)
    width = x.shape[-1]
    _require(weight.shape == (width,), f"rms_norm: weight shape {weight.shape} does not match rows of {width}")
    if (width % _vec(x.dtype) or _name(weight) not in (_name(x), "float32") or not weight.flags.c_contiguous
            or not _aligned(weight) or x.size == 0):
        return reference.rms_norm(x, weight, eps)
    vec, item = _vec(x.dtype), x.itemsize
    # rows as (token, head) over a [T, H, D] view (q/k of a fused projection) or plain rows: no copy needed
    if x.ndim == 3 and x.strides[2] == item and all(s % (vec * item) == 0 for s in x.strides[:2]) and _aligned(x):
        src, heads, s0, s1 = x, x.shape[1], x.strides[0] // item, x.strides[1] // item
    elif x.ndim == 2 and x.strides[1] == item and x.strides[0] % (vec * item) == 0 and _aligned(x):
        src, heads, s0, s1 = x, 1, x.strides[0] // item, 0
    else:
        src = cupy.ascontiguousarray(x).reshape(-1, width)
        heads, s0, s1 = 1, width, 0
    rows = x.size // width
    out = cupy.empty(x.shape, dtype=x.dtype)
    kernel("norm.cu", f"rms_norm<{ctype(x.dtype)}, {ctype(weight.dtype)}>")(
        (math.ceil(rows / _rows_per_block()),), (THREADS,),
        (out, src, weight, np.int32(rows), np.int32(width), np.int32(heads), np.int64(s0), np.int64(s1),
         np.float32(eps)))
    return out


def add_rms_norm(x: Array, residual: Array, weight: Array, eps: float) -> tuple[Array, Array]:
    """(rms_norm(x + residual), x + residual); the sum is written into `residual` in place and returned."""
    _require_float("add_rms_norm x", x)
    _require_float("add_rms_norm residual", residual)
    _require(x.shape == residual.shape, f"add_rms_norm: x {x.shape} and residual {residual.shape} differ")
    width = x.shape[-1]
    _require(weight.shape == (width,), f"add_rms_norm: weight shape {weight.shape} does not match rows of {width}")
    if (width % _vec(x.dtype) or x.size == 0
            or _name(residual) not in (_name(x), "float32") or _name(weight) not in (_name(x), "float32")
            or not (x.flags.c_contiguous and residual.flags.c_contiguous and weight.flags.c_contiguous)
            or not (_aligned(x) and _aligned(residual) and _aligned(weight))):
        return reference.add_rms_norm(x, residual, weight, eps)
    rows = x.size // width
    out = cupy.empty_like(x)
    kernel("norm.cu", f"add_rms_norm<{ctype(x.dtype)}, {ctype(residual.dtype)}, {ctype(weight.dtype)}>")(
        (math.ceil(rows / _rows_per_block()),), (THREADS,),
        (out, x, residual, weight, np.int32(rows), np.int32(width), np.float32(eps)))
    return out, residual


# ---------------------------------------------------------------------------------------------------- rotary
def _heads_view(x: Array) -> tuple[Array, int]:
    """x [T, H, D] whose heads and elements are contiguous, with its row stride in elements (a copy if not)."""
    item = x.itemsize
    if x.strides[2] != item or x.strides[1] != x.shape[2] * item or x.strides[0] % item:
        x = cupy.ascontiguousarray(x)
    return x, (x.strides[0] // item if x.shape[0] > 1 else x.shape[1] * x.shape[2])


def apply_rotary(q: Array, k: Array, positions: Array, cos_sin: Array) -> tuple[Array, Array]:
    _require_float("apply_rotary q", q)
    _require(q.ndim == 3 and k.ndim == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2],
             f"apply_rotary: q {q.shape} and k {k.shape} must be [T, H, D] with the same T and D")
    _require(q.dtype == k.dtype, f"apply_rotary: q is {_name(q)} but k is {_name(k)}")
    tokens, num_heads, head_dim = q.shape
    _require(head_dim % 2 == 0 and cos_sin.ndim == 2 and cos_sin.shape[1] == head_dim,
             f"apply_rotary: cos_sin {cos_sin.shape} must be [max_pos, {head_dim}] (even head_dim)")
    _require(positions.shape == (tokens,), f"apply_rotary: positions {positions.shape} for {tokens} tokens")
    q, q_stride = _heads_view(q)
    k, k_stride = _heads_view(k)
    if tokens == 0:
        return q, k
    if _name(positions) != "int32":
        positions = positions.astype(cupy.int32)
    if _name(cos_sin) != "float32" or not cos_sin.flags.c_contiguous or not _aligned(cos_sin):
        cos_sin = cupy.ascontiguousarray(cos_sin, dtype=cupy.float32)
    vec = _vec(q.dtype)
    if (head_dim // 2) % vec or q_stride % vec or k_stride % vec or not (_aligned(q) and _aligned(k)):
        vec = 1
    items = (num_heads + k.shape[1]) * (head_dim // 2 // vec)
    block = min(THREADS, 32 * math.ceil(items / 32))
    kernel("rotary.cu", f"rotary<{ctype(q.dtype)}, {vec}>")(
        (tokens, math.ceil(items / block)), (block,),
        (q, k, positions, cos_sin, np.int32(num_heads), np.int32(k.shape[1]), np.int32(head_dim),
         np.int64(q_stride), np.int64(k_stride)))
    return q, k


# ---------------------------------------------------------------------------------------------------- MLP
def silu_and_mul(x: Array) -> Array:
    _require_float("silu_and_mul x", x)
    _require(x.shape[-1] % 2 == 0, f"silu_and_mul: last axis {x.shape[-1]} is not even")
    inter = x.shape[-1] // 2
    if inter % _vec(x.dtype) or not x.flags.c_contiguous or not _aligned(x):
        return reference.silu_and_mul(x)
    tokens = x.size // (2 * inter)
    out = cupy.empty(x.shape[:-1] + (inter,), dtype=x.dtype)
    total = tokens * inter // _vec(x.dtype)
    if total:
        kernel("activation.cu", f"silu_and_mul<{ctype(x.dtype)}>")(
            (math.ceil(total / 256),), (256,), (out, x, np.int32(tokens), np.int32(inter)))
    return out


# ---------------------------------------------------------------------------------------------------- sampling
class _Staging:
    """Pinned host buffers for small per-step uploads, copied with cudaMemcpyAsync, so the host goes on while the
    GPU still runs the forward (a copy from pageable memory would wait for it). A ring of SLOTS buffers: a slot is
    written again only once its copy, SLOTS uploads ago, has run, which the host then never waits for (at most two
    uploads per step, sampling parameters and a structured-output mask, and the engine runs one step ahead)."""

    SLOTS = 8
    ALIGN = 256  # each array's offset in a slot: device views aligned as cudaMalloc's are

    def __init__(self) -> None:
        self.host = [np.zeros(0, dtype=np.uint8) for _ in range(self.SLOTS)]
        self.done: list[cupy.cuda.Event | None] = [None] * self.SLOTS
        self.next = 0

    def upload(self, arrays: list[np.ndarray]) -> list[Array]:
        """Each host array on the device (same dtype and shape), all in one copy, in stream order."""
        slot, self.next = self.next, (self.next + 1) % self.SLOTS
        if self.done[slot] is not None:
            self.done[slot].synchronize()  # the copy from this buffer SLOTS uploads ago has run
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // self.ALIGN) * self.ALIGN
        if self.host[slot].size < total:
            self.host[slot] = np.frombuffer(cupy.cuda.alloc_pinned_memory(2 * total), np.uint8)
        staged = self.host[slot]
        for a, start in zip(arrays, offsets):
            staged[start:start + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        out = cupy.empty(total, dtype=cupy.uint8)
        stream = cupy.cuda.get_current_stream()
        cupy.cuda.runtime.memcpyAsync(out.data.ptr, staged.ctypes.data, total, cupy.cuda.runtime.memcpyHostToDevice,
                                      stream.ptr)
        self.done[slot] = stream.record()
        return [out[start:start + a.nbytes].view(a.dtype).reshape(a.shape) for a, start in zip(arrays, offsets)]


_sampling_staging = _Staging()


def _check_masks(what: str, vocab: int, batch: int, bitmask: np.ndarray, mask_rows: np.ndarray) -> None:
    words = -(-vocab // 32)
    _require(isinstance(bitmask, np.ndarray) and bitmask.dtype == np.int32 and bitmask.ndim == 2
             and bitmask.shape[1] == words,
             f"{what}: bitmask must be a host int32 array [rows, {words}], got {getattr(bitmask, 'shape', None)} "
             f"{getattr(bitmask, 'dtype', type(bitmask).__name__)}")
    _require(isinstance(mask_rows, np.ndarray) and mask_rows.shape == (batch,)
             and bool(((mask_rows >= -1) & (mask_rows < len(bitmask))).all()),
             f"{what}: mask_rows must hold one index into bitmask (or -1) per row of logits")


def sample_rows(logits: Array, temperature: np.ndarray, min_p: np.ndarray, uniform: np.ndarray,
                bitmask: np.ndarray | None = None, mask_rows: np.ndarray | None = None) -> Array:
    """Token per row of float32 logits [B, V] (see the reference), one CTA per row: nothing [B, V] is written.
    The per-row parameters are host (NumPy) arrays. With `bitmask` (int32 [M, ceil(V / 32)]) and `mask_rows`
    (int32 [B]), row b may only choose the tokens bitmask[mask_rows[b]] allows (sampler.apply_token_bitmask),
    unless mask_rows[b] is -1; the masks go up with the parameters, in one copy."""
    _require(logits.ndim == 2 and _name(logits) == "float32" and logits.strides[1] == 4,
             f"sample_rows: logits must be float32 rows [B, V], got {logits.shape} {_name(logits)}")
    batch, vocab = logits.shape
    tokens = cupy.empty(batch, dtype=cupy.int32)
    if not batch:
        return tokens
    host = [np.stack([temperature, min_p, uniform]).astype(np.float32)]
    if bitmask is not None:
        _check_masks("sample_rows", vocab, batch, bitmask, mask_rows)
        host += [mask_rows.astype(np.int32), bitmask]
    staged = _sampling_staging.upload(host)
    params = staged[0]
    # without masks the kernel reads neither pointer: any device address will do
    rows, words = (staged[1], staged[2]) if bitmask is not None else (params, params)
    kernel("sampling.cu", "sample_rows")(
        (batch,), (1024,), (tokens, logits, np.int64(logits.strides[0] // 4), np.int32(vocab),
                            params[0], params[1], params[2], np.int32(bitmask is not None), rows, words,
                            np.int32(-(-vocab // 32))), shared_mem=4 * -(-vocab // 256))
    return tokens


def mask_logits(logits: Array, bitmask: np.ndarray, mask_rows: np.ndarray) -> Array:
    """sampler.apply_token_bitmask in place on float32 logits [B, V] on the GPU; returns logits."""
    _require(logits.ndim == 2 and _name(logits) == "float32" and logits.strides[1] == 4,
             f"mask_logits: logits must be float32 rows [B, V], got {logits.shape} {_name(logits)}")
    batch, vocab = logits.shape
    _check_masks("mask_logits", vocab, batch, bitmask, mask_rows)
    if batch:
        rows, words = _sampling_staging.upload([mask_rows.astype(np.int32), bitmask])
        kernel("sampling.cu", "mask_logits")(
            (-(-vocab // 256), batch), (256,), (logits, np.int64(logits.strides[0] // 4), np.int32(vocab), rows,
                                                words, np.int32(-(-vocab // 32))))
    return logits


# ---------------------------------------------------------------------------------------------------- KV cache
FP8_CTYPE = "cupaged::e4m3"  # the kernels' cache element type for FP8 codes (cuda/common.cuh)


def _check_cache(k_cache: Array, v_cache: Array, kv_scales: tuple[Array, Array] | None = None) -> None:
    """One layer's caches: float of the model's dtype, or (kv_scales given) uint8 FP8 codes with their scales."""
    if kv_scales is None:
        _require_float("k_cache", k_cache)
    else:
        _require(_name(k_cache) == "uint8", f"k_cache: an FP8 cache holds uint8 codes, got {_name(k_cache)}")
        _require(all(isinstance(a, cupy.ndarray) and a.shape == k_cache.shape[:3] and _name(a) == "uint8"
                     and a.flags.c_contiguous for a in kv_scales),
                 f"kv_scales must be two contiguous uint8 [num_blocks, num_kv_heads, block_size] arrays matching "
                 f"the cache {k_cache.shape}")
    _require(k_cache.ndim == 4 and k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype,
             f"caches must be one layer's [num_blocks, num_kv_heads, block_size, head_dim] of one dtype, got "
             f"{k_cache.shape} {_name(k_cache)} and {v_cache.shape} {_name(v_cache)}")
    _require(k_cache.flags.c_contiguous and v_cache.flags.c_contiguous, "caches must be C-contiguous")


def fp8_supported(dtype: np.dtype, head_dim: int, block_size: int) -> bool:
    """Whether the kernels take an FP8 cache for this model dtype and shape: the tensor-core decode kernel's
    (fp16/bf16, head_dim 64/128/256, power-of-two block_size >= 2; the prefill kernel's are a subset or fall back
    to the reference math)."""
    return _tc_supported(dtype, head_dim, block_size) and block_size >= 2


def write_kv(k: Array, v: Array, k_cache: Array, v_cache: Array, slot_mapping: Array,
             kv_scales: tuple[Array, Array] | None = None) -> None:
    _check_cache(k_cache, v_cache, kv_scales)
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    _require(k.ndim == 3 and k.shape == v.shape and k.shape[1:] == (num_kv_heads, head_dim),
             f"write_kv: k {k.shape} and v {v.shape} must be [T, {num_kv_heads}, {head_dim}]")
    _require(k.dtype == v.dtype and (kv_scales is not None or k.dtype == k_cache.dtype),
             f"write_kv: k/v are {_name(k)}/{_name(v)} but the cache is {_name(k_cache)}")
    if kv_scales is not None:
        _require_float("write_kv k", k)
        _require(fp8_supported(k.dtype, head_dim, block_size),
                 f"write_kv: no FP8 kernels for {_name(k)} with head_dim {head_dim}, block_size {block_size}")
    _require(slot_mapping.shape == (k.shape[0],), f"write_kv: slot_mapping {slot_mapping.shape} for {k.shape[0]} tokens")
    if _name(slot_mapping) != "int32":
        slot_mapping = slot_mapping.astype(cupy.int32)
    if head_dim % _vec(k.dtype):
        return reference.write_kv(k, v, k_cache, v_cache, slot_mapping, kv_scales)
    k, k_stride = _heads_view(k)
    v, v_stride = _heads_view(v)
    if k_stride % _vec(k.dtype) or v_stride % _vec(k.dtype) or not (_aligned(k) and _aligned(v)):
        k, v = cupy.ascontiguousarray(k), cupy.ascontiguousarray(v)
        k_stride = v_stride = num_kv_heads * head_dim
    tokens = k.shape[0]
    total = tokens * num_kv_heads * head_dim // _vec(k.dtype)
    if total and kv_scales is not None:  # one thread per 8 values, head_dim / 8 threads a row (see cache.cu)
        kernel("cache.cu", f"write_kv_fp8<{ctype(k.dtype)}>")(
            (math.ceil(tokens * num_kv_heads * head_dim // 8 / 256),), (256,),
            (k, v, k_cache, v_cache, kv_scales[0], kv_scales[1], slot_mapping, np.int32(tokens),
             np.int32(num_kv_heads), np.int32(head_dim), np.int32(block_size), np.int64(k_stride), np.int64(v_stride)))
    elif total:
        kernel("cache.cu", f"write_kv<{ctype(k.dtype)}>")(
            (math.ceil(total / 256),), (256,),
            (k, v, k_cache, v_cache, slot_mapping, np.int32(tokens), np.int32(num_kv_heads), np.int32(head_dim),
             np.int32(block_size), np.int64(k_stride), np.int64(v_stride)))


def copy_blocks(k_cache: Array, v_cache: Array, src: Array, dst: Array,
                kv_scales: tuple[Array, Array] | None = None) -> None:
    """Blocks src[i] -> dst[i] in every layer of the caches [layers, blocks, Hkv, block_size, D], and of the FP8
    scales [layers, blocks, Hkv, block_size] when given."""
    pairs = [(k_cache, v_cache)] + ([tuple(kv_scales)] if kv_scales is not None else [])
    for k, v in pairs:
        _require(k.ndim >= 3 and k.shape == v.shape and k.dtype == v.dtype and k.flags.c_contiguous
                 and v.flags.c_contiguous, "copy_blocks: caches must be contiguous [layers, blocks, ...] pairs")
    if len(src) == 0:
        return
    src, dst = cupy.asarray(src, dtype=cupy.int32), cupy.asarray(dst, dtype=cupy.int32)
    for k, v in pairs:
        layers, num_blocks = k.shape[:2]
        unit = 16 if k[0, 0].nbytes % 16 == 0 else 1
        kernel("cache.cu", f"copy_blocks<{'uint4' if unit == 16 else 'unsigned char'}>")(
            (len(src), layers), (256,), (k, v, src, dst, np.int64(num_blocks), np.int32(k[0, 0].nbytes // unit)))


# ---------------------------------------------------------------------------------------------------- attention
@functools.cache
def _num_sms() -> int:
    return cupy.cuda.Device().attributes["MultiProcessorCount"]


@functools.cache
def _ctas_per_sm(func_name: str, smem: int) -> int:
    """Resident CTAs of THREADS threads per SM for a kernel (registers and shared memory); 2 if unknown."""
    try:
        func = kernel("paged_attention.cu", func_name)
        ptr = getattr(func, "ptr", None) or func.kernel.ptr  # RawKernel keeps its driver Function in .kernel
        return max(1, cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(ptr, THREADS, smem))
    except Exception:
        return 2


_workspaces: dict[int, Array] = {}


def _workspace(floats: int) -> Array:
    """A float32 scratch buffer of at least `floats` entries, kept per device (stable across calls)."""
    dev = cupy.cuda.Device().id
    ws = _workspaces.get(dev)
    if ws is None or ws.size < floats:
        ws = lasting_empty(max(floats, 1 << 20), np.float32)
        _workspaces[dev] = ws
    return ws


def heads_per_cta(group: int) -> int:
    """Query heads a thread block takes: the whole group up to 8, else the largest divisor of it up to 8."""
    return max(h for h in range(1, min(group, 8) + 1) if group % h == 0)


def decode_partition(work: int, max_seq_len: int, ctas_per_sm: int) -> int:
    """Tokens per CTA for the tensor-core decode kernel, `work` = sequences x KV heads x head chunks.

    Measured on an H200 (bench/RESULTS.md, partition sweep): DRAM bandwidth saturates with about 2 CTAs (8
    warps) per SM, and each extra CTA costs its fixed work (block-table load, warp merge, partial writes). So:
    split the contexts until there are about 2 CTAs per SM, but keep TC_PARTITION_MIN..TC_PARTITION_MAX tokens
    a CTA; then, if the grid spans 1-4 waves of resident CTAs with a mostly empty last wave, halve the partition
    until the waves are at least 80% full. Multiples of 64 (4 warps x 16 tokens).
    """
    sms = _num_sms()
    max_seq_len = max(1, max_seq_len)
    splits = max(1, min(math.ceil(2 * sms / max(1, work)), math.ceil(max_seq_len / TC_PARTITION_MIN)),
                 math.ceil(max_seq_len / TC_PARTITION_MAX))
    partition = 64 * math.ceil(math.ceil(max_seq_len / splits) / 64)
    slots = sms * ctas_per_sm
    while partition >= 2 * TC_PARTITION_MIN:
        waves = work * math.ceil(max_seq_len / partition) / slots
        if waves <= 1 or waves / math.ceil(waves) >= 0.8:
            break
        partition = 64 * math.ceil(partition / 2 / 64)
    return partition


def simt_partition(work: int, heads: int, max_seq_len: int) -> int:
    """Tokens per CTA for the CUDA-core kernel: about 4 CTAs per SM, scores within 32 KiB of shared memory."""
    splits = max(1, math.ceil(4 * _num_sms() / max(1, work)))
    partition = 64 * math.ceil(math.ceil(max(1, max_seq_len) / splits) / 64)
    return max(64, min(partition, 2048, 8192 // heads // 64 * 64))


def _tc_supported(dtype: np.dtype, head_dim: int, block_size: int) -> bool:
    return (np.dtype(dtype).name in ("float16", "bfloat16") and head_dim in (64, 128, 256)
            and block_size & (block_size - 1) == 0)


def _simt_supported(dtype: np.dtype, head_dim: int) -> bool:
    tpt = head_dim // _vec(dtype)
    return head_dim % _vec(dtype) == 0 and 0 < tpt <= 32 and 32 % tpt == 0


def decode_supported(dtype: np.dtype, head_dim: int, block_size: int) -> bool:
    """True when a decode kernel takes this cache shape (else paged_attention uses the reference math)."""
    return _tc_supported(dtype, head_dim, block_size) or _simt_supported(dtype, head_dim)


def _device_int(value: int, shared: bool = True) -> Array:
    """A device int32 [1] holding `value` (the decode kernels read their partition size from one): made once per
    value when shared, else a buffer of its own."""
    if shared and value in _device_ints:
        return _device_ints[value]
    buf = lasting_empty(1, np.int32)
    buf.set(np.array([value], dtype=np.int32))
    if shared:
        _device_ints[value] = buf
    return buf


_device_ints: dict[int, Array] = {}


@dataclass
class DecodePlan:
    """How the decode kernels split a batch's contexts (see cuda/paged_attention.cu).

    For an eager call everything is sized for the step. For a captured CUDA graph the grid, the workspace and the
    partition buffer are fixed at capture and `set_partition` writes each step's partition before the replay; the
    partition is a function of the batch size and the step's longest context only, in both cases, so a replay
    computes exactly what the eager call would.
    """

    kernel: str            # name expression of the attention kernel
    reduce: str            # ... and of the kernel that combines partitions
    tensor_cores: bool
    heads: int             # query heads per CTA
    chunks: int            # CTAs per KV head (group // heads)
    work: int              # sequences x KV heads x chunks
    block_arg: int         # log2(block_size) for the tensor-core kernel, block_size for the CUDA-core one
    smem: int              # dynamic shared memory per CTA, bytes
    grid_splits: int       # CTAs along each context; they loop when the context has more partitions
    max_splits: int        # partitions per (sequence, head) the workspace holds
    partition: int         # tokens per partition (this step's)
    partition_buf: Array   # int32 [1] on the device holding it
    part_out: Array        # float32 partial outputs [rows * max_splits * head_dim]
    part_ml: Array         # float32 partial (max, sum) pairs [rows * max_splits * 2]


def _choose_partition(plan: DecodePlan, max_seq_len: int) -> int:
    if plan.tensor_cores:
        return decode_partition(plan.work, max_seq_len, _ctas_per_sm(plan.kernel, _tc_smem(TC_PARTITION_MAX, 8)))
    return simt_partition(plan.work, plan.heads, max_seq_len)


def _tc_smem(partition: int, block_size: int) -> int:
    return 4 * (partition // block_size + 2)


def decode_plan(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: np.dtype,
                max_seq_len: int, partition: int | None = None, grid_splits: int | None = None,
                capacity_len: int | None = None, fp8: bool = False) -> DecodePlan:
    """Plan the decode attention of `batch` sequences whose longest context is max_seq_len, for q (and output) of
    `dtype` over a cache of that dtype, or of FP8 codes with `fp8` (the tensor-core kernel only).

    `partition` overrides the heuristic (tests, tuning); `grid_splits` fixes the grid (tests of the looping path);
    `capacity_len` plans for a CUDA graph: the workspace, the shared memory and a partition buffer of its own are
    sized for every context up to capacity_len, and the grid fills the GPU (set_partition then picks the step's
    partition).
    """
    group = num_heads // num_kv_heads
    heads = heads_per_cta(group)
    chunks = group // heads
    t = ctype(dtype)
    tc = _tc_supported(dtype, head_dim, block_size)
    _require(not fp8 or fp8_supported(dtype, head_dim, block_size),
             f"paged_decode_attention: no FP8 kernel for {np.dtype(dtype).name} with head_dim {head_dim}, "
             f"block_size {block_size} (needs float16/bfloat16, head_dim 64/128/256)")
    cache_t = FP8_CTYPE if fp8 else t
    kernel_name = (f"paged_decode_tc<{t}, {cache_t}, {head_dim}, {heads}>" if tc
                   else f"paged_decode_simt<{t}, {head_dim}, {heads}>")
    plan = DecodePlan(kernel_name, f"paged_decode_reduce<{t}, {head_dim}>", tc, heads, chunks,
                      batch * num_kv_heads * chunks, block_size.bit_length() - 1 if tc else block_size, 0, 0, 0, 0,
                      None, None, None)
    partition = partition or _choose_partition(plan, max_seq_len)
    _require(partition % 64 == 0, f"paged_decode_attention: partition {partition} is not a multiple of 64")
    _require(tc or heads * partition <= 8192, "paged_decode_attention: partition too large for the CUDA-core kernel")
    rows = batch * num_heads
    if capacity_len is None:
        plan.max_splits = math.ceil(max_seq_len / partition)
        plan.grid_splits = grid_splits or plan.max_splits
        biggest = partition
        plan.partition_buf = _device_int(partition)
        if plan.max_splits > 1:
            ws = _workspace(rows * plan.max_splits * (head_dim + 2))
            plan.part_out, plan.part_ml = ws[:rows * plan.max_splits * head_dim], ws[rows * plan.max_splits * head_dim:]
        else:
            plan.part_out = plan.part_ml = _workspace(1)  # not written: every context fits one partition
    else:
        # every partition the heuristic may choose for contexts up to capacity_len (a few hundred cheap calls)
        choices = {L: _choose_partition(plan, L) for L in range(64, capacity_len + 64, 64)}
        plan.max_splits = max(math.ceil(L / p) for L, p in choices.items())
        biggest = max(choices.values())
        slots = _num_sms() * (_ctas_per_sm(kernel_name, _tc_smem(TC_PARTITION_MAX, 8)) if tc else 4)
        plan.grid_splits = min(plan.max_splits, max(1, math.ceil(slots / plan.work)))
        # the graph's own partition buffer, which set_partition writes before each replay
        plan.partition_buf = _device_int(partition, shared=False)
        plan.part_out = cupy.empty(rows * plan.max_splits * head_dim, dtype=cupy.float32)
        plan.part_ml = cupy.empty(rows * plan.max_splits * 2, dtype=cupy.float32)
    plan.partition = partition
    plan.smem = _tc_smem(biggest, block_size) if tc else 4 * max(heads * biggest, 4 * heads * head_dim)
    return plan


def set_partition(plan: DecodePlan, max_seq_len: int) -> None:
    """Write the partition for a step whose longest context is max_seq_len into a graph plan's buffer."""
    partition = _choose_partition(plan, max_seq_len)
    _require(math.ceil(max_seq_len / partition) <= plan.max_splits,
             f"decode plan: a context of {max_seq_len} tokens is longer than the plan was made for")
    if partition != plan.partition:
        # stream-ordered: a plain set() is a synchronous cudaMemcpy, which would wait for the GPU to drain
        plan.partition_buf.set(np.array([partition], dtype=np.int32), stream=cupy.cuda.get_current_stream())
        plan.partition = partition


def run_decode(out: Array, q: Array, k_cache: Array, v_cache: Array, block_tables: Array, seq_lens: Array,
               plan: DecodePlan, scale: float, kv_scales: tuple[Array, Array] | None = None) -> None:
    """out [B, Hq, D] (contiguous) = attention of one query per sequence, q [B, Hq, D], as `plan` says (a plan
    made with fp8=True for an FP8 cache, whose scales come in kv_scales)."""
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return
    num_kv_heads = k_cache.shape[1]
    q, q_stride = _heads_view(q)
    if q_stride % _vec(q.dtype) or not _aligned(q):
        q = cupy.ascontiguousarray(q)
        q_stride = num_heads * head_dim
    tables = block_tables if _name(block_tables) == "int32" else block_tables.astype(cupy.int32)
    lens = seq_lens if _name(seq_lens) == "int32" else seq_lens.astype(cupy.int32)
    scale_args = (k_cache, v_cache) if kv_scales is None else tuple(kv_scales)  # not read without FP8
    args = (k_cache, v_cache) + (scale_args if plan.tensor_cores else ())
    kernel("paged_attention.cu", plan.kernel)(
        (num_kv_heads * plan.chunks, plan.grid_splits, batch), (THREADS,),
        (out, plan.part_out, plan.part_ml, q, np.int64(q_stride)) + args + (tables,
         np.int32(tables.shape[1]), lens, np.int32(num_kv_heads), np.int32(num_heads // num_kv_heads),
         np.int32(plan.chunks), np.int32(plan.block_arg), plan.partition_buf, np.int32(plan.max_splits),
         np.float32(scale * LOG2E)), shared_mem=plan.smem)
    if plan.max_splits > 1:
        kernel("paged_attention.cu", plan.reduce)(
            (num_heads, batch), (THREADS,),
            (out, plan.part_out, plan.part_ml, lens, plan.partition_buf, np.int32(plan.max_splits)))


def paged_decode_attention(out: Array, q: Array, k_cache: Array, v_cache: Array, block_tables: Array,
                           seq_lens: Array, max_seq_len: int, scale: float, partition: int | None = None,
                           grid_splits: int | None = None, kv_scales: tuple[Array, Array] | None = None) -> None:
    """out [B, Hq, D] (contiguous) = attention of one query per sequence, q [B, Hq, D], over the paged cache.

    block_tables int32 [B, max_blocks], seq_lens int32 [B] (every entry >= 1), max_seq_len >= max(seq_lens).
    `partition` (tokens per CTA, a multiple of 64) overrides the heuristic and `grid_splits` the grid: for tests
    and tuning. kv_scales: an FP8 cache's (k_scale, v_scale).
    """
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    plan = decode_plan(batch, num_heads, num_kv_heads, head_dim, block_size, q.dtype, max_seq_len, partition,
                       grid_splits, fp8=kv_scales is not None)
    run_decode(out, q, k_cache, v_cache, block_tables, seq_lens, plan, scale, kv_scales)


def _prefill_attention(out: Array, q: Array, k_cache: Array, v_cache: Array, meta: AttentionMetadata,
                       sequences: range, scale: float, kv_scales: tuple[Array, Array] | None = None) -> None:
    """Reference math on the GPU for the given sequences: gather K/V, causal attention in query chunks."""
    qsl, seq_lens = meta.query_start_loc_host, meta.seq_lens_host
    k_scale, v_scale = kv_scales if kv_scales is not None else (None, None)
    for b in sequences:
        start, end, seq_len = int(qsl[b]), int(qsl[b + 1]), int(seq_lens[b])
        keys = reference.gather_kv(k_cache, meta.block_tables[b], seq_len, k_scale).astype(cupy.float32)
        values = reference.gather_kv(v_cache, meta.block_tables[b], seq_len, v_scale).astype(cupy.float32)
        first = seq_len - (end - start)
        rows = max(16, SCORE_BUDGET // (q.shape[1] * seq_len))  # bounds the [H, rows, L] score matrix
        for c in range(start, end, rows):
            stop = min(c + rows, end)
            visible = first + stop - start  # keys the chunk's last query sees
            out[c:stop] = reference.attend(q[c:stop], keys[:, :visible], values[:, :visible],
                                           first + c - start, scale).astype(q.dtype)


def paged_attention(q: Array, k_cache: Array, v_cache: Array, meta: AttentionMetadata, scale: float,
                    out: Array | None = None, kv_scales: tuple[Array, Array] | None = None) -> Array:
    """Causal attention of q [T, Hq, D] over one layer's paged cache: decode rows (one new token per sequence,
    rows num_prefill_tokens:) through the decode kernels, prefill rows through the flash prefill kernel (fp16 and
    bf16, head_dim 64/128; other cases through the reference math). Into `out` (contiguous, q's shape) if given.
    kv_scales: the layer's (k_scale, v_scale) when the cache holds FP8 codes (kv_cache.KVCache)."""
    _require_float("paged_attention q", q)
    _check_cache(k_cache, v_cache, kv_scales)
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    fp8 = kv_scales is not None
    _require(q.ndim == 3 and q.shape[2] == head_dim and q.shape[1] % num_kv_heads == 0,
             f"paged_attention: q {q.shape} must be [T, Hq, {head_dim}] with Hq a multiple of {num_kv_heads}")
    _require(fp8 or q.dtype == k_cache.dtype, f"paged_attention: q is {_name(q)} but the cache is {_name(k_cache)}")
    if out is None:
        out = cupy.empty(q.shape, dtype=q.dtype)
    _require(out.shape == q.shape and out.dtype == q.dtype and out.flags.c_contiguous,
             f"paged_attention: out must be a contiguous {q.shape} array of {_name(q)}")
    prefill_tokens, prefills = meta.num_prefill_tokens, meta.num_prefills
    num_seqs = len(meta.seq_lens_host)
    _require(int(meta.query_start_loc_host[-1]) == q.shape[0] if num_seqs else q.shape[0] == 0,
             f"paged_attention: metadata describes {int(meta.query_start_loc_host[-1]) if num_seqs else 0} "
             f"tokens, q has {q.shape[0]}")
    if not (fp8_supported if fp8 else decode_supported)(q.dtype, head_dim, block_size):
        _prefill_attention(out, q, k_cache, v_cache, meta, range(num_seqs), scale, kv_scales)
        return out
    if prefills and FLASH_PREFILL and flash_prefill.supported(q.dtype, head_dim):
        flash_prefill.flash_prefill_attention(q, k_cache, v_cache, meta, scale, out=out, kv_scales=kv_scales)
    else:
        _prefill_attention(out, q, k_cache, v_cache, meta, range(prefills), scale, kv_scales)
    if num_seqs > prefills:
        if meta.decode_plan is None:  # planned once per step, for all layers (a captured graph brings its own)
            meta.decode_plan = decode_plan(num_seqs - prefills, q.shape[1], num_kv_heads, head_dim, block_size,
                                           q.dtype, int(meta.seq_lens_host[prefills:].max()), fp8=fp8)
        run_decode(out[prefill_tokens:], q[prefill_tokens:], k_cache, v_cache, meta.block_tables[prefills:],
                   meta.seq_lens[prefills:], meta.decode_plan, scale, kv_scales)
    return out
