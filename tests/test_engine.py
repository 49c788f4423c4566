"""The engine on the CPU: continuous batching with preemption gives the same greedy text as one sequence at a
time; stops, seeds, logprobs, streaming, aborts and bad requests behave as vLLM's do."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from cupaged import LLM, LLMEngine, SamplingParams
from cupaged.kv_cache import AttentionMetadata, KVCache

PRESET = "qwen3-tiny"


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints(PRESET)


@pytest.fixture(scope="module")
def llm(path) -> LLM:
    return LLM(str(path), device="cpu", num_kv_blocks=256)


def sequential_greedy(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding one sequence at a time with a full forward over all tokens at every step."""
    model, tokens = engine.core.runner.model, list(prompt)
    for _ in range(max_tokens):
        n, blocks = len(tokens), -(-len(tokens) // 16)
        cache = KVCache(model.config, blocks, 16, np.float32, np)
        meta = AttentionMetadata.build([n], [n], [list(range(blocks))], 16, np)
        logits = model.logits(model.forward(np.array(tokens, np.int32), meta, cache)[-1:])
        tokens.append(int(np.argmax(logits[0])))
    return tokens[len(prompt):]


def test_greedy_batched_with_preemption_equals_sequential(path) -> None:
    rng = np.random.default_rng(7)
    # 24 requests, a cache of 24 blocks x 16 slots: they cannot all fit, so some are preempted and recomputed
    engine = LLMEngine(str(path), device="cpu", num_kv_blocks=24, max_num_batched_tokens=96, max_num_seqs=12)
    prompts = [rng.integers(0, 900, int(rng.integers(3, 70))).tolist() for _ in range(24)]
    lengths = [int(rng.integers(5, 40)) for _ in prompts]
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in results, "a request finished twice"
                results[out.request_id] = out.outputs[0]
    assert engine.stats.num_preemptions > 0, "the cache was meant to be too small: preemption must happen"
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert results[str(i)].token_ids == sequential_greedy(engine, p, n), f"request {i}"
        assert results[str(i)].finish_reason == "length"


def test_prompt_longer_than_context_is_rejected_and_others_go_on(path) -> None:
    engine = LLMEngine(str(path), device="cpu", num_kv_blocks=64, max_model_len=40)
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    with pytest.raises(ValueError, match="more than the model's context of 40"):
        engine.add_request("too-long", list(range(41)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [])
    with pytest.raises(ValueError, match=r"prompt\[0\] must be a token id \(an integer in \[0, 1031\)\)"):
        engine.add_request("bad-id", [10**9])
    with pytest.raises(ValueError, match=r"prompt\[1\] must be a token id"):
        engine.add_request("float-id", [5, 1.7])
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == ["ok"]


def test_generation_stops_at_the_context_length(path) -> None:
    engine = LLMEngine(str(path), device="cpu", num_kv_blocks=64, max_model_len=20)
    engine.add_request("r", list(range(1, 16)), SamplingParams(max_tokens=100, ignore_eos=True))
    out = [o for _ in range(50) for o in engine.step() if o.finished][0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_abort_frees_blocks(path) -> None:
    engine = LLMEngine(str(path), device="cpu", num_kv_blocks=64)
    for i in range(3):
        engine.add_request(str(i), [5] * 40, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    used = engine.core.blocks.num_used
    assert used > 0 and engine.abort("1") and not engine.abort("1") and not engine.abort("nope")
    assert engine.core.blocks.num_used < used
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "1"]
    assert aborted and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks


def test_stop_string_ends_text_before_it(llm) -> None:
    prompt = "the quick brown fox"
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    text = base.text
    assert len(text) > 12, text
    stop = text[8:11]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    out = cut.outputs[0]
    assert out.text == text[:text.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                                 include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_stop_token_and_min_tokens(llm) -> None:
    prompt = [3, 14, 15, 92, 65]
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    stop_id = base.token_ids[2]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))[0]
    first = base.token_ids.index(stop_id)
    assert out.outputs[0].token_ids == base.token_ids[:first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    late = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=6,
                                                 stop_token_ids=[stop_id]))[0].outputs[0]
    assert stop_id not in late.token_ids[:6] and len(late.token_ids) >= 6


def test_seed_gives_same_text_whatever_the_batch(llm) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate(["hello there"], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    batch = llm.generate(["abc", "hello there", "a longer prompt of several words"], [others, params, others])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    assert llm.generate(["hello there"], other_seed)[0].outputs[0].token_ids != alone


def test_logprobs_of_chosen_and_top_tokens(llm) -> None:
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    steps = out.outputs[0].logprobs
    assert len(steps) == 4
    for lp, token in zip(steps, out.outputs[0].token_ids):
        assert lp.token_id == token and len(lp.top) == 3
        assert max(lp.top.values()) == pytest.approx(lp.logprob, abs=1e-6)  # greedy picks the top token
        assert all(v <= 0 for v in lp.top.values()) and sum(np.exp(list(lp.top.values()))) <= 1 + 1e-6


def test_streamed_deltas_add_up_to_the_text(path) -> None:
    engine = LLMEngine(str(path), device="cpu", num_kv_blocks=64)
    engine.add_request("s", "stream me some text", SamplingParams(temperature=0.8, seed=3, max_tokens=30,
                                                                 ignore_eos=True, stop=["zzzz"]))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].delta)
            final = out
    assert "".join(deltas) == final.outputs[0].text


def test_kv_metrics(path) -> None:
    engine = LLMEngine(str(path), device="cpu", num_kv_blocks=64)
    engine.add_request("m", [1] * 20, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    s = engine.stats
    assert (s.num_running, s.num_waiting, s.kv_blocks_used, s.kv_slots_used, s.kv_slots_allocated) == (1, 0, 2, 20, 32)


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(stop=[""]), "stop"), (dict(logprobs=-1), "logprobs"), (dict(n=0), "n must"),
])
def test_invalid_sampling_params(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_cli_run_streams_and_reports_throughput(path) -> None:
    from cupaged.cli import main

    result = CliRunner().invoke(main, ["run", "--model", str(path), "--device", "cpu", "--prompt", "hello world",
                                       "--max-tokens", "8", "--ignore-eos"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output
    bad = CliRunner().invoke(main, ["run", "--model", str(path), "--device", "cpu", "--prompt", "x",
                                    "--top-p", "0"])
    assert bad.exit_code != 0 and "top_p" in bad.output
    missing = CliRunner().invoke(main, ["run", "--model", "/nonexistent/model", "--prompt", "x"])
    assert missing.exit_code != 0 and "no such directory" in missing.output


def test_chunked_prefill_gives_the_same_greedy_output(path) -> None:
    """Prompts longer than the token budget are computed in chunks over several steps; nothing changes."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (150, 37, 300)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    whole = LLM(str(path), device="cpu", num_kv_blocks=128).generate(prompts, params, use_tqdm=False)
    chunked_llm = LLM(str(path), device="cpu", num_kv_blocks=128, max_num_batched_tokens=40)
    chunked = chunked_llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in chunked] == [o.outputs[0].token_ids for o in whole]
