"""Iteration-level (continuous) batching, as in vLLM.

Every step the scheduler decides which sequences run and how many new tokens each computes:
1. Running sequences first, oldest first: one token for a decode, the rest of the prompt (up to the token
   budget) for a prefill. When a sequence needs a block and none is free, the most recently admitted running
   sequence is preempted: its blocks are freed and it goes back to the front of the queue to be recomputed
   later, so the oldest requests keep making progress.
2. Then waiting sequences, front first, while the sequence budget (max_num_seqs), the token budget
   (max_num_batched_tokens) and free blocks allow; none are admitted in a step that had to preempt.
A prompt longer than the token budget is computed in chunks over several steps (chunked prefill).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while self.blocks.blocks_missing(seq, seq.num_computed_tokens + n) > self.blocks.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # seq preempted itself: nothing younger is left to run
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        while self.waiting and not batch.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self.blocks.blocks_missing(seq, seq.num_computed_tokens + n) > self.blocks.num_free:
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and requeue it at the front; it recomputes prompt and outputs when readmitted."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and release its blocks (it may be running or still waiting)."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
