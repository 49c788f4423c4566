"""The ranks of a tensor-parallel model on the CPU, stepped together: the engine core's model runner for tp > 1.

One ModelRunner per rank, each with its shard of the weights (sharding.py) and a KV cache of its own key/value
heads; all of them are handed the same scheduled batch, so they share the engine's one block manager and one block
table per sequence (block b holds the same tokens on every rank, each rank its heads of them). The ranks run at
once, as threads of a ThreadGroup (comm.py); their logits are all the whole vocabulary's after the all-gather, and
rank 0's are what the sampler sees. On the GPU the same split needs one process per GPU and an NCCL
communicator; sharding and the forward pass would not change.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import numpy as np

from cupaged.config import ModelConfig
from cupaged.engine.model_runner import ModelRunner
from cupaged.parallel.comm import ThreadGroup
from cupaged.parallel.sharding import RankShard

logger = logging.getLogger(__name__)


class TensorParallelRunner:
    """ModelRunner's interface over `tp` ranks (check_tp must have accepted config and tp)."""

    def __init__(self, tp: int, config: ModelConfig, tensors: dict[str, np.ndarray], dtype: np.dtype, device: str,
                 xp: ModuleType, block_size: int, max_num_batched_tokens: int, max_model_len: int,
                 max_num_seqs: int, kv_cache_dtype: str = "auto"):
        self.config, self.dtype, self.device, self.xp = config, dtype, device, xp
        self.group = ThreadGroup(tp)
        self.ranks: list[ModelRunner] = []
        for comm in self.group.communicators:
            shard = RankShard.of(config, comm)
            self.ranks.append(ModelRunner(shard.config, shard.shard_tensors(tensors, config), dtype, device, xp,
                                          block_size, max_num_batched_tokens, max_model_len, max_num_seqs,
                                          kv_cache_dtype, shard))
        logger.info("tensor parallel: %d ranks, each with %d of %d attention heads, %d key/value heads, %d of %d "
                    "MLP rows", tp, shard.config.num_heads, config.num_heads, shard.config.num_kv_heads,
                    shard.config.intermediate_size, config.intermediate_size)

    def bytes_per_block(self) -> int:
        """Bytes one block takes on all ranks together (more than tp = 1's when key/value heads are replicated)."""
        return sum(rank.bytes_per_block() for rank in self.ranks)

    def profile_num_blocks(self, gpu_memory_utilization: float, cpu_kv_cache_bytes: int) -> int:
        """How many blocks every rank's cache holds: the CPU's ranks share one memory, so the byte budget is for all
        of their caches together."""
        return max(1, cpu_kv_cache_bytes // self.bytes_per_block())

    def allocate_cache(self, num_blocks: int, max_model_len: int) -> None:
        for rank in self.ranks:
            rank.allocate_cache(num_blocks, max_model_len)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for rank in self.ranks:
            rank.copy_blocks(copies)

    def run(self, seqs: list[Any], num_new_tokens: list[int],
            pending: tuple[Any, dict[int, int]] | None = None) -> tuple[Any, list[int]]:
        """ModelRunner.run on every rank at once; rank 0's result (every rank has the same logits)."""
        return self.group.run(lambda rank: self.ranks[rank].run(seqs, num_new_tokens, pending))[0]
