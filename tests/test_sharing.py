"""Prefix caching, parallel sampling, best_of and beam search in the engine (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FIXTURES

from cupaged import LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def path(checkpoints):
    return str(checkpoints("qwen3-tiny"))


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}-{id(prompt)}", prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}-{id(p)}"] for i, (p, _) in enumerate(requests)]


def test_prefix_caching_gives_the_same_outputs(path) -> None:
    rng = np.random.default_rng(0)
    system = rng.integers(0, 1000, 70).tolist()
    requests = [(system + rng.integers(0, 1000, int(rng.integers(1, 30))).tolist(),
                 SamplingParams(temperature=0.7, seed=i, max_tokens=20, ignore_eos=True)) for i in range(10)]
    with_cache = run(LLMEngine(path, device="cpu", num_kv_blocks=40, max_num_seqs=4), requests)
    without = run(LLMEngine(path, device="cpu", num_kv_blocks=40, max_num_seqs=4, enable_prefix_caching=False),
                  requests)
    assert [o.outputs[0].token_ids for o in with_cache] == [o.outputs[0].token_ids for o in without]


def test_shared_prefix_is_computed_once(path) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=64)
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, 1000, 100).tolist()
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    run(engine, [(prefix + [1, 2, 3], params)])
    before = engine.stats.num_computed_tokens
    run(engine, [(prefix + [4, 5, 6, 7], params)])
    # 100 shared tokens: 6 full blocks of 16 come from the cache; the rest of the prompt and the decodes are computed
    assert engine.stats.num_cached_tokens == 96
    assert engine.stats.num_computed_tokens - before == (104 - 96) + 4


def test_parallel_sampling_computes_the_prompt_once(path) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=64, enable_prefix_caching=False)
    prompt = list(range(1, 41))
    out = run(engine, [(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))])[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) == 3
    # the prompt once, then each sample's tokens (the last sampled token is never fed back)
    assert engine.stats.num_computed_tokens == 40 + 3 * 9
    again = run(LLMEngine(path, device="cpu", num_kv_blocks=64),
                [(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))])[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs], "seeded n>1 is reproducible"


def test_parallel_samples_share_blocks(path) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=64, enable_prefix_caching=False)
    engine.add_request("p", list(range(1, 41)), SamplingParams(n=4, temperature=1.0, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    s = engine.stats
    assert s.num_running == 4
    assert s.kv_blocks_used < s.kv_blocks_unshared  # the prompt's full blocks are held once


def test_best_of_returns_the_most_likely(path) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=64)
    out = run(engine, [([5, 6, 7], SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=8,
                                                  ignore_eos=True))])[0]
    assert len(out.outputs) == 2
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob
    every = run(LLMEngine(path, device="cpu", num_kv_blocks=64),
                [([5, 6, 7], SamplingParams(n=5, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True,
                                                  logprobs=0))])[0]
    best = sorted(c.cumulative_logprob for c in every.outputs)[-2:][::-1]
    assert [c.cumulative_logprob for c in out.outputs] == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("width", [2, 3, 4])
def test_beam_search_equals_transformers_fixture(checkpoints, width: int) -> None:
    """Reference beams from transformers' generate(num_beams=...), made by tools/make_beam_fixtures.py."""
    fixture = np.load(FIXTURES / "beam_search" / f"qwen3-tiny-w{width}.npz")
    path = str(checkpoints("qwen3-tiny"))
    engine = LLMEngine(path, device="cpu", num_kv_blocks=128, max_num_seqs=64)
    n = len([k for k in fixture.files if k.startswith("prompt_")])
    params = SamplingParams(beam_width=width, max_tokens=int(fixture["max_new_tokens"]),
                            length_penalty=float(fixture["length_penalty"]),
                            early_stopping=bool(fixture["early_stopping"]),
                            stop_token_ids=fixture["stop_token_ids"].tolist())
    outs = run(engine, [(fixture[f"prompt_{i}"].tolist(), params) for i in range(n)])
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == fixture[f"output_{i}"].tolist(), f"prompt {i}"
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks


def test_beams_share_blocks(path) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=128, enable_prefix_caching=False)
    engine.add_request("b", list(range(1, 60)), SamplingParams(beam_width=4, max_tokens=30, ignore_eos=True))
    for _ in range(8):
        engine.step()
    s = engine.stats
    assert s.num_running == 4 and s.kv_blocks_used < s.kv_blocks_unshared


def test_sharing_requests_that_cannot_fit_are_rejected(path) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=8)
    with pytest.raises(ValueError, match="need more KV blocks"):
        engine.add_request("x", list(range(1, 40)), SamplingParams(n=6, max_tokens=60))
