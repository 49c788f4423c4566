"""The engine core in a process of its own (LLMEngine(engine_core_process=True)): the same tokens as in process,
aborts and stop strings reach it, a load error comes back as the exception the core raised, and its death ends the
live requests with an error instead of a hang."""

from __future__ import annotations

import os
import signal

import pytest

from cupaged import LLMEngine, SamplingParams
from cupaged.config import ConfigError
from tests.helpers import run_to_end


@pytest.fixture(scope="module")
def path(checkpoints):
    return str(checkpoints("qwen3-tiny"))


def requests() -> list[tuple[list[int], SamplingParams]]:
    return [([5 + i, 9, 13, 17 + i], SamplingParams(temperature=0.8 if i % 2 else 0, seed=i, max_tokens=12,
                                                    stop=["e"] if i % 3 == 0 else [])) for i in range(8)]


def test_same_outputs_as_in_process(path) -> None:
    outputs = []
    for in_its_own_process in (False, True):
        engine = LLMEngine(path, device="cpu", num_kv_blocks=64, engine_core_process=in_its_own_process)
        try:
            for i, (prompt, params) in enumerate(requests()):
                engine.add_request(str(i), prompt, params)
            assert engine.abort("7") and not engine.abort("7")
            done = run_to_end(engine)
            outputs.append({i: (o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                            for i, o in done.items()})
            assert engine.stats.kv_blocks_used == 0 or in_its_own_process  # the core's stats after its last step
        finally:
            engine.close()
    assert outputs[0] == outputs[1] and outputs[0]["7"][2] == "abort"


def test_a_load_error_comes_back_as_raised(path, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json"):
        LLMEngine(str(bad), device="cpu", engine_core_process=True)


def test_the_core_s_death_ends_live_requests(path) -> None:
    engine = LLMEngine(path, device="cpu", num_kv_blocks=64, engine_core_process=True)
    try:
        engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=1000, ignore_eos=True))
        engine.step()
        os.kill(engine.core.pid, signal.SIGKILL)
        done = run_to_end(engine)
        assert done["r"].outputs[0].finish_reason == "error" and "engine core" in done["r"].error
        with pytest.raises(RuntimeError, match="engine core"):
            engine.add_request("s", [5, 6, 7])
    finally:
        engine.close()
