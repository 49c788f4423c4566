"""Helpers shared by the tests: checkpoints from tools/, and running the model on a mixed paged batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cupaged.checkpoint import open_checkpoint
from cupaged.device import to_numpy
from cupaged.kv_cache import AttentionMetadata, KVCache
from cupaged.models.llama import LlamaModel, expected_weights

FIXTURES = Path(__file__).parent / "fixtures"
TINY_PRESETS = ["llama-tiny", "llama3-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny"]


def load_model(path: Path, dtype: str, ops: ModuleType, xp: ModuleType) -> LlamaModel:
    config, _, read = open_checkpoint(path)
    return LlamaModel(config, read(expected_weights(config), dtype), ops, xp)


def teacher_forced_logits(model: LlamaModel, sequences: list[np.ndarray], prompt_lens: list[int],
                          block_size: int = 16, seed: int = 0, kv_cache_dtype: str = "auto") -> list[np.ndarray]:
    """Logits at every position of each sequence, computed through the paged cache the way the engine does:

    step 1 prefills the first half of the prompts; step 2 prefills the other half while the first half
    decodes (a mixed batch); then every sequence decodes its remaining tokens one per step.
    Physical blocks are shuffled so block tables are not contiguous.
    """
    xp, config = model.xp, model.config
    rng = np.random.default_rng(seed)
    blocks_per_seq = [-(-len(s) // block_size) for s in sequences]
    physical = rng.permutation(sum(blocks_per_seq) + 3)
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append([int(b) for b in physical[start:start + n]])
        start += n
    cache = KVCache(config, len(physical), block_size, model.embed.dtype, xp, kv_cache_dtype)
    # poison: any read of a slot never written shows up as NaN (an FP8 cache: NaN codes)
    cache.k[...] = 0x7F if cache.fp8 else xp.nan
    cache.v[...] = 0x7F if cache.fp8 else xp.nan
    done = [0] * len(sequences)
    out: list[list[np.ndarray]] = [[] for _ in sequences]
    half = (len(sequences) + 1) // 2
    steps = [list(range(half)), list(range(len(sequences)))]
    while any(done[i] < len(s) for i, s in enumerate(sequences)):
        active = steps.pop(0) if steps else list(range(len(sequences)))
        active = [i for i in active if done[i] < len(sequences[i])]
        # prefills (first visit: the whole prompt) first, then single-token decodes
        new = {i: (prompt_lens[i] if done[i] == 0 else 1) for i in active}
        active.sort(key=lambda i: new[i] == 1)
        meta = AttentionMetadata.build([new[i] for i in active], [done[i] + new[i] for i in active],
                                       [tables[i] for i in active], block_size, xp)
        ids = np.concatenate([sequences[i][done[i]:done[i] + new[i]] for i in active]).astype(np.int32)
        logits = to_numpy(model.logits(model.forward(xp.asarray(ids), meta, cache)))
        row = 0
        for i in active:
            out[i].append(logits[row:row + new[i]])
            row += new[i]
            done[i] += new[i]
    return [np.concatenate(chunks) for chunks in out]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference over the largest magnitude of the expected values."""
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / np.max(np.abs(expected)))


def run_to_end(engine, limit: int = 2000) -> dict:
    """Step an LLMEngine until nothing is left (at most `limit` steps: never a hang); the finished outputs by
    request id, each request finished once."""
    import pytest

    done = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done, "a request finished twice"
                done[out.request_id] = out
    pytest.fail("the engine did not finish its requests")


def shuffled_block_tables(rng: np.random.Generator, seq_lens: list[int], block_size: int,
                          num_blocks: int) -> list[list[int]]:
    """Block tables for sequences of seq_lens tokens, their blocks drawn from a shuffled range(num_blocks): kernels
    must follow the table, not assume neighbouring blocks."""
    physical = rng.permutation(num_blocks)
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        tables.append(physical[used:used + n].tolist())
        used += n
    return tables


@contextmanager
def preempted_requests() -> Iterator[set[str]]:
    """The ids of the requests the scheduler preempts while the block runs (every engine of the process).

    Tests that compare two engines' tokens on the GPU leave these out: a preempted request recomputes its tokens
    in a prefill, whose bf16 K/V differ in their last bits from the decode steps' (other GEMM shapes), and two
    engines may preempt different requests (async scheduling holds a stopping sequence's blocks a step longer)."""
    from cupaged.engine.scheduler import Scheduler

    found: set[str] = set()
    original = Scheduler._preempt

    def spy(self: Scheduler, group: Any) -> None:
        found.add(group.request_id)
        original(self, group)

    Scheduler._preempt = spy
    try:
        yield found
    finally:
        Scheduler._preempt = original
