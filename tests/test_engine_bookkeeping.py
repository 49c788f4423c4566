"""Counts the engine keeps up to date instead of recounting every step agree with a recount after every step:
with preemption, n > 1 samples that finish at different times, and aborts of waiting and running requests."""

from __future__ import annotations

from cupaged import LLMEngine, SamplingParams


def test_waiting_count_matches_the_queue(checkpoints) -> None:
    engine = LLMEngine(str(checkpoints("qwen3-tiny")), device="cpu", num_kv_blocks=16, max_num_seqs=6,
                       max_num_batched_tokens=64)
    for i in range(16):
        params = SamplingParams(n=3 if i % 2 else 1, temperature=1.0, seed=i, max_tokens=30, stop=["e"])
        engine.add_request(str(i), [(7 * i + j) % 900 + 3 for j in range(8 + 5 * i % 40)], params)
    partly_finished_waited = False  # a preempted group with a finished sample: waiting, but not all live
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        waiting = engine.core.scheduler.waiting
        assert engine.stats.num_waiting == sum(len(g.live()) for g in waiting) == engine.core.scheduler.num_waiting_seqs
        assert engine.stats.num_running == engine.core.scheduler.num_running_seqs()
        partly_finished_waited |= any(len(g.live()) < len(g.seqs) for g in waiting)
        step += 1
        if step % 7 == 0:  # the next step reports it
            engine.abort(str(step // 7 * 3 % 16))
            assert engine.core.scheduler.num_waiting_seqs == sum(len(g.live()) for g in engine.core.scheduler.waiting)
    assert engine.stats.num_preemptions > 0 and partly_finished_waited
    assert engine.core.scheduler.num_waiting_seqs == 0
