"""Structured outputs on the GPU: the grammar masks inside the sampling kernel and the masking kernel of the top-k /
top-p path, against the NumPy twin (sampler.apply_token_bitmask) on fresh random logits and masks, outputs
poisoned; then the engine (bf16 random checkpoint, CUDA graphs): schema-valid outputs, greedy and sampled, and the
tokens of the synchronous engine with async scheduling."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from cupaged import LLMEngine, SamplingParams, StructuredOutputsParams
from cupaged.sampler import SamplingMetadata, apply_token_bitmask, sample_on_device
from helpers import preempted_requests
from tests.test_async_scheduling import _constrained_requests, _run_requests
from tests.test_structured import SCHEMAS
from tests.test_structured_masks import allowed_by, random_masks

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_memory_pool")]

VOCABS = [151936, 1031, 37]  # Qwen3's, and sizes that are not whole mask words
# A JSON number's fraction is unbounded: a greedy random model may write "1.000..." past any budget (one seed of the
# tiny checkpoint does), so the GPU's model, which differs from the CPU's by bf16, is given the bounded schemas.
BOUNDED = [schema for schema in SCHEMAS if '"number"' not in json.dumps(schema)]


@pytest.fixture(autouse=True)
def release_gpu_memory():
    """After each test, the memory it used back to the device: the engines here are large."""
    yield
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()


def _logits(rng: np.random.Generator, batch: int, vocab: int) -> np.ndarray:
    return (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)


@pytest.mark.parametrize("vocab", VOCABS)
def test_mask_logits_is_the_numpy_twin(ops, vocab: int) -> None:
    import cupy

    rng = np.random.default_rng()
    batch = 24
    host = _logits(rng, batch, vocab)
    bitmask, mask_rows = random_masks(rng, batch, vocab)
    logits = cupy.asarray(host)
    assert ops.mask_logits(logits, bitmask, mask_rows) is logits
    want = apply_token_bitmask(host.copy(), bitmask, mask_rows)
    assert np.array_equal(logits.get(), want)  # -inf where masked, every other value untouched
    assert (mask_rows < 0).any() and np.isneginf(want).any()
    with pytest.raises(ValueError, match="mask_rows"):
        ops.mask_logits(logits, bitmask, mask_rows[:-1])
    with pytest.raises(ValueError, match="bitmask"):
        ops.mask_logits(logits, bitmask[:, :-1], mask_rows)


@pytest.mark.parametrize("vocab", VOCABS)
def test_sample_rows_with_masks_is_the_inverse_cdf_of_the_masked_logits(ops, vocab: int) -> None:
    """The fused kernel reads the masks: greedy rows are the argmax of the twin's masked logits, sampled rows the
    token whose CDF interval (float64) holds u * total, a masked token never; the logits are not written."""
    import cupy

    rng = np.random.default_rng()
    batch = 64
    host = _logits(rng, batch, vocab)
    bitmask, mask_rows = random_masks(rng, batch, vocab)
    temperature = rng.uniform(0.3, 1.5, batch).astype(np.float32)
    temperature[:16] = 0
    min_p = rng.choice([0.0, 0.02, 0.3], batch).astype(np.float32)
    uniform = rng.random(batch)
    logits = cupy.asarray(host)
    got = ops.sample_rows(logits, temperature, min_p, uniform, bitmask=bitmask, mask_rows=mask_rows).get()
    again = ops.sample_rows(logits, temperature, min_p, uniform, bitmask=bitmask, mask_rows=mask_rows).get()
    assert (got == again).all(), "not deterministic"
    assert np.array_equal(logits.get(), host)
    masked = apply_token_bitmask(host.astype(np.float64), bitmask, mask_rows)
    assert (got[:16] == masked[:16].argmax(axis=-1)).all()
    for b in range(batch):
        assert 0 <= got[b] < vocab and allowed_by(bitmask, mask_rows, b, vocab)[got[b]], (b, got[b])
    for b in range(16, batch):
        w = np.exp((masked[b] - masked[b].max()) / temperature[b])
        w[w < min_p[b]] = 0
        cdf = np.cumsum(w)
        target, slack = uniform[b] * cdf[-1], 1e-5 * cdf[-1]
        token = got[b]
        assert w[token] > 0, (b, token)
        below = cdf[token - 1] if token else 0.0
        assert below - slack <= target <= cdf[token] + slack, (b, token, below, target, cdf[token])
    unmasked = ops.sample_rows(logits, temperature, min_p, uniform).get()
    free = mask_rows < 0
    assert (unmasked[free] == got[free]).all() and (unmasked[~free] != got[~free]).any()


def test_sample_on_device_matches_the_cpu_for_every_kind_of_row(ops) -> None:
    """One batch of greedy, temperature, min-p, top-k and top-p rows, with and without masks: the GPU's tokens
    (fused kernel for some rows, masking kernel and sort for the others) against the CPU's (the NumPy twin first)."""
    import cupy

    rng = np.random.default_rng()
    batch, vocab = 80, 1031
    host = _logits(rng, batch, vocab)
    bitmask, mask_rows = random_masks(rng, batch, vocab)
    kind = np.arange(batch) % 5
    meta = SamplingMetadata(temperature=np.where(kind == 0, 0.0, rng.uniform(0.5, 1.5, batch)).astype(np.float32),
                            top_k=np.where(kind == 3, 20, 0).astype(np.int64),
                            top_p=np.where(kind == 4, 0.8, 1.0).astype(np.float32),
                            min_p=np.where(kind == 2, 0.05, 0.0).astype(np.float32),
                            uniform=rng.random(batch), penalties=[], bitmask=bitmask, mask_rows=mask_rows)
    logits = cupy.asarray(host)
    got = cupy.asnumpy(sample_on_device(logits, meta))
    assert np.array_equal(logits.get(), host)  # the raw logits stay: logprobs read them
    want = np.asarray(sample_on_device(host.copy(), meta))
    for b in range(batch):
        assert allowed_by(bitmask, mask_rows, b, vocab)[got[b]], (b, got[b])
    assert (got[kind == 0] == want[kind == 0]).all()
    # float32 sums differ in order between the devices: a draw at a CDF boundary may differ, rarely
    assert (got != want).sum() <= 2, np.flatnonzero(got != want)


