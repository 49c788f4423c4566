"""Decode steps padded to fixed batch sizes, and replayed from CUDA graphs on the GPU (as vLLM and nano-vllm do).

A decode step of a small model is hundreds of small kernels: launched one by one from Python it costs several
times more host time than GPU time (../shared/DEVICE_NOTES.md: ~8 us a launch). Captured once per batch size and
replayed, it costs one launch.
- Batch sizes 1, 2, 4, 8, then steps of 8 up to 64 and of 16 beyond, up to max_num_seqs. A decode batch is padded
  to the next size with dummy rows: token 0 at position 0, slot -1 (nothing is written), a context of one token
  in block 0 (read, never used).
- The inputs live in static buffers (`DecodeInputs`) that every graph reads; a step fills them and replays. The
  eager path runs on the same buffers and padded sizes, so eager and graphs run the same kernels on the same
  shapes and give the same tokens.
- Decode attention runs with a plan fixed at capture (cuda_ops.decode_plan with capacity_len); the step's
  partition is written into it before the replay.
- GEMMs go through our own cuBLAS handle (layers/cublas.py), bound to the capture stream before capture.
- The graphs' intermediates come from a memory pool of their own: nothing else is ever allocated in memory that a
  replay writes. The graphs share that memory (the smaller ones are captured into the larger one's freed
  intermediates), so what a graph keeps between replays (its decode plan's partition buffer) is allocated
  elsewhere. Replays run on the default stream, in order with every other op of the engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from types import ModuleType
from typing import Any

import numpy as np

from cupaged.kv_cache import AttentionMetadata, KVCache
from cupaged.progress import progress

logger = logging.getLogger(__name__)

Array = Any


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The padded decode batch sizes: 1, 2, 4, 8, 16, ... 64, 80, ... up to and including max_num_seqs."""
    sizes, size = [], 1
    while size < max_num_seqs:
        sizes.append(size)
        size = size * 2 if size < 8 else size + (8 if size < 64 else 16)
    return sizes + [max_num_seqs]


def padded_size(batch: int, sizes: list[int]) -> int:
    """The smallest size that holds `batch` (the batch itself when it is larger than every size)."""
    return next((s for s in sizes if s >= batch), batch)


class DecodeInputs:
    """Static input buffers of padded decode batches (views of their first rows serve every batch size)."""

    def __init__(self, xp: ModuleType, max_batch: int, table_width: int, block_size: int):
        self.xp, self.block_size = xp, block_size
        # token id, position, slot, context length: one row each, uploaded together
        self.rows = xp.zeros((4, max_batch), dtype=xp.int32)
        self.rows[2], self.rows[3] = -1, 1  # dummy rows until filled (capture runs on them): no write, context 1
        self.block_tables = xp.zeros((max_batch, table_width), dtype=xp.int32)
        self.query_start_loc = xp.arange(max_batch + 1, dtype=xp.int32)

    @property
    def input_ids(self) -> Array:
        return self.rows[0]

    def fill(self, seqs: list[Any], batch: int) -> tuple[AttentionMetadata, int]:
        """Write the next token of each sequence (then dummy rows up to `batch`); returns the metadata and the
        longest context."""
        n, bs = len(seqs), self.block_size
        host = np.zeros((4, batch), dtype=np.int32)
        host[2] = -1
        host[3] = 1
        pos = np.fromiter((s.num_computed_tokens for s in seqs), np.int32, n)
        host[0, :n] = np.fromiter((s.token_ids[p] for s, p in zip(seqs, pos.tolist())), np.int32, n)
        host[1, :n], host[3, :n] = pos, pos + 1
        # the block tables, ragged lists, scattered into a [batch, width] array in one go
        lens = np.fromiter((len(s.block_table) for s in seqs), np.int64, n)
        total, width = int(lens.sum()), int(lens.max())
        flat = np.fromiter(itertools.chain.from_iterable(s.block_table for s in seqs), np.int32, total)
        starts = np.cumsum(lens) - lens
        tables = np.zeros((batch, width), dtype=np.int32)
        tables[np.repeat(np.arange(n), lens), np.arange(total) - np.repeat(starts, lens)] = flat
        host[2, :n] = tables[np.arange(n), pos // bs] * bs + pos % bs
        self.rows[:, :batch] = self.xp.asarray(host)
        self.block_tables[:batch, :width] = self.xp.asarray(tables)
        return self.meta(batch, host[3]), int(host[3].max())

    def meta(self, batch: int, seq_lens_host: np.ndarray, decode_plan: Any = None) -> AttentionMetadata:
        """Metadata of the first `batch` rows, one new token each."""
        return AttentionMetadata(
            positions=self.rows[1, :batch], slot_mapping=self.rows[2, :batch],
            query_start_loc=self.query_start_loc[:batch + 1], seq_lens=self.rows[3, :batch],
            block_tables=self.block_tables[:batch], query_start_loc_host=np.arange(batch + 1, dtype=np.int32),
            seq_lens_host=seq_lens_host, num_prefills=0, num_prefill_tokens=0, max_query_len=1,
            max_seq_len=int(seq_lens_host.max()), decode_plan=decode_plan)


class DecodeGraphs:
    """One captured decode step (forward and logits) per padded batch size."""

    def __init__(self, model: Any, cache: KVCache, inputs: DecodeInputs, sizes: list[int], max_model_len: int):
        import cupy

        from cupaged.layers import cublas, cuda_ops

        c = model.config
        self.logits = cupy.empty((sizes[-1], c.vocab_size), dtype=cupy.float32)
        self.pool = cupy.cuda.MemoryPool()
        self.graphs: dict[int, tuple[Any, cuda_ops.DecodePlan]] = {}
        self._set_partition = cuda_ops.set_partition
        self.replays: dict[int, int] = {}  # batch size -> replays (tests, stats)
        t0 = time.perf_counter()
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream, cupy.cuda.using_allocator(self.pool.malloc), \
                progress("capturing decode CUDA graphs", len(sizes)) as bar:
            cublas.handle().bind(stream.ptr)
            for batch in reversed(sizes):  # the largest first: the smaller ones reuse its intermediates
                plan = cuda_ops.decode_plan(batch, c.num_heads, c.num_kv_heads, c.head_dim, cache.block_size,
                                            model.embed.dtype, 1, capacity_len=max_model_len, fp8=cache.fp8)
                meta = inputs.meta(batch, np.ones(batch, dtype=np.int32), plan)

                def step() -> None:
                    hidden = model.forward(inputs.input_ids[:batch], meta, cache)
                    model.logits(hidden, out=self.logits[:batch])

                step()  # compiles the kernels, and fills the pool with what the capture will ask for
                stream.begin_capture()
                step()
                self.graphs[batch] = (stream.end_capture(), plan)
                bar.update()
            stream.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1fs", len(sizes), sizes[0], sizes[-1],
                    time.perf_counter() - t0)

    def replay(self, batch: int, max_seq_len: int) -> Array:
        """Run the step captured for `batch` rows on the inputs in place; returns its logits [batch, vocab]."""
        graph, plan = self.graphs[batch]
        self._set_partition(plan, max_seq_len)
        graph.launch()
        self.replays[batch] = self.replays.get(batch, 0) + 1
        return self.logits[:batch]
