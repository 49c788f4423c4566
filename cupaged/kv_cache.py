"""The paged KV cache and the attention metadata of one step. DESIGN.md explains the layout."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cupaged.config import ModelConfig


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names: auto = the model's dtype; fp8 = fp8_e4m3


def resolve_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """'auto' or 'fp8_e4m3' (the one FP8 format; 'fp8' is its alias); ValueError naming the option otherwise."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    return "auto" if kv_cache_dtype == "auto" else "fp8_e4m3"


class KVCache:
    """K and V of every layer in blocks of `block_size` token slots.

    `k` and `v` have shape [num_layers, num_blocks, num_kv_heads, block_size, head_dim] (HND): for one block and
    one KV head the `block_size x head_dim` tile is contiguous, which is what the attention kernels read.
    With kv_cache_dtype "fp8_e4m3" they hold uint8 e4m3 codes, and `k_scale`, `v_scale` [num_layers, num_blocks,
    num_kv_heads, block_size] (uint8) the power-of-two scale exponent of each (token, KV head) row (cupaged/fp8.py
    says why); otherwise they are in the model dtype and the scales are None.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: np.dtype, xp: ModuleType,
                 kv_cache_dtype: str = "auto"):
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
        self.fp8 = self.kv_cache_dtype == "fp8_e4m3"
        shape = (config.num_layers, num_blocks, config.num_kv_heads, block_size, config.head_dim)
        self.k = xp.empty(shape, dtype=np.uint8 if self.fp8 else dtype)
        self.v = xp.empty(shape, dtype=np.uint8 if self.fp8 else dtype)
        self.k_scale = xp.zeros(shape[:-1], dtype=np.uint8) if self.fp8 else None
        self.v_scale = xp.zeros(shape[:-1], dtype=np.uint8) if self.fp8 else None
        self.num_blocks = num_blocks
        self.block_size = block_size

    def scales(self, layer: int) -> tuple[Any, Any] | None:
        """Layer `layer`'s (k_scale, v_scale) for the ops' `scales=` argument; None unless FP8."""
        return (self.k_scale[layer], self.v_scale[layer]) if self.fp8 else None

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: np.dtype, kv_cache_dtype: str = "auto") -> int:
        """Bytes one block takes across all layers, K and V together (FP8: one byte a value, one scale a row)."""
        rows = 2 * config.num_layers * config.num_kv_heads * block_size
        if resolve_kv_cache_dtype(kv_cache_dtype) == "fp8_e4m3":
            return rows * (config.head_dim + 1)
        return rows * config.head_dim * np.dtype(dtype).itemsize


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch comes from and goes to (see DESIGN.md).

    Sequences with more than one new token (prefills) come first, then single-token decodes.
    Device arrays are on the model's device; `*_host` are NumPy copies for host-side loops.
    """

    positions: Any            # int32 [T]
    slot_mapping: Any         # int32 [T]
    query_start_loc: Any      # int32 [B + 1]
    seq_lens: Any             # int32 [B]
    block_tables: Any         # int32 [B, max_blocks]
    query_start_loc_host: np.ndarray
    seq_lens_host: np.ndarray
    num_prefills: int
    num_prefill_tokens: int
    max_query_len: int
    max_seq_len: int
    decode_plan: Any = None   # the GPU's decode-attention plan for this step (layers.cuda_ops.DecodePlan)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
              xp: ModuleType, slot_mapping: list[int] | None = None) -> "AttentionMetadata":
        """Metadata for sequences with `query_lens` new tokens each, ending at `seq_lens`, in that order.

        The slot mapping is derived from the block tables unless given (padding tokens get slot -1).
        """
        qlens = np.asarray(query_lens, dtype=np.int32)
        slens = np.asarray(seq_lens, dtype=np.int32)
        if np.any(qlens > slens) or np.any(qlens < 1):
            raise ValueError("each sequence needs 1 <= query_len <= seq_len")
        num_prefills = int(np.sum(qlens > 1))
        if np.any(qlens[num_prefills:] > 1):
            raise ValueError("prefills (query_len > 1) must come before decodes")
        qsl = np.zeros(len(qlens) + 1, dtype=np.int32)
        np.cumsum(qlens, out=qsl[1:])
        positions = np.concatenate([np.arange(s - q, s, dtype=np.int32) for q, s in zip(qlens, slens)]) \
            if len(qlens) else np.zeros(0, np.int32)
        width = max((len(t) for t in block_tables), default=0) or 1
        tables = np.zeros((len(block_tables), width), dtype=np.int32)
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = t
        if slot_mapping is None:
            seq_of_token = np.repeat(np.arange(len(qlens)), qlens)
            slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        else:
            slots = np.asarray(slot_mapping, dtype=np.int32)
        return cls(
            positions=xp.asarray(positions),
            slot_mapping=xp.asarray(slots.astype(np.int32)),
            query_start_loc=xp.asarray(qsl),
            seq_lens=xp.asarray(slens),
            block_tables=xp.asarray(tables),
            query_start_loc_host=qsl,
            seq_lens_host=slens,
            num_prefills=num_prefills,
            num_prefill_tokens=int(qsl[num_prefills]),
            max_query_len=int(qlens.max(initial=0)),
            max_seq_len=int(slens.max(initial=0)),
        )
