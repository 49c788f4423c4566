"""Runs the model for a scheduled batch: builds the flattened inputs, calls the forward pass, returns logits.

Decode-only steps are padded to fixed batch sizes and, on the GPU, replayed from CUDA graphs (decode_graphs.py);
on the GPU, steps with prefills are padded to fixed token counts and replayed from piecewise graphs, attention
aside (piecewise_graphs.py).
It also owns the KV cache and sizes it from memory: on the GPU, `gpu_memory_utilization` of the card less
what the weights and the peak activations of the largest batch take (measured by a dummy forward); on the CPU,
a byte budget.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import numpy as np

from cupaged.config import ModelConfig
from cupaged.engine.decode_graphs import DecodeGraphs, DecodeInputs, graph_batch_sizes, padded_size
from cupaged.engine.piecewise_graphs import PiecewiseSteps
from cupaged.kv_cache import AttentionMetadata, KVCache, resolve_kv_cache_dtype
from cupaged.layers import ops_for
from cupaged.models.llama import LlamaModel
from cupaged.parallel.sharding import RankShard

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], dtype: np.dtype, device: str,
                 xp: ModuleType, block_size: int, max_num_batched_tokens: int, max_model_len: int,
                 max_num_seqs: int, kv_cache_dtype: str = "auto", shard: RankShard | None = None):
        """`shard`: this runner is one rank of a tensor-parallel model (parallel/tp_runner.py), and config and
        tensors are the rank's."""
        self.config, self.dtype, self.device, self.xp = config, dtype, device, xp
        self.kv_cache_dtype = kv_cache_dtype
        if device == "cuda" and resolve_kv_cache_dtype(kv_cache_dtype) == "fp8_e4m3":  # kernels for these shapes?
            from cupaged.layers.cuda_ops import fp8_supported

            if not fp8_supported(dtype, config.head_dim, block_size):
                raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} on the GPU needs dtype float16 or bfloat16 and "
                                 f"head_dim 64, 128 or 256, got {np.dtype(dtype).name} and {config.head_dim}")
        self.block_size = block_size
        self.model = LlamaModel(config, tensors, ops_for(device), xp, max_positions=max_model_len, shard=shard)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.cache: KVCache | None = None
        self.decode_sizes = graph_batch_sizes(max_num_seqs)
        self.decode_inputs = DecodeInputs(xp, max_num_seqs, -(-max_model_len // block_size), block_size)
        self.graphs: DecodeGraphs | None = None
        self.pieces: PiecewiseSteps | None = None

    def bytes_per_block(self) -> int:
        return KVCache.bytes_per_block(self.config, self.block_size, self.dtype, self.kv_cache_dtype)

    def profile_num_blocks(self, gpu_memory_utilization: float, cpu_kv_cache_bytes: int) -> int:
        """How many KV blocks fit in the memory left after weights and peak activations."""
        if self.device != "cuda":
            return max(1, cpu_kv_cache_bytes // self.bytes_per_block())
        import cupy

        tokens = self.max_num_batched_tokens
        # the largest step: max_num_batched_tokens tokens in prompts no longer than the context
        lens = [min(self.max_model_len, tokens - start) for start in range(0, tokens, self.max_model_len)]
        tables, first = [], 0
        for n in lens:
            tables.append(list(range(first, first + -(-n // self.block_size))))
            first += len(tables[-1])
        self.cache = KVCache(self.config, first, self.block_size, self.dtype, cupy, self.kv_cache_dtype)
        meta = AttentionMetadata.build(lens, lens, tables, self.block_size, cupy)
        ids = cupy.asarray(np.random.default_rng(0).integers(0, self.config.vocab_size, tokens), dtype=cupy.int32)
        self.model.logits(self.model.forward(ids, meta, self.cache)[-1:])
        cupy.cuda.Device().synchronize()
        self.cache = None
        free, total = cupy.cuda.runtime.memGetInfo()
        # the memory pool still holds the weights and the forward's peak working set, which later steps reuse;
        # what it holds unused (the dummy cache, freed temporaries) is ours to give to the KV cache
        in_use = total - free - cupy.get_default_memory_pool().free_bytes()
        budget = total * gpu_memory_utilization - in_use
        num_blocks = int(budget // self.bytes_per_block())
        logger.info("GPU memory: %.1f GiB total, %.1f GiB in use after a %d-token forward; %d KV blocks fit "
                    "at gpu_memory_utilization=%.2f", total / 2**30, in_use / 2**30, tokens, num_blocks,
                    gpu_memory_utilization)
        if num_blocks < 1:
            raise RuntimeError("no GPU memory left for the KV cache: raise gpu_memory_utilization or lower "
                               "max_num_batched_tokens")
        return num_blocks

    def allocate_cache(self, num_blocks: int, max_model_len: int) -> None:
        self.cache = KVCache(self.config, num_blocks, self.block_size, self.dtype, self.xp, self.kv_cache_dtype)
        self.max_model_len = max_model_len

    def prepare_graphs(self, capture: bool) -> None:
        """GPU only, after allocate_cache: capture the decode step of every padded batch size, and the pieces of
        mixed steps of every padded token count (or, without `capture`, run mixed steps on the same padded shapes
        eagerly, so that eager and graphs give the same tokens)."""
        if capture:
            self.graphs = DecodeGraphs(self.model, self.cache, self.decode_inputs, self.decode_sizes,
                                       self.max_model_len)
        self.pieces = PiecewiseSteps(self.model, self.cache, self.max_num_batched_tokens, self.decode_sizes[-1],
                                     self.xp, capture)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks (every layer, K and V): copy-on-write before a shared block is written."""
        if copies:
            src, dst = (self.xp.asarray(np.array(c, dtype=np.int32)) for c in zip(*copies))
            self.model.ops.copy_blocks(self.cache.k, self.cache.v, src, dst,
                                       kv_scales=(self.cache.k_scale, self.cache.v_scale) if self.cache.fp8 else None)

    def run(self, seqs: list[Any], num_new_tokens: list[int],
            pending: tuple[Any, dict[int, int]] | None = None) -> tuple[Any, list[int]]:
        """Compute num_new_tokens[i] tokens of each sequence.

        `pending` is the previous step's sampled tokens, still on the device, and the row of each sequence (by
        seq_id) in them: a sequence listed there has PENDING_TOKEN as its last token, and computes the token
        read from the device instead.
        Returns (logits of the sequences whose last token was computed, which need a new token; their indices).
        """
        if all(n == 1 for n in num_new_tokens) and len(seqs) <= self.decode_sizes[-1]:
            return self._run_decode(seqs, pending)
        xp = self.xp
        input_ids: list[int] = []
        query_lens, seq_lens, tables, sample_rows, sample_idx, patches = [], [], [], [], [], []
        prefills_first = sorted(range(len(seqs)), key=lambda i: num_new_tokens[i] == 1)  # the layout attention wants
        for i in prefills_first:
            seq, n = seqs[i], num_new_tokens[i]
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(seq.block_table)
            if pending is not None and seq.seq_id in pending[1]:  # its one new token is the pending one
                patches.append((len(input_ids) - 1, pending[1][seq.seq_id]))
            if start + n == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_idx.append(i)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, xp)
        if self.pieces is not None and self.pieces.padded(len(input_ids)) is not None:
            logits = self.pieces.run(np.array(input_ids, dtype=np.int32), meta, sample_rows, patches,
                                     pending[0] if pending is not None else None)
            return (logits, sample_idx) if sample_rows else (None, [])
        ids = xp.asarray(np.array(input_ids, dtype=np.int32))
        self._take_pending(ids, patches, pending)
        hidden = self.model.forward(ids, meta, self.cache)
        if not sample_rows:
            return None, []
        return self.model.logits(hidden[xp.asarray(np.array(sample_rows))]), sample_idx

    def _take_pending(self, input_ids: Any, patches: list[tuple[int, int]],
                      pending: tuple[Any, dict[int, int]] | None) -> None:
        """Write pending tokens into the input ids on the device: input_ids[i] = pending tokens[row] per (i, row)."""
        if patches:
            where = self.xp.asarray(np.array(patches, dtype=np.int32).T)
            input_ids[where[0]] = pending[0][where[1]]

    def _run_decode(self, seqs: list[Any], pending: tuple[Any, dict[int, int]] | None) -> tuple[Any, list[int]]:
        """One token per sequence, padded to a graph batch size: replayed from its CUDA graph, or run eagerly."""
        batch = padded_size(len(seqs), self.decode_sizes)
        meta, max_seq_len = self.decode_inputs.fill(seqs, batch)
        if pending is not None:
            rows = pending[1]
            self._take_pending(self.decode_inputs.input_ids,
                               [(i, rows[s.seq_id]) for i, s in enumerate(seqs) if s.seq_id in rows], pending)
        if self.graphs is not None and batch in self.graphs.graphs:
            logits = self.graphs.replay(batch, max_seq_len)
        else:
            hidden = self.model.forward(self.decode_inputs.input_ids[:batch], meta, self.cache)
            logits = self.model.logits(hidden)
        rows = [i for i, seq in enumerate(seqs) if seq.num_computed_tokens + 1 == seq.num_tokens]
        if not rows:
            return None, []
        if len(rows) == len(seqs):
            return logits[:len(seqs)], rows
        return logits[self.xp.asarray(np.array(rows))], rows
