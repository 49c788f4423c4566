"""logit_bias, allowed_token_ids and bad_words: what each one lets the sampler choose, on the CPU engine."""

from __future__ import annotations

import pytest

from cupaged import LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def engine(checkpoints) -> LLMEngine:
    return LLMEngine(str(checkpoints("qwen3-tiny")), device="cpu", num_kv_blocks=128)


def generate(engine: LLMEngine, params: SamplingParams, prompt: list[int] | None = None) -> list[list[int]]:
    for i in range(4):
        engine.add_request(f"r{i}", prompt or [5 + i, 17, 29], params)
    done = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert len(done) == 4
    return [done[f"r{i}"].outputs[0].token_ids for i in range(4)]


def test_logit_bias_steers_greedy_decoding(engine) -> None:
    for tokens in generate(engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                  logit_bias={123: 100})):
        assert tokens == [123] * 12
    unbiased = generate(engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    banned = generate(engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                             logit_bias={t: -100 for t in set(unbiased[0])}))
    assert not set(banned[0]) & set(unbiased[0])


def test_allowed_token_ids_are_all_that_is_sampled(engine) -> None:
    allowed = [7, 99, 500, 1000]
    for tokens in generate(engine, SamplingParams(temperature=1.5, seed=3, max_tokens=30, ignore_eos=True,
                                                  allowed_token_ids=allowed)):
        assert set(tokens) <= set(allowed) and len(set(tokens)) > 1


def test_bad_words_never_appear(engine) -> None:
    tokenizer = engine.tokenizer
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = generate(engine, greedy)
    # a word of one token that greedy decoding produces, and one of two tokens
    single = tokenizer.decode([plain[0][0]])
    words = [single] + [tokenizer.decode(plain[1][3:5])]
    with_bad = generate(engine, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, bad_words=words))
    banned = tokenizer.bad_words_token_ids(words)
    assert banned and with_bad != plain
    for tokens in with_bad:
        for word in banned:
            assert not any(tokens[i:i + len(word)] == word for i in range(len(tokens))), (word, tokens)
    sampled = generate(engine, SamplingParams(temperature=1.0, seed=1, max_tokens=40, ignore_eos=True,
                                              bad_words=words))
    for tokens in sampled:
        for word in banned:
            assert not any(tokens[i:i + len(word)] == word for i in range(len(tokens))), (word, tokens)


@pytest.mark.parametrize("params, field", [
    (dict(logit_bias={5000: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[3, 5000]), "allowed_token_ids"),
])
def test_token_ids_outside_the_vocabulary_are_refused(engine, params, field) -> None:
    with pytest.raises(ValueError, match=field):
        engine.add_request("bad", [5, 6], SamplingParams(**params))


@pytest.mark.parametrize("given, field", [
    (dict(logit_bias=[1, 2]), "logit_bias"), (dict(logit_bias={1.5: 1}), "logit_bias"),
    (dict(logit_bias={1: "up"}), "logit_bias"), (dict(logit_bias={1: float("nan")}), "logit_bias"),
    (dict(logit_bias={1: -101}), "logit_bias"), (dict(allowed_token_ids="7"), "allowed_token_ids"),
    (dict(allowed_token_ids=[7, 2.0]), "allowed_token_ids"), (dict(allowed_token_ids=[-1]), "allowed_token_ids"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(bad_words="the"), "bad_words"),
    (dict(bad_words=[b"the"]), "bad_words"), (dict(bad_words=[""]), "bad_words"),
])
def test_wrong_types_and_values_are_refused_naming_the_field(given, field) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**given)
    assert info.value.field == field
