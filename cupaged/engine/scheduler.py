"""Iteration-level (continuous) batching, as in vLLM.

The unit of scheduling is a request's SequenceGroup (one sequence, or its n samples, or its beams): its
sequences run, are preempted and come back together. Every step the scheduler decides which sequences run
and how many new tokens each computes:
1. Running groups first, oldest first: one token per decoding sequence, the rest of a prompt (up to the token
   budget) for a prefill. When blocks run out, the most recently admitted running group is preempted: its
   blocks are freed and it goes back to the front of the queue to be recomputed later (the prefix cache often
   still holds its blocks), so the oldest requests keep making progress.
2. Then waiting groups, front first, while the sequence budget (max_num_seqs), the token budget
   (max_num_batched_tokens) and free blocks allow; none are admitted in a step that had to preempt. A
   newly admitted sequence first takes the longest prefix of its tokens found in the prefix cache.
A prompt longer than the token budget is computed in chunks over several steps (chunked prefill).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, before the forward

    def add(self, seq: Sequence, n: int, copies: list[tuple[int, int]]) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.block_copies += copies


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        # Live sequences of the waiting groups, for the engine's stats every step. Kept up to date where groups
        # join or leave the queue instead of counted (the queue can be long); nothing changes a waiting group.
        self.num_waiting_seqs = 0
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # tokens that admitted sequences found in the prefix cache

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)
        self.num_waiting_seqs += len(group.live())

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_running_seqs(self) -> int:
        return sum(len(g.live()) for g in self.running)

    def _plan(self, group: SequenceGroup, budget: int) -> list[tuple[Sequence, int, int]]:
        """How many tokens each live sequence of the group computes, within the token budget, and how many more
        blocks it needs for them."""
        plan = []
        for seq in group.live():
            if seq.num_tokens >= seq.token_limit:
                continue  # its last token is still on the device (async scheduling) and ends it: nothing to compute
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n > 0:
                plan.append((seq, n, self.blocks.blocks_missing(seq, seq.num_computed_tokens + n)))
                budget -= n
        return plan

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            group = self.running[i]
            plan = self._plan(group, budget)
            need = sum(missing for _, _, missing in plan)
            while need > self.blocks.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is group:
                    break
            if group.status != SequenceStatus.RUNNING:
                break  # the group preempted itself: nothing younger is left to run
            for seq, n, missing in plan:
                # Most steps a decoding sequence's token fits in its last block: nothing to allocate. (Preemption
                # and the copies-on-write of the plan's earlier sequences only free or unshare blocks, so a
                # sequence that needed no block still needs none.)
                batch.add(seq, n, self.blocks.allocate(seq, seq.num_computed_tokens + n) if missing else [])
                budget -= n
            i += 1
        if self.waiting and not batch.preempted and budget > 0:
            self._admit_waiting(batch, budget)
        return batch

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """Admit waiting groups, front first, while sequences, tokens and blocks allow."""
        num_running = self.num_running_seqs()  # counted once, then kept up to date: it is O(running)
        while self.waiting and budget > 0:
            group = self.waiting[0]
            live = group.live()
            if num_running + len(live) > self.max_num_seqs and self.running:
                break
            admitted = self._admit(group, budget)
            if admitted is None:
                break
            self.waiting.popleft()
            self.num_waiting_seqs -= len(live)
            group.status = SequenceStatus.RUNNING
            for seq in live:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            num_running += len(live)
            for seq, n, copies in admitted:
                batch.add(seq, n, copies)
                budget -= n

    def _admit(self, group: SequenceGroup, budget: int) -> list[tuple[Sequence, int, list]] | None:
        """Give a waiting group its cached prefixes and the blocks for its first tokens, or undo and return None."""
        taken: list[Sequence] = []
        admitted, hits = [], 0
        for seq in group.live():
            self.blocks.take_cached_prefix(seq, self.blocks.cached_prefix(seq))
            taken.append(seq)
            hits += seq.num_computed_tokens
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                continue
            if self.blocks.blocks_missing(seq, seq.num_computed_tokens + n) > self.blocks.num_free:
                for s in taken:
                    self.blocks.free(s)
                    s.num_computed_tokens = 0
                return None
            admitted.append((seq, n, self.blocks.allocate(seq, seq.num_computed_tokens + n)))
            budget -= n
        self.num_cached_tokens += hits
        return admitted

    def _preempt(self, group: SequenceGroup) -> None:
        """Free the group's blocks and requeue it at the front; it recomputes its tokens when readmitted."""
        self.running.remove(group)
        for seq in group.live():
            self.blocks.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.PREEMPTED
            seq.num_preemptions += 1
        group.status = SequenceStatus.PREEMPTED
        group.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(group)
        self.num_waiting_seqs += len(group.live())

    def finish_seq(self, seq: Sequence, reason: str) -> None:
        """One sequence of a group is done: release its blocks."""
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def finish(self, group: SequenceGroup, reason: str | None = None) -> None:
        """The whole group is done (or aborted): release every block it holds."""
        if group.status == SequenceStatus.RUNNING:
            self.running.remove(group)
        elif group in self.waiting:
            self.waiting.remove(group)
            self.num_waiting_seqs -= len(group.live())
        for seq in group.live():
            self.finish_seq(seq, reason or "abort")
        group.status = SequenceStatus.FINISHED
