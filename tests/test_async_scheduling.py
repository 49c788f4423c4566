"""Async scheduling (the engine launches step n+1 before it reads step n's tokens) gives the outputs of the
synchronous engine: for greedy and seeded requests, with stops found one step late, preemption, prefix sharing,
chunked prefill, and the requests that must run synchronously (n > 1, beams, logprobs, penalties) mixed in."""

from __future__ import annotations

import pytest

from cupaged import LLMEngine, SamplingParams, StructuredOutputsParams
from cupaged.engine.sequence import PENDING_TOKEN


def _requests(kinds: int) -> list[tuple[list[int], SamplingParams]]:
    """Requests of the first `kinds` kinds below: 4 run ahead, the others need the host's tokens each step."""
    stops = list(range(3, 900, 7))  # about one token in seven of the low ids ends a request early
    shared = [(11 * j) % 800 + 5 for j in range(40)]  # a common prefix of two full blocks and a half
    reqs = []
    for i in range(24):
        prompt = (shared if i % 3 == 0 else []) + [(13 * i + 5 * j) % 900 + 3 for j in range(4 + 9 * i % 50)]
        kind = i % kinds
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=12 + i)
        elif kind == 1:
            params = SamplingParams(temperature=0.9, seed=i, max_tokens=40, stop_token_ids=stops)
        elif kind == 2:
            params = SamplingParams(temperature=1.0, top_k=20, seed=i, max_tokens=30, min_tokens=5,
                                    stop_token_ids=stops)
        elif kind == 3:
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=25, stop=["e", "a "])
        elif kind == 4:
            params = SamplingParams(n=2, temperature=1.0, seed=i, max_tokens=15)
        elif kind == 5:
            params = SamplingParams(temperature=0, max_tokens=10, logprobs=2)
        elif kind == 6:
            params = SamplingParams(temperature=0.8, seed=i, max_tokens=20, repetition_penalty=1.3)
        else:
            params = SamplingParams(beam_width=2, max_tokens=8)
        reqs.append((prompt, params))
    return reqs


def _run(path, async_scheduling: bool, kinds: int, **engine_options) -> tuple[dict, int]:
    engine = LLMEngine(str(path), device="cpu", async_scheduling=async_scheduling, **engine_options)
    return _run_requests(engine, _requests(kinds)), engine.stats.num_steps_run_ahead


@pytest.mark.parametrize("kinds", [4, 8])
@pytest.mark.parametrize("options", [
    dict(num_kv_blocks=24, max_num_seqs=8, max_num_batched_tokens=64),  # preemption and chunked prefill
    dict(num_kv_blocks=400, max_num_seqs=32),
])
def test_async_outputs_equal_sync_outputs(checkpoints, options, kinds) -> None:
    path = checkpoints("qwen3-tiny")
    sync, sync_ahead = _run(path, False, kinds, **options)
    run_ahead, ahead = _run(path, True, kinds, **options)
    assert sync_ahead == 0 and ahead > (10 if kinds == 4 else 0)  # it ran ahead; the synchronous engine never does
    assert len(sync) == 24
    assert run_ahead == sync
    stopped = [r for r in sync.values() if r[0][2] == "stop"]
    assert len(stopped) >= 3  # stops that are found one step late were exercised


def test_nothing_is_computed_past_the_last_token(checkpoints) -> None:
    """When a request's pending token is its last (max_tokens), its next step is not scheduled: the engine
    computes what the synchronous engine computes, and draws no extra random numbers."""
    engine = LLMEngine(str(checkpoints("qwen3-tiny")), device="cpu", num_kv_blocks=8, block_size=16)
    engine.add_request("r", list(range(3, 19)), SamplingParams(temperature=0, max_tokens=16))
    out = []
    while engine.has_unfinished_requests():
        out += engine.step()
    assert out[-1].finished and out[-1].outputs[0].finish_reason == "length"
    assert len(out[-1].outputs[0].token_ids) == 16
    assert engine.stats.num_computed_tokens == 16 + 16 - 1


