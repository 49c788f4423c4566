"""Sampling distributions against their definitions, by counting many seeded draws."""

from __future__ import annotations

import numpy as np
import pytest

from cupaged.engine.sequence import Sequence
from cupaged.engine.sampling import sample, sampling_metadata
from cupaged.sampler import apply_penalties
from cupaged.sampling_params import SamplingParams

V = 12
DRAWS = 20_000


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def empirical(logits: np.ndarray, params: SamplingParams, seed: int = 0) -> np.ndarray:
    """Frequencies of each token over DRAWS independent draws (one batch of DRAWS identical rows)."""
    seqs = [Sequence(str(i), [0], params) for i in range(DRAWS)]
    batch = np.tile(logits.astype(np.float32), (DRAWS, 1))
    tokens = sample(batch, seqs, eos_ids=[], rng=np.random.default_rng(seed))
    return np.bincount(tokens, minlength=V) / DRAWS


def assert_matches(freq: np.ndarray, expected: np.ndarray) -> None:
    """Every token's frequency within 5 standard errors of its probability; zero-probability tokens never drawn."""
    assert np.all(freq[expected == 0] == 0), "a filtered-out token was sampled"
    sigma = np.sqrt(expected * (1 - expected) / DRAWS)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), (freq, expected)


LOGITS = np.random.default_rng(42).normal(0, 1.5, V)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature(temperature: float) -> None:
    assert_matches(empirical(LOGITS, SamplingParams(temperature=temperature)), softmax(LOGITS / temperature))


def test_top_k() -> None:
    expected = softmax(LOGITS)
    expected[np.argsort(-LOGITS)[4:]] = 0
    assert_matches(empirical(LOGITS, SamplingParams(top_k=4)), expected / expected.sum())


def test_top_p() -> None:
    probs = softmax(LOGITS)
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    expected = np.zeros(V)
    keep = order[mass_before < 0.7]  # smallest set of top tokens whose mass reaches 0.7
    expected[keep] = probs[keep]
    assert probs[keep].sum() >= 0.7 and probs[keep[:-1]].sum() < 0.7
    assert_matches(empirical(LOGITS, SamplingParams(top_p=0.7)), expected / expected.sum())


def test_min_p() -> None:
    probs = softmax(LOGITS)
    expected = np.where(probs >= 0.3 * probs.max(), probs, 0)
    assert_matches(empirical(LOGITS, SamplingParams(min_p=0.3)), expected / expected.sum())


def test_filters_combine_with_temperature() -> None:
    probs = softmax(LOGITS / 0.7)
    expected = np.zeros(V)
    top = np.argsort(-probs)[:6]
    expected[top] = probs[top]
    expected = np.where(expected >= 0.1 * expected.max(), expected, 0)
    freq = empirical(LOGITS, SamplingParams(temperature=0.7, top_k=6, min_p=0.1))
    assert_matches(freq, expected / expected.sum())


def test_greedy_is_argmax() -> None:
    seqs = [Sequence("g", [0], SamplingParams(temperature=0))]
    assert sample(LOGITS[None].astype(np.float32), seqs, [], np.random.default_rng(0)) == [int(np.argmax(LOGITS))]


@pytest.mark.parametrize("first", [dict(), dict(top_k=6), dict(top_p=0.9, min_p=0.01)])
def test_seeded_rows_do_not_depend_on_neighbours(first: dict) -> None:
    """Nor on whether a neighbour filters by top-k / top-p (a sort of its row, which the others skip)."""
    def seeded_draws(batch: int, neighbours: dict) -> list[int]:
        seqs = [Sequence(str(i), [0], SamplingParams(seed=5, **first) if i == 0 else SamplingParams(**neighbours))
                for i in range(batch)]
        logits = np.tile(LOGITS.astype(np.float32), (batch, 1))
        other_rng = np.random.default_rng(batch)
        return [sample(logits, seqs, [], other_rng)[0] for _ in range(30)]

    alone = seeded_draws(1, {})
    assert len(set(alone)) > 3
    for neighbours in (dict(), dict(top_k=3), dict(top_p=0.5), dict(temperature=0)):
        assert seeded_draws(4, neighbours) == alone and seeded_draws(17, neighbours) == alone, neighbours


def test_penalties() -> None:
    logits = np.array([[2.0, -2.0, 1.0, 0.5]], np.float32)
    seq = Sequence("p", [0, 1], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                                                      frequency_penalty=0.25, min_tokens=3, stop_token_ids=[3]))
    seq.token_ids += [2, 2]  # two output tokens
    out = apply_penalties(logits.copy(), sampling_metadata([seq], [], np.random.default_rng(0)).penalties)
    # token 0 (prompt, positive): /2; token 1 (prompt, negative): *2;
    # token 2 (output twice, positive): /2 then -0.5 presence -0.5 frequency; token 3 banned by min_tokens
    np.testing.assert_allclose(out[0, :3], [1.0, -4.0, 0.5 - 0.5 - 0.5])
    assert out[0, 3] == -np.inf
