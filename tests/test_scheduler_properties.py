"""Property tests of the block manager and the scheduler, with the model replaced by a token counter.

Random arrivals, prompt and output lengths, budgets and aborts; after every step: no block has two owners,
reference counts match owners, free + used = total, every running sequence has the blocks its tokens need,
and in the end every request finishes exactly once with the tokens it asked for.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.scheduler import Scheduler
from cupaged.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from cupaged.sampling_params import SamplingParams


def check_invariants(blocks: BlockManager, sched: Scheduler, shared: bool = False) -> None:
    """Refcounts equal owners; without prefix caching or forks no block has two owners."""
    owners: dict[int, int] = {}
    for group in sched.running:
        for seq in group.live():
            assert seq.status == SequenceStatus.RUNNING
            assert len(set(seq.block_table)) == len(seq.block_table)
            for b in seq.block_table:
                owners[b] = owners.get(b, 0) + 1
            assert len(seq.block_table) >= blocks.blocks_for(seq.num_computed_tokens)
    for group in sched.waiting:
        for seq in group.live():
            assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
            assert seq.block_table == [] and seq.num_computed_tokens == 0
    if not shared:
        assert all(n == 1 for n in owners.values()), "a block has two owners"
    assert set(owners).isdisjoint(blocks.free_blocks)
    assert len(set(blocks.free_blocks)) == len(blocks.free_blocks)
    for b in range(blocks.num_blocks):
        assert blocks.ref_counts[b] == owners.get(b, 0)
    assert blocks.num_free + len(owners) == blocks.num_blocks


requests = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40), st.integers(0, 30)), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(requests=requests, num_blocks=st.integers(8, 40), block_size=st.sampled_from([4, 8, 16]),
       max_num_seqs=st.integers(1, 8), token_budget=st.integers(16, 128), abort_every=st.integers(0, 7),
       seed=st.integers(0, 2**16))
def test_scheduler_invariants(requests, num_blocks, block_size, max_num_seqs, token_budget, abort_every, seed):
    import random

    rnd = random.Random(seed)
    blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs, token_budget)
    capacity = num_blocks * block_size
    pending = []
    for i, (prompt_len, out_len, arrival) in enumerate(requests):
        prompt_len = min(prompt_len, capacity - 1)
        out_len = min(out_len, capacity - prompt_len)  # the engine caps length at the cache's capacity
        seq = Sequence(str(i), [1] * prompt_len, SamplingParams(max_tokens=out_len))
        pending.append((arrival, seq, out_len))
    pending.sort(key=lambda r: r[0])
    finished: list[str] = []
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= step:
            seq = pending.pop(0)[1]
            sched.add(SequenceGroup(seq.request_id, [seq]))
        batch = sched.schedule()
        check_invariants(blocks, sched)
        assert sum(batch.num_new_tokens) <= token_budget
        assert sched.num_running_seqs() <= max_num_seqs
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
        if sched.has_unfinished() and not sched.running:
            raise AssertionError("nothing runs although requests wait: the scheduler is stuck")
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(rnd.randrange(100))
                if seq.num_output_tokens >= seq.params.max_tokens:
                    group = next(g for g in sched.running if seq in g.seqs)
                    sched.finish_seq(seq, "length")
                    sched.finish(group)
                    finished.append(seq.request_id)
        if abort_every and step % abort_every == abort_every - 1 and sched.running:
            victim = rnd.choice(sched.running + list(sched.waiting))
            sched.finish(victim, "abort")
            finished.append(victim.request_id)
        check_invariants(blocks, sched)
        step += 1
        assert step < 10_000
    assert sorted(finished, key=int) == [str(i) for i in range(len(requests))], "a request was lost or duplicated"
    assert blocks.num_free == num_blocks


def test_preemption_requeues_youngest_first() -> None:
    """When blocks run out the most recently admitted request is preempted and rejoins the queue's front."""
    blocks = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [Sequence(str(i), [1] * 6, SamplingParams(max_tokens=20)) for i in range(3)]
    for s in seqs:
        sched.add(SequenceGroup(s.request_id, [s]))
    preempted = []
    for _ in range(40):
        batch = sched.schedule()
        preempted += batch.preempted
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(0)
        if preempted:
            break
    assert preempted and preempted[0].seqs == [seqs[2]]
    assert sched.waiting[0].seqs == [seqs[2]] and seqs[2].status == SequenceStatus.PREEMPTED
    check_invariants(blocks, sched)
