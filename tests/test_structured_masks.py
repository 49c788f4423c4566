"""Structured-output masks as packed bitmasks (llguidance's layout): the NumPy twin that the GPU kernels are tested
against, the masks the matchers fill, and sampling with them on the CPU (greedy, temperature, min-p, top-k, top-p),
where a masked token is never chosen and the logits the engine may still read are left as they were."""

from __future__ import annotations

import numpy as np
import pytest

from cupaged.engine.sampling import grammar_masks, sampling_metadata
from cupaged.engine.sequence import Sequence
from cupaged.sampler import SamplingMetadata, apply_token_bitmask, sample_on_device
from cupaged.sampling_params import SamplingParams, StructuredOutputsParams
from cupaged.structured import Matcher, allowed_ids, build_tokenizer, grammar_for

V = 1031  # not a multiple of 32: the last mask word is partly used


def random_masks(rng: np.random.Generator, batch: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """A bitmask with fewer rows than the batch, in shuffled order, some rows without a mask; each mask allows a few
    hundred tokens, one of them at the last id (the partly used word)."""
    words = -(-vocab // 32)
    constrained = rng.permutation(batch)[:batch - batch // 3]
    mask_rows = np.full(batch, -1, np.int32)
    mask_rows[constrained] = rng.permutation(len(constrained))
    bits = rng.random((len(constrained), words * 32)) < 0.3
    bits[:, vocab:] = rng.random((len(constrained), words * 32 - vocab)) < 0.5  # garbage past the vocabulary
    bits[:, vocab - 1] = True
    bitmask = np.packbits(bits, axis=-1, bitorder="little").view(np.int32)
    return bitmask, mask_rows


def allowed_by(bitmask: np.ndarray, mask_rows: np.ndarray, row: int, vocab: int) -> np.ndarray:
    """Whether each token of `row` is allowed, read bit by bit (the definition, not the twin's unpacking)."""
    if mask_rows[row] < 0:
        return np.ones(vocab, bool)
    words = bitmask[mask_rows[row]].view(np.uint32)
    return np.array([(int(words[t // 32]) >> (t % 32)) & 1 for t in range(vocab)], bool)


def test_apply_token_bitmask_is_the_bitwise_definition() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (9, V)).astype(np.float32)
    bitmask, mask_rows = random_masks(rng, 9, V)
    masked = apply_token_bitmask(logits.copy(), bitmask, mask_rows)
    for row in range(9):
        allowed = allowed_by(bitmask, mask_rows, row, V)
        assert np.array_equal(masked[row, allowed], logits[row, allowed])
        assert np.all(masked[row, ~allowed] == -np.inf)
    assert (mask_rows < 0).any() and (~np.isfinite(masked)).any()


@pytest.mark.parametrize("filters", [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, min_p=0.05),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.8),
])
def test_sampling_never_chooses_a_masked_token(filters: dict) -> None:
    rng = np.random.default_rng(1)
    batch = 64
    logits = rng.normal(0, 3, (batch, V)).astype(np.float32)
    bitmask, mask_rows = random_masks(rng, batch, V)
    kept = logits.copy()
    meta = SamplingMetadata(temperature=np.full(batch, filters["temperature"], np.float32),
                            top_k=np.full(batch, filters.get("top_k", 0), np.int64),
                            top_p=np.full(batch, filters.get("top_p", 1.0), np.float32),
                            min_p=np.full(batch, filters.get("min_p", 0.0), np.float32),
                            uniform=rng.random(batch), penalties=[], bitmask=bitmask, mask_rows=mask_rows)
    tokens = np.asarray(sample_on_device(logits, meta))
    assert np.array_equal(logits, kept)  # the raw logits are not masked in place (logprobs read them)
    unmasked = sample_on_device(logits, SamplingMetadata(**{**meta.__dict__, "bitmask": None, "mask_rows": None}))
    for row in range(batch):
        assert allowed_by(bitmask, mask_rows, row, V)[tokens[row]]
        if mask_rows[row] < 0:
            assert tokens[row] == unmasked[row]  # an unconstrained row samples as it would with no masks at all
    if filters["temperature"] == 0:
        expected = np.argmax(apply_token_bitmask(logits.copy(), bitmask, mask_rows), axis=-1)
        assert np.array_equal(tokens, expected)
    assert (np.asarray(unmasked) != tokens).any()  # the masks changed some choice: the test can fail


@pytest.fixture(scope="module")
def grammar_tokenizer(checkpoints):
    from cupaged.checkpoint import open_checkpoint

    config, tokenizer, _ = open_checkpoint(checkpoints("qwen3-tiny"))
    return build_tokenizer(tokenizer, config.vocab_size), config.vocab_size, tokenizer


def test_matchers_fill_the_masks_of_their_rows(grammar_tokenizer) -> None:
    """grammar_masks gives each constrained, unfinished sequence its matcher's mask: the tokens that continue its
    regex, and EOS alone once the regex is complete."""
    lltok, vocab, tokenizer = grammar_tokenizer
    regex = StructuredOutputsParams(regex="(ab|cd)x")
    seqs = [Sequence("free", [5, 6], SamplingParams()),
            Sequence("start", [5, 6], SamplingParams(), matcher=Matcher.create(lltok, grammar_for(regex))),
            Sequence("done", [5, 6], SamplingParams(), matcher=Matcher.create(lltok, grammar_for(regex)))]
    for token in tokenizer.encode("abx", add_special_tokens=False):
        assert seqs[2].matcher.consume(token)
    bitmask, mask_rows = grammar_masks(seqs)
    assert bitmask.shape == (2, -(-vocab // 32)) and bitmask.dtype == np.int32
    assert list(mask_rows) == [-1, 0, 1]
    first = allowed_ids(bitmask[0], vocab)
    texts = {tokenizer.decode([int(t)]) for t in first}
    assert first.size and all(("abx".startswith(t) or "cdx".startswith(t)) and t for t in texts), texts
    assert set(allowed_ids(bitmask[1], vocab)) <= set(tokenizer.eos_token_ids)
    meta = sampling_metadata(seqs, tokenizer.eos_token_ids, np.random.default_rng(0), (bitmask, mask_rows))
    assert meta.bitmask is bitmask and not meta.penalties  # a grammar alone is no penalty: the sampler masks it
    assert grammar_masks(seqs[:1]) is None


def test_the_grammar_wins_over_bans_that_leave_nothing(grammar_tokenizer) -> None:
    """A complete grammar allows only EOS while min_tokens bans it: the bans go, the mask stays."""
    lltok, vocab, tokenizer = grammar_tokenizer
    eos = tokenizer.eos_token_ids
    params = SamplingParams(min_tokens=50, max_tokens=60, allowed_token_ids=[7], structured_outputs=StructuredOutputsParams(
        regex="ab"))
    seq = Sequence("r", [5, 6], params, matcher=Matcher.create(lltok, grammar_for(params.structured_outputs)))
    for token in tokenizer.encode("ab", add_special_tokens=False):
        seq.token_ids.append(token)
        seq.matcher.consume(token)
    meta = sampling_metadata([seq], eos, np.random.default_rng(0), grammar_masks([seq]))
    (penalties,) = meta.penalties
    assert penalties.banned == [] and penalties.allowed is None
    tokens = sample_on_device(np.zeros((1, vocab), np.float32), meta)
    assert int(tokens[0]) in eos


def test_constrained_steps_queue_the_forward_before_processing_and_sampling_after(checkpoints, monkeypatch) -> None:
    """With async scheduling, a step with constrained rows runs its forward, then processes the step before (the
    matchers consume its tokens), then fills its masks; steps without constrained rows fill none."""
    from cupaged import LLMEngine
    from cupaged.engine import core as core_module

    engine = LLMEngine(str(checkpoints("qwen3-tiny")), device="cpu", num_kv_blocks=64)
    core, events = engine.core, []

    def logged(name: str, call):
        def wrapper(*args):
            events.append(name)
            return call(*args)
        return wrapper

    monkeypatch.setattr(core, "_process", logged("P", core._process))
    monkeypatch.setattr(core.runner, "run", logged("F", core.runner.run))
    monkeypatch.setattr(core_module, "grammar_masks", logged("M", core_module.grammar_masks))

    engine.add_request("free", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert "M" not in events and core.num_masked_steps == 0 and core.timings["masks"] == 0
    events.clear()
    engine.add_request("json", [5, 6, 7], SamplingParams(temperature=0, max_tokens=40, structured_outputs=
                                                         StructuredOutputsParams(json={"type": "array", "minItems": 8,
                                                                                       "items": {"type": "integer"}})))
    while engine.has_unfinished_requests():
        engine.step()
    order = "".join(events)
    assert order.startswith("FM") and order.count("FPM") > 10, order  # run ahead: step n+1's forward, step n, masks
    assert core.num_masked_steps == order.count("M") and core.timings["masks"] > 0