def test_abort_while_a_token_is_in_flight(checkpoints) -> None:
    engine = LLMEngine(str(checkpoints("qwen3-tiny")), device="cpu", num_kv_blocks=64)
    for i in range(3):
        engine.add_request(str(i), [5 + i, 9, 13, 17], SamplingParams(temperature=0, max_tokens=20))
    for _ in range(4):
        engine.step()
    assert engine.core._in_flight is not None and any(s.request_id == "1" for s in engine.core._in_flight.seqs)
    assert engine.abort("1")
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    aborted = outs["1"][-1]
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert PENDING_TOKEN not in aborted.outputs[0].token_ids and len(aborted.outputs[0].token_ids) < 20
    assert [len(outs[r][-1].outputs[0].token_ids) for r in "02"] == [20, 20]
    assert engine.core.blocks.num_used == 0


ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 3, "maxItems": 6}
OBJECT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                           "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]},
                                                    "minItems": 1, "maxItems": 3}},
          "required": ["name", "tags"], "additionalProperties": False}


def _constrained_requests(kinds: int) -> list[tuple[list[int], SamplingParams]]:
    """Requests of the first `kinds` kinds below: constrained ones of every way to sample (greedy, seeded with
    temperature, min-p, top-k and top-p, min_tokens, stop strings), unconstrained ones in the same steps, then
    constrained n > 1 and beams (which run synchronously); a third share a prefix (prefix caching)."""
    shared = [(7 * j) % 800 + 5 for j in range(40)]
    reqs = []
    for i in range(18):
        prompt = (shared if i % 3 == 0 else []) + [(17 * i + 3 * j) % 900 + 3 for j in range(5 + 7 * i % 30)]
        constraint = StructuredOutputsParams(json=[ARRAY, OBJECT][i % 2]) if i % 5 != 4 else \
            StructuredOutputsParams(regex=r"[a-c]{2,8}-[0-9]{2,4}")
        seeded = dict(temperature=1.0, seed=i, max_tokens=60, structured_outputs=constraint)
        kind = i % kinds
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=constraint)
        elif kind == 1:
            params = SamplingParams(**seeded)
        elif kind == 2:
            params = SamplingParams(**{**seeded, "temperature": 0.8}, min_p=0.05)
        elif kind == 3:
            params = SamplingParams(**seeded, top_k=30, top_p=0.9)
        elif kind == 4:
            params = SamplingParams(**seeded, min_tokens=4)
        elif kind == 5:
            params = SamplingParams(**seeded, stop=[",", "b-"])
        elif kind == 6:
            params = SamplingParams(temperature=0.9, seed=i, max_tokens=30)
        elif kind == 7:
            params = SamplingParams(**{**seeded, "max_tokens": 40}, n=2)
        else:
            params = SamplingParams(beam_width=2, max_tokens=12,
                                    structured_outputs=StructuredOutputsParams(choice=["red", "green", "blue"]))
        reqs.append((prompt, params))
    return reqs


@pytest.mark.parametrize("kinds", [7, 9])
@pytest.mark.parametrize("options", [
    dict(num_kv_blocks=30, max_num_seqs=8, max_num_batched_tokens=64, block_size=8),  # preemption, chunked prefill
    dict(num_kv_blocks=400, max_num_seqs=32),
])
def test_async_constrained_outputs_equal_sync_outputs(checkpoints, options, kinds) -> None:
    """A constrained request's step runs ahead (its forward is queued before the previous step's tokens are
    processed; its sampling waits for its grammar's mask) and gives the synchronous engine's tokens."""
    path = checkpoints("qwen3-tiny")
    results = {}
    for async_scheduling in (False, True):
        engine = LLMEngine(str(path), device="cpu", async_scheduling=async_scheduling, **options)
        results[async_scheduling] = _run_requests(engine, _constrained_requests(kinds))
        assert engine.core.timings["masks"] > 0 and engine.core.num_masked_steps > 10
        assert options["num_kv_blocks"] > 100 or engine.stats.num_preemptions > 0
        if async_scheduling:
            assert engine.stats.num_steps_run_ahead > (20 if kinds == 7 else 0)
    sync, run_ahead = results[False], results[True]
    assert len(sync) == 18 and run_ahead == sync
    completions = [c for r in sync.values() for c in r]
    assert sum(c[2] == "stop" for c in completions) >= 8
    assert any(c[2] == "stop" and c[1].endswith("]") for c in completions)  # a complete JSON array


def _run_requests(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> dict:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    done = {}
    for _ in range(3000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            for c in out.outputs:
                assert PENDING_TOKEN not in c.token_ids
            if out.finished:
                done[out.request_id] = [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs]
    assert not engine.has_unfinished_requests() and engine.core.blocks.num_used == 0
    return done
