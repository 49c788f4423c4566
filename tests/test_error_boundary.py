"""No request can hurt another: a step that fails ends the requests it held with finish reason "error" and frees
their blocks, the engine goes on with the others; a lost device stops the engine with an error instead of
failing every step after it; a request whose output cannot be made ends alone; options and parameters that cannot
work are refused at the door, naming them."""

from __future__ import annotations

import pytest

from cupaged import LLMEngine, SamplingParams
from cupaged.config import ConfigError
from cupaged.engine.core import DeviceLost
from tests.helpers import run_to_end

PRESET = "qwen3-tiny"


@pytest.fixture(scope="module")
def path(checkpoints):
    return str(checkpoints(PRESET))


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(path, monkeypatch) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=64, max_num_seqs=2, async_scheduling=False)
    for i in range(4):  # two run, two wait
        engine.add_request(str(i), [5 + i, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    real, calls = engine.core.runner.run, []

    def failing_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a kernel failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.core.runner, "run", failing_third)
    done = run_to_end(engine)
    failed = {i for i, out in done.items() if out.outputs[0].finish_reason == "error"}
    assert failed == {"0", "1"} and all("a kernel failed" in done[i].error for i in failed)
    assert all(done[i].outputs[0].finish_reason == "length" and len(done[i].outputs[0].token_ids) == 8
               for i in ("2", "3"))
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks
    engine.add_request("after", [9, 9, 9], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert run_to_end(engine)["after"].outputs[0].finish_reason == "length"


def test_a_lost_device_stops_the_engine(path, monkeypatch) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=64)
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=8))
    engine.step()
    # what CuPy raises after an illegal address: every later CUDA call would fail too
    lost = type("CUDARuntimeError", (RuntimeError,), {"__module__": "cupy_backends.cuda.api.runtime"})

    def broken(*args, **kwargs):
        raise lost("cudaErrorIllegalAddress: an illegal memory access was encountered")

    monkeypatch.setattr(engine.core.runner, "run", broken)
    with pytest.raises(DeviceLost, match="illegal memory access"):
        for _ in range(5):
            engine.step()
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks  # its requests were failed first


def test_a_request_whose_text_cannot_be_made_ends_alone(path, monkeypatch) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=64)
    decode = engine.tokenizer.decode

    def fragile(ids, *args, **kwargs):
        if 999 in ids:
            raise ValueError("the tokenizer cannot decode this")
        return decode(ids, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "decode", fragile)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("bad", [5, 6, 999], params)  # the detokenizer's window holds the prompt's last tokens
    engine.add_request("good", [5, 6, 7], params)
    done = run_to_end(engine)
    assert done["bad"].outputs[0].finish_reason == "error" and "cannot decode" in done["bad"].error
    assert done["good"].outputs[0].finish_reason == "length" and len(done["good"].outputs[0].token_ids) == 6
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks


@pytest.mark.parametrize("params, field", [
    (dict(logprobs=10**6), "logprobs"),                      # used to return the whole vocabulary every token
    (dict(beam_width=2, logprobs=1), "logprobs"),            # used to drop the logprobs silently
    (dict(stop_token_ids=[5000], min_tokens=2), "stop_token_ids"),  # used to raise inside the step
])
def test_parameters_that_need_the_model_are_checked_at_add_request(path, params, field) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=64)
    with pytest.raises(ValueError, match=field) as info:
        engine.add_request("r", [5, 6, 7], SamplingParams(**params))
    assert getattr(info.value, "field", field) == field
    assert not engine.has_unfinished_requests()
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2))  # the id is free, the engine serves
    assert run_to_end(engine)["r"].finished


@pytest.mark.parametrize("options, message", [
    (dict(max_model_len=0), "max_model_len"),
    (dict(max_model_len=100000), "max_model_len"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(max_num_batched_tokens=-5), "max_num_batched_tokens"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(num_kv_blocks=2.5), "num_kv_blocks"),
    (dict(max_logprobs=-2), "max_logprobs"),
    (dict(max_logprobs="20"), "max_logprobs"),
    (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(engine_core_process="yes"), "engine_core_process"),
    (dict(seed=-1), "seed"),
    (dict(gguf_dequantize="yes"), "gguf_dequantize"),
    (dict(kv_cache_dtype=8), "kv_cache_dtype"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype"),
    (dict(quantization=8), "quantization"),
    (dict(quantization="int8"), "quantization"),
    (dict(tensor_parallel_size="2"), "tensor_parallel_size"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(tensor_parallel_size=3), "tensor_parallel_size"),  # does not divide the tiny model's heads
])
def test_engine_options_that_cannot_work_are_refused(path, options, message) -> None:
    with pytest.raises((ValueError, ConfigError), match=message):
        LLMEngine(path, device="cpu", **options)
