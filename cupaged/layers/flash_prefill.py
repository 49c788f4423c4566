"""Flash prefill attention over the paged KV cache: cuda/flash_prefill.cu on CuPy arrays.

`flash_prefill_attention(q, k_cache, v_cache, meta, scale)` computes, for the prefill sequences of a step, what
`layers.reference.paged_attention` computes: causal grouped-query attention of each query row over its
sequence's K/V in the paged cache (cached prefix and new tokens alike; the new tokens' K/V must already have been
written into the cache). Tensor cores (mma.sync m16n8k16, fp32 accumulation), online softmax in tiles, the score
matrix never written to memory; cuda/flash_prefill.cu's header describes the kernel.

Rows and sequences covered: by default sequences `0:meta.num_prefills`, i.e. query rows
`0:meta.num_prefill_tokens` (the prefills come first in a step's batch). Rows of `q` past those (decode tokens)
are neither read nor written: with `out=None` the result has `num_prefill_tokens` rows; a given `out` keeps its
other rows as they were. `num_seqs=` widens the range to the first `num_seqs` sequences (the kernel is correct
for single-token queries too, only slower than the decode kernel).

Two kernels compute it. cuda/flash_prefill.cu ("fa2": FlashAttention-2 on mma.sync, every dtype, head size and
cache format here, compute capability 8.0 or newer) and cuda/flash_prefill_sm90.cu ("sm90", and "sm90-overlap",
its variant that overlaps a warpgroup's softmax with its next QK^T: warpgroup MMA, compiled for sm_90a, so only on
compute capability 9.0; head_dim 128 with an fp16/bf16 cache and no fa2 tile configuration asked for).
$CUPAGED_PREFILL_KERNEL (one of KERNELS) or the `kernel=` argument picks one; "auto" takes sm90 where it applies;
an sm90 choice where it does not apply runs fa2. DEFAULT_KERNEL is the choice without either.

Kernels compile through `cupaged.kernels.kernel` (NVRTC via cupy.RawModule, one instantiation per dtype, head
size and tile configuration, cached on disk by CuPy).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

from cupaged.kernels import ctype
from cupaged.kernels import kernel as compiled
from cupaged.kv_cache import AttentionMetadata

Array = Any
KERNEL_FILE = "flash_prefill.cu"
SM90_KERNEL_FILE = "flash_prefill_sm90.cu"
ENV_KERNEL = "CUPAGED_PREFILL_KERNEL"
KERNELS = ("fa2", "sm90", "sm90-overlap", "auto")
# sm90 where it applies: 1.1-1.3x fa2's TFLOP/s at 4k-16k tokens on an H200 (bench/bench_prefill_attention.py).
DEFAULT_KERNEL = "auto"
SM90_HEAD_DIM = 128
SM90_TILE = 128  # query rows and keys per tile of the sm90 kernel
SM90_THREADS = 256  # two warpgroups
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
DTYPES = ("float16", "bfloat16")
# (warps per CTA, m16 row tiles per warp, keys per K/V tile); a CTA covers warps * 16 * tiles query rows.
DEFAULT_CONFIG = {64: (4, 2, 64), 128: (4, 2, 64)}
# Tile configurations the kernel is written for (each compiles on first use); the bench compares them.
CONFIGS = ((4, 2, 64), (4, 2, 32), (8, 1, 64), (4, 1, 64))
ENV_CONFIG = "CUPAGED_FLASH_PREFILL_CONFIG"  # e.g. "4,2,32": overrides the default for every head size
_WORK_ATTR = "_flash_prefill_work"
_smem_limit: dict[int, tuple[Any, int]] = {}  # id(function) -> (function, the dynamic smem limit set on it)
logger = logging.getLogger(__name__)


def supported(dtype: Any, head_dim: int) -> bool:
    """Whether the kernel covers this element type and head size."""
    return np.dtype(dtype).name in DTYPES and head_dim in HEAD_DIMS


def config_for(head_dim: int, config: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """The tile configuration to use: `config`, else $CUPAGED_FLASH_PREFILL_CONFIG, else the default."""
    if config is None and os.environ.get(ENV_CONFIG):
        config = tuple(int(x) for x in os.environ[ENV_CONFIG].split(","))  # type: ignore[assignment]
    config = tuple(config) if config is not None else DEFAULT_CONFIG[head_dim]  # type: ignore[assignment]
    if config not in CONFIGS:
        raise ValueError(f"flash prefill tile config {config} is not one of {CONFIGS} (warps, m tiles, keys)")
    return config  # type: ignore[return-value]


def block_rows(config: tuple[int, int, int]) -> int:
    warps, m_tiles, _ = config
    return warps * 16 * m_tiles


def smem_bytes(head_dim: int, config: tuple[int, int, int], itemsize: int = 2) -> int:
    """Dynamic shared memory of one CTA: the Q tile, two stages of K and V tiles, two stages of block ids."""
    block_n = config[2]
    return (block_rows(config) * head_dim + 4 * block_n * head_dim) * itemsize + 2 * block_n * 4


def smem_bytes_sm90(overlap: bool = False, head_dim: int = SM90_HEAD_DIM, itemsize: int = 2) -> int:
    """Dynamic shared memory of one sm90 CTA: Q and 2 (overlap: 3) stages of K and V tiles, plus 1 KiB to align
    the base."""
    stages = 3 if overlap else 2
    return (1 + 2 * stages) * SM90_TILE * head_dim * itemsize + 1024


def kernel_for(dtype: Any, head_dim: int, *, fp8: bool = False, config: tuple[int, int, int] | None = None,
               kernel: str | None = None) -> str:
    """'fa2', 'sm90' or 'sm90-overlap': the kernel that runs a call with these properties.

    `kernel` (else $CUPAGED_PREFILL_KERNEL, else DEFAULT_KERNEL) asks; an sm90 kernel runs when asked for ("auto"
    means "sm90") and it applies: a compute capability 9.0 device, head_dim 128, an fp16/bf16 cache, no fa2 tile config
    (neither `config` nor $CUPAGED_FLASH_PREFILL_CONFIG).
    """
    choice = kernel or os.environ.get(ENV_KERNEL) or DEFAULT_KERNEL
    if choice not in KERNELS:
        raise ValueError(f"prefill kernel {choice!r} is not one of {KERNELS}")
    if (choice == "fa2" or fp8 or config is not None or os.environ.get(ENV_CONFIG) or head_dim != SM90_HEAD_DIM
            or not supported(dtype, head_dim)):
        return "fa2"
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        return "fa2"
    return "sm90" if choice == "auto" else choice


def work_list(query_start_loc: np.ndarray, seq_lens: np.ndarray, num_seqs: int, block_m: int,
              block_n: int) -> np.ndarray:
    """(sequence, first query row) of every query tile, int32 [n, 2], the tiles with the most K/V tiles first.

    A tile never crosses a sequence. Its K/V tiles run up to the position of its last row.
    """
    qsl = np.asarray(query_start_loc[: num_seqs + 1], dtype=np.int64)
    q_lens = qsl[1:] - qsl[:-1]
    lens = np.asarray(seq_lens[:num_seqs], dtype=np.int64)
    seqs = [np.full(-(-int(n) // block_m), b, np.int64) for b, n in enumerate(q_lens) if n > 0]
    if not seqs:
        return np.zeros((0, 2), np.int32)
    seq = np.concatenate(seqs)
    first_tile = np.concatenate([[0], np.cumsum([len(s) for s in seqs])[:-1]])
    tile_idx = np.arange(len(seq)) - np.repeat(first_tile, [len(s) for s in seqs])
    first_row = tile_idx * block_m
    last_row = np.minimum(first_row + block_m, q_lens[seq]) - 1
    kv_tiles = (lens[seq] - q_lens[seq] + last_row) // block_n + 1
    order = np.argsort(-kv_tiles, kind="stable")
    return np.stack([seq[order], first_row[order]], axis=1).astype(np.int32)


def _work(meta: AttentionMetadata, num_seqs: int, block_m: int, block_n: int):
    """The work list on the device, cached on `meta` (one step's layers share it)."""
    import cupy

    key = (num_seqs, block_m, block_n)
    cache = getattr(meta, _WORK_ATTR, None)
    if cache is None:
        cache = {}
        try:
            setattr(meta, _WORK_ATTR, cache)
        except AttributeError:  # a metadata class without __dict__: rebuild every call
            pass
    if key not in cache:
        cache[key] = cupy.asarray(work_list(meta.query_start_loc_host, meta.seq_lens_host, num_seqs, block_m,
                                            block_n))
    return cache[key]


def _check_rows(name: str, x: Array, heads: int, head_dim: int) -> int:
    """Row stride (elements) of x [rows, heads, head_dim] whose heads and elements are contiguous and 16-byte
    aligned, as the kernel's 16-byte accesses need; ValueError otherwise."""
    item = x.itemsize
    if x.ndim != 3 or x.shape[1:] != (heads, head_dim):
        raise ValueError(f"{name} must be [tokens, {heads}, {head_dim}], got {tuple(x.shape)}")
    if x.shape[0] > 1 and (x.strides[2] != item or x.strides[1] != head_dim * item):
        raise ValueError(f"{name}: heads and elements must be contiguous (strides {x.strides})")
    if x.data.ptr % 16 or (x.shape[0] > 1 and x.strides[0] % 16) or (x.shape[0] > 1 and x.strides[0] < 0):
        raise ValueError(f"{name}: rows must start on 16-byte boundaries (pointer {x.data.ptr:#x}, "
                         f"row stride {x.strides[0]} bytes)")
    return x.strides[0] // item if x.shape[0] > 1 else heads * head_dim


def _index_array(cupy, name: str, a: Array, ndim: int) -> Array:
    if not isinstance(a, cupy.ndarray) or a.ndim != ndim:
        raise TypeError(f"meta.{name} must be a {ndim}-D cupy array")
    return cupy.ascontiguousarray(a, dtype=cupy.int32)


def flash_prefill_attention(q: Array, k_cache: Array, v_cache: Array, meta: AttentionMetadata, scale: float,
                            out: Array | None = None, *, num_seqs: int | None = None,
                            config: tuple[int, int, int] | None = None,
                            kv_scales: tuple[Array, Array] | None = None, kernel: str | None = None) -> Array:
    """Causal attention of the prefill rows of q [T, Hq, D] over one layer's paged cache; returns out.

    k_cache, v_cache: one layer's [num_blocks, Hkv, block_size, D] (C-contiguous, block_size a power of two).
    Sequences 0:num_seqs (default meta.num_prefills), i.e. rows 0:meta.query_start_loc_host[num_seqs], are
    computed; out (default: a new [that many rows, Hq, D] array) gets those rows and nothing else.
    fp16 or bf16, D in (64, 128), Hq a multiple of Hkv, scale > 0. An FP8 cache holds uint8 e4m3 codes, and
    kv_scales its (k_scale, v_scale) exponents [num_blocks, Hkv, block_size] (cupaged/fp8.py); the kernel
    dequantizes the tiles as it gathers them. kernel: one of KERNELS (see `kernel_for`).
    """
    import cupy

    for name, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(a, cupy.ndarray):
            raise TypeError(f"{name} must be a cupy array, got {type(a).__name__}")
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, num_kv_heads, block_size, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_blocks, num_kv_heads, block_size, head_dim = k_cache.shape
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, num_heads, head_dim], got {tuple(q.shape)}")
    num_heads = q.shape[1]
    fp8 = kv_scales is not None
    if (q.dtype != k_cache.dtype and not fp8) or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"q, k_cache and v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if fp8 and (k_cache.dtype != np.uint8 or len(kv_scales) != 2
                or any(not isinstance(a, cupy.ndarray) or a.dtype != np.uint8 or a.shape != k_cache.shape[:3]
                       or not a.flags.c_contiguous for a in kv_scales)):
        raise TypeError(f"an FP8 cache is uint8 codes with kv_scales two contiguous uint8 "
                        f"{tuple(k_cache.shape[:3])} arrays, got {k_cache.dtype}")
    if not supported(q.dtype, head_dim):
        raise ValueError(f"flash prefill covers dtypes {DTYPES} and head_dim {HEAD_DIMS}, got {q.dtype.name} "
                         f"and {head_dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise ValueError("k_cache and v_cache must be C-contiguous (one layer's view of the cache)")
    if k_cache.data.ptr % 16 or v_cache.data.ptr % 16:
        raise ValueError("k_cache and v_cache must start on 16-byte boundaries")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    major = int(cupy.cuda.Device().compute_capability[:-1])
    if major < 8:
        raise RuntimeError("flash prefill needs compute capability 8.0 or newer (cp.async, bf16 tensor cores)")

    qsl_host = np.asarray(meta.query_start_loc_host)
    num_seqs = meta.num_prefills if num_seqs is None else int(num_seqs)
    if not 0 <= num_seqs <= len(meta.seq_lens_host):
        raise ValueError(f"num_seqs={num_seqs} outside 0..{len(meta.seq_lens_host)}")
    rows = int(qsl_host[num_seqs])
    if q.shape[0] < rows:
        raise ValueError(f"q has {q.shape[0]} rows, the {num_seqs} sequences need {rows}")
    if out is None:
        out = cupy.empty((rows, num_heads, head_dim), dtype=q.dtype)
    else:
        if not isinstance(out, cupy.ndarray) or out.dtype != q.dtype:
            raise TypeError(f"out must be a cupy array of {q.dtype}")
        if out.shape[0] < rows:
            raise ValueError(f"out has {out.shape[0]} rows, the {num_seqs} sequences need {rows}")
    if rows == 0:
        return out
    q_rows = q[:rows]
    if q_rows.shape[0] > 1 and (q_rows.strides[2] != q.itemsize or q_rows.strides[1] != head_dim * q.itemsize
                                or q_rows.strides[0] % 16 or q_rows.data.ptr % 16):
        q_rows = cupy.ascontiguousarray(q_rows)  # the kernel reads rows with 16-byte loads
    q_stride = _check_rows("q", q_rows, num_heads, head_dim)
    o_stride = _check_rows("out", out, num_heads, head_dim)

    block_tables = _index_array(cupy, "block_tables", meta.block_tables, 2)
    query_start_loc = _index_array(cupy, "query_start_loc", meta.query_start_loc, 1)
    seq_lens = _index_array(cupy, "seq_lens", meta.seq_lens, 1)

    chosen = kernel_for(q.dtype, head_dim, fp8=fp8, config=config, kernel=kernel)
    if chosen != "fa2":
        _launch_sm90(chosen == "sm90-overlap", out, o_stride, q_rows, q_stride, k_cache, v_cache, block_tables,
                     query_start_loc, seq_lens, _work(meta, num_seqs, SM90_TILE, SM90_TILE), num_heads, num_kv_heads,
                     block_size, scale)
        return out
    cfg = config_for(head_dim, config)
    warps, m_tiles, block_n = cfg
    work = _work(meta, num_seqs, block_rows(cfg), block_n)
    if work.shape[0] == 0:
        return out
    cache_t = "cupaged::e4m3" if fp8 else ctype(q.dtype)
    fn = compiled(KERNEL_FILE, f"flash_prefill<{ctype(q.dtype)}, {cache_t}, {head_dim}, {warps}, {m_tiles}, "
                  f"{block_n}>")
    smem = smem_bytes(head_dim, cfg, q.itemsize)
    _allow_smem(fn, smem)
    fn((work.shape[0] * num_heads,), (warps * 32,),
       (out, np.int64(o_stride), q_rows, np.int64(q_stride), k_cache, v_cache,
        *(kv_scales if fp8 else (k_cache, v_cache)), block_tables,
        np.int32(block_tables.shape[1]), query_start_loc, seq_lens, work, np.int32(num_heads),
        np.int32(num_kv_heads), np.int32(int(math.log2(block_size))), np.float32(scale * LOG2E)),
       shared_mem=smem)
    return out


def _allow_smem(fn: Any, smem: int) -> None:
    """Opt `fn` in to `smem` bytes of dynamic shared memory beyond the default 48 KiB, once."""
    if smem > 48 * 1024 and _smem_limit.get(id(fn), (None, 0))[1] < smem:
        fn.max_dynamic_shared_size_bytes = smem
        _smem_limit[id(fn)] = (fn, smem)  # holding fn keeps its id from being reused


def _launch_sm90(overlap: bool, out: Array, o_stride: int, q: Array, q_stride: int, k_cache: Array, v_cache: Array,
                 block_tables: Array, query_start_loc: Array, seq_lens: Array, work: Array, num_heads: int,
                 num_kv_heads: int, block_size: int, scale: float) -> None:
    """cuda/flash_prefill_sm90.cu (its OVERLAP variant or not) over the checked arguments of
    flash_prefill_attention, compiled for sm_90a."""
    if work.shape[0] == 0:
        return
    head_dim = k_cache.shape[3]
    fn = compiled(SM90_KERNEL_FILE, f"flash_prefill_sm90<{ctype(q.dtype)}, {head_dim}, {str(overlap).lower()}>",
                  arch="90a")
    smem = smem_bytes_sm90(overlap, head_dim, q.itemsize)
    _allow_smem(fn, smem)
    logger.debug("flash prefill: sm90 kernel (overlap %s), %d tiles x %d heads", overlap, work.shape[0], num_heads)
    fn((work.shape[0] * num_heads,), (SM90_THREADS,),
       (out, np.int64(o_stride), q, np.int64(q_stride), k_cache, v_cache, block_tables,
        np.int32(block_tables.shape[1]), query_start_loc, seq_lens, work, np.int32(num_heads),
        np.int32(num_kv_heads), np.int32(int(math.log2(block_size))), np.float32(scale * LOG2E)),
       shared_mem=smem)
