"""Communicators: how the ranks of a tensor-parallel model exchange activations.

`Communicator` is the interface the sharded forward pass uses (models/llama.py): a sum all-reduce after each
row-parallel projection and the vocabulary-parallel embedding, an all-gather of the vocabulary-parallel logits.
`ThreadGroup` is the CPU's implementation: the ranks are threads of one process (NumPy releases the GIL in its
matmuls, so they do run side by side) that meet at a barrier and exchange arrays through shared slots. A GPU
implementation is a communicator over NCCL with one process per GPU; the forward pass does not change.

Every rank sums the same arrays in the same order (rank 0 + rank 1 + ...), so all ranks hold bit-identical
results and stay in step: a rank whose activations drifted from the others' would sample differently.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol, TypeVar

from cupaged.device import array_module

logger = logging.getLogger(__name__)

Array = Any
T = TypeVar("T")


class Communicator(Protocol):
    """One rank's view of its group. Every rank must make the same calls in the same order (collectives)."""

    rank: int
    world_size: int

    def all_reduce(self, x: Array) -> Array:
        """Sum `x` over the ranks, in place; returns x."""
        ...

    def all_gather(self, x: Array, axis: int) -> Array:
        """Every rank's `x` concatenated along `axis`, in rank order (a new array)."""
        ...


class RankFailed(RuntimeError):
    """Another rank failed in the middle of a collective, so this one could not finish it."""


class ThreadGroup:
    """`world_size` ranks as threads of this process, and their communicators (`communicators[rank]`).

    `run(fn)` calls fn(rank) on every rank at once, each in its own thread, and returns the results in rank order.
    If a rank raises, the barrier is broken so that the others leave their collectives instead of waiting for it
    forever; `run` raises the first rank's own error (not the others' RankFailed) and mends the barrier, so the
    group can run the next step.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: list[Array] = [None] * world_size
        self._pool = ThreadPoolExecutor(world_size, thread_name_prefix="cupaged-rank")
        self.communicators = [ThreadCommunicator(self, rank) for rank in range(world_size)]

    def run(self, fn: Callable[[int], T]) -> list[T]:
        def guarded(rank: int) -> T:
            try:
                return fn(rank)
            except BaseException:
                self._barrier.abort()  # wakes the ranks waiting for this one: they raise RankFailed
                raise

        futures = [self._pool.submit(guarded, rank) for rank in range(self.world_size)]
        errors = [f.exception() for f in futures]
        if any(e is not None for e in errors):
            self._barrier.reset()
            self._slots = [None] * self.world_size
            raise next((e for e in errors if e is not None and not isinstance(e, RankFailed)),
                       next(e for e in errors if e is not None))
        return [f.result() for f in futures]

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise RankFailed("another tensor-parallel rank failed during a collective") from None

    def _exchange(self, rank: int, x: Array, combine: Callable[[list[Array]], Array]) -> Array:
        """Publish x, let every rank combine all slots, and wait until all have done so (a slot is read by the
        others until then, so no rank may overwrite its array or slot before)."""
        self._slots[rank] = x
        self._wait()
        result = combine(self._slots)
        self._wait()
        return result


class ThreadCommunicator:
    """Rank `rank` of a ThreadGroup."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def all_reduce(self, x: Array) -> Array:
        xp = array_module(x)
        # bf16 / fp16 partial sums are added in float32 and rounded once, as tp = 1's GEMM rounds its sum once
        acc = xp.float32 if x.dtype.itemsize < 4 else x.dtype

        def total(slots: list[Array]) -> Array:
            s = slots[0].astype(acc)  # a copy: slots[0] may be this rank's own x
            for other in slots[1:]:
                s += other
            return s

        x[...] = self.group._exchange(self.rank, x, total)
        return x

    def all_gather(self, x: Array, axis: int) -> Array:
        xp = array_module(x)
        return self.group._exchange(self.rank, x, lambda slots: xp.concatenate(slots, axis=axis))
