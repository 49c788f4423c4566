"""Steps that mix prefills and decodes, replayed from CUDA graphs except for attention (vLLM's piecewise graphs).

A decode-only step has one shape per batch size and is captured whole (decode_graphs.py). A step with prefills
has any number of tokens, and its attention depends on how they split into sequences (the flash prefill kernel's
work list, the decode kernel's plan): that part cannot be frozen into a graph, but everything else can, since it
treats tokens as independent rows. So such a step is padded to a token count from a fixed list, and each layer
boundary is one captured graph per count:

    piece 0:  embed, layer 0 up to attention (norm, q|k|v, rotary, K/V write)
    piece j:  layer j-1 after attention (o-proj, norm, MLP), layer j up to attention
    piece L:  layer L-1 after attention, the final norm, the LM head on the rows to sample

and attention runs eagerly between the pieces, on the step's real tokens only, with its own metadata. A step then
costs L + 1 graph launches and L attention calls instead of ~15 launches a layer.

Why this design: it keeps the one forward pass (models/llama.py's attention_inputs / attention_outputs are the
pieces' bodies), needs no kernel change, and pads only the row-wise work (the attention kernels see no padding).
The pieces talk through static buffers shared by every size (views of their first rows): token ids, positions and
slots in; q and attention output between pieces; the residual stream; the logits out. Padding rows take token 0
at position 0 with slot -1 (no K/V write); their rows of every buffer hold throwaway values that never reach a real
row (every op outside attention is row-wise).

`capture=False` runs the same pieces on the same padded shapes eagerly (`enforce_eager`), so graphs and eager
give the same tokens; on the CPU the engine runs its plain forward instead.
"""

from __future__ import annotations

import logging
import time
from types import ModuleType
from typing import Any

import numpy as np

from cupaged.kv_cache import AttentionMetadata, KVCache
from cupaged.progress import progress

logger = logging.getLogger(__name__)

Array = Any


def token_sizes(max_tokens: int) -> list[int]:
    """The padded token counts: powers of two up to 256, then steps of at most half the size below (at most 1.5x
    padding), up to and including max_tokens."""
    sizes, size = [], 16
    while size < max_tokens:
        sizes.append(size)
        size = size * 2 if size < 256 else size + size // 2 if size & (size - 1) == 0 else size * 4 // 3
    return sizes + [max_tokens]


class PiecewiseSteps:
    def __init__(self, model: Any, cache: KVCache, max_tokens: int, max_seqs: int, xp: ModuleType, capture: bool):
        c = model.config
        self.model, self.cache, self.xp = model, cache, xp
        self.sizes = token_sizes(max_tokens)
        self.max_seqs = max_seqs
        self.num_layers = c.num_layers
        top = self.sizes[-1]
        # rows of token ids, positions, slots (padding: 0, 0, -1), then the rows to sample
        self.inputs = xp.zeros((3, top), dtype=xp.int32)
        self.inputs[2] = -1
        self.sample_rows = xp.zeros(max_seqs, dtype=xp.int32)
        dtype = model.embed.dtype
        self.residual = xp.zeros((top, c.hidden_size), dtype=xp.float32)
        self.q = xp.zeros((top, c.num_heads, c.head_dim), dtype=dtype)
        self.attn = xp.zeros((top, c.num_heads, c.head_dim), dtype=dtype)
        self.logits = xp.zeros((max_seqs, c.vocab_size), dtype=xp.float32)
        self.graphs: dict[int, list[Any]] = {}
        self.replays = 0
        if capture:
            self._capture()

    def padded(self, tokens: int) -> int | None:
        """The size that holds `tokens`, or None if it is larger than the largest."""
        return next((s for s in self.sizes if s >= tokens), None)

    def _piece(self, j: int, size: int) -> None:
        """The work between attention j - 1 and attention j, for `size` rows of the static buffers."""
        m, L = self.model, self.num_layers
        residual = self.residual[:size]
        if j == 0:
            hidden, res = m.embed_tokens(self.inputs[0, :size]), None
        else:
            hidden, res = m.attention_outputs(j - 1, self.attn[:size], residual)
        if j < L:
            q, res = m.attention_inputs(j, hidden, res, self.inputs[1, :size], self.inputs[2, :size], self.cache)
            self.q[:size] = q
            if res is not residual:  # the GPU's norms update the residual in place; the reference returns a new one
                residual[...] = res
        else:
            rows = min(size, self.max_seqs)
            h = m.final_norm_of(hidden, res)[self.sample_rows[:rows]]
            m.logits(h, out=self.logits[:rows])

    def _capture(self) -> None:
        import cupy

        from cupaged.layers import cublas

        self.pool = cupy.cuda.MemoryPool()  # the pieces' intermediates; the buffers above are not from it
        t0 = time.perf_counter()
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream, cupy.cuda.using_allocator(self.pool.malloc), \
                progress("capturing piecewise CUDA graphs", len(self.sizes)) as bar:
            cublas.handle().bind(stream.ptr)
            for size in reversed(self.sizes):  # the largest first: the smaller ones reuse its intermediates
                pieces = []
                for j in range(self.num_layers + 1):
                    self._piece(j, size)  # compiles the kernels, fills the pool with what the capture asks for
                    stream.begin_capture()
                    self._piece(j, size)
                    pieces.append(stream.end_capture())
                self.graphs[size] = pieces
                bar.update()
            stream.synchronize()
        logger.info("captured %d x %d piecewise CUDA graphs (%d..%d tokens) in %.1fs", len(self.sizes),
                    self.num_layers + 1, self.sizes[0], self.sizes[-1], time.perf_counter() - t0)

    def run(self, input_ids: np.ndarray, meta: AttentionMetadata, sample_rows: list[int],
            patches: list[tuple[int, int]], pending: Array | None) -> Array:
        """Logits [len(sample_rows), vocab] of one step: input_ids (host) described by meta, then token
        `pending[row]` written at position i for each (i, row) in patches (tokens sampled on the device)."""
        xp, n = self.xp, len(input_ids)
        size = self.padded(n)
        self.inputs[0, :n] = xp.asarray(input_ids)
        self.inputs[1, :n] = meta.positions
        self.inputs[2, :n] = meta.slot_mapping
        if size > n:
            self.inputs[:, n:size] = xp.asarray(np.array([[0], [0], [-1]], dtype=np.int32))
        if patches:
            where = xp.asarray(np.array(patches, dtype=np.int32).T)
            self.inputs[0, where[0]] = pending[where[1]]
        rows = np.zeros(min(size, self.max_seqs), dtype=np.int32)  # the LM head's rows: real ones, then row 0
        rows[:len(sample_rows)] = sample_rows
        self.sample_rows[:len(rows)] = xp.asarray(rows)
        graphs = self.graphs.get(size)
        for j in range(self.num_layers + 1):
            if graphs is not None:
                graphs[j].launch()
            else:
                self._piece(j, size)
            if j < self.num_layers:
                self.model.ops.paged_attention(self.q[:n], self.cache.k[j], self.cache.v[j], meta, self.model.scale,
                                               out=self.attn[:n], kv_scales=self.cache.scales(j))
        self.replays += graphs is not None
        return self.logits[:len(sample_rows)]