@pytest.fixture(scope="module")
def engine(checkpoints) -> LLMEngine:
    return LLMEngine(str(checkpoints("qwen3-tiny", "bfloat16")), device="cuda", dtype="bfloat16", num_kv_blocks=1024)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schemas_give_valid_json_on_the_gpu(engine: LLMEngine, temperature: float) -> None:
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=200,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for i, schema in enumerate(BOUNDED)]
    for i, p in enumerate(params):
        engine.add_request(f"s{i}", [5 + i % 50, 17, 29], p)
    done = {}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert len(done) == len(BOUNDED) >= 45
    for i, schema in enumerate(BOUNDED):
        completion = done[f"s{i}"].outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)
    assert engine.core.num_masked_steps > 0 and engine.stats.num_steps_run_ahead > 0


@pytest.mark.parametrize("kinds", [7, 9])
@pytest.mark.parametrize("small_cache", [False, True])
def test_async_constrained_tokens_equal_sync_tokens_on_the_gpu(checkpoints, kinds: int, small_cache: bool) -> None:
    """Greedy and seeded constrained requests (n > 1, beams, min_tokens, stop strings, top-k / top-p, prefix
    sharing): async scheduling gives the synchronous engine's tokens. In a small cache both engines preempt, not
    always the same requests (helpers.preempted_requests says why those may differ in bf16): the requests neither
    engine preempted must still be equal, and every request must finish."""
    path = str(checkpoints("qwen3-tiny", "bfloat16"))
    options = dict(num_kv_blocks=30, block_size=8, max_num_seqs=8) if small_cache else dict(num_kv_blocks=1024)
    results = {}
    with preempted_requests() as preempted:
        for async_scheduling in (False, True):
            engine = LLMEngine(path, device="cuda", dtype="bfloat16", async_scheduling=async_scheduling, **options)
            results[async_scheduling] = _run_requests(engine, _constrained_requests(kinds))
            assert (engine.stats.num_preemptions > 0) == small_cache and engine.core.num_masked_steps > 10
            if async_scheduling:
                assert engine.stats.num_steps_run_ahead > (20 if kinds == 7 else 0)
    assert len(results[False]) == len(results[True]) == 18
    compared = [r for r in results[False] if r not in preempted]
    assert len(compared) >= (4 if small_cache else 18)
    assert {r: results[True][r] for r in compared} == {r: results[False][r] for r in compared}
