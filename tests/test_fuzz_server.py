"""Fuzzing `cupaged serve` with hypothesis: thousands of request bodies for both OpenAI routes, valid and not (wrong
types, huge numbers, NaN, unicode, wrong nesting, unknown fields, bytes that are not JSON), against one live server
on loopback with a tiny checkpoint on the CPU.

Every answer must be a 2xx, or a 4xx with OpenAI's JSON error body: never a 5xx, never a hang (each request has a
timeout), never a stream that breaks off. Afterwards /health is 200 and no KV block is in use. Seeded valid requests
give the text the offline engine gives for the same parameters.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("aiohttp")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cupaged import LLM, SamplingParams  # noqa: E402
from tests.serving import DEVICE, KEY, NAME, ServerProcess, http, metrics, wait_for  # noqa: E402

VOCAB = 1031  # qwen3-tiny's
EXAMPLES = 2000

junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=2 * VOCAB), max_size=4),
    st.lists(st.text(max_size=3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


SAMPLING = {
    "max_tokens": st.integers(min_value=1, max_value=6),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.05, max_value=1),
    "top_k": st.integers(min_value=-1, max_value=40),
    "min_p": st.floats(min_value=0, max_value=1),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "repetition_penalty": st.floats(min_value=0.5, max_value=2),
    "seed": st.integers(min_value=0, max_value=2**32),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stop_token_ids": st.lists(st.integers(min_value=0, max_value=VOCAB + 1), max_size=3),
    "min_tokens": st.integers(min_value=0, max_value=3),
    "ignore_eos": st.booleans(),
    "n": st.sampled_from([1, 1, 1, 1, 2]),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "return_tokens_as_token_ids": st.booleans(),
    "model": st.sampled_from([NAME] * 9 + ["gpt-4"]),
    "logit_bias": st.dictionaries(st.integers(min_value=0, max_value=VOCAB + 1).map(str),
                                  st.floats(min_value=-100, max_value=100), max_size=3),
    "allowed_token_ids": st.lists(st.integers(min_value=0, max_value=VOCAB + 1), min_size=1, max_size=4),
    "bad_words": st.lists(st.text(min_size=1, max_size=4), max_size=2),
}
COMPLETION = SAMPLING | {
    "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(min_value=0, max_value=VOCAB + 3), min_size=1,
                                                       max_size=12)),
    "logprobs": st.integers(min_value=0, max_value=22),
    "echo": st.sampled_from([False, False, False, True]),
}
message = st.fixed_dictionaries({"role": st.sampled_from(["user"] * 6 + ["system", "assistant", "developer", "tool", ""]),
                                 "content": st.one_of(st.text(max_size=30), junk)})
CHAT = SAMPLING | {
    "messages": st.lists(message, min_size=1, max_size=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=22),
    "max_completion_tokens": st.integers(min_value=1, max_value=6),
}


def draw_request(data: st.DataObject) -> tuple[str, object]:
    """A route and a body. The proportions are set with a Random that hypothesis seeds (its own draws, a
    use_true_random=False Random's included, lean towards boundary values): the required field is there 19 times in 20, each other field half the time, and a field's
    value is anything at all one time in twelve; one body in twenty is not a JSON object at all."""
    r = data.draw(st.randoms(use_true_random=True))
    route = r.choice(["completions", "chat/completions"])
    if r.random() < 0.05:
        return route, data.draw(st.one_of(st.binary(max_size=40), junk.map(lambda v: json.dumps(v).encode())))
    fields, required = (COMPLETION, "prompt") if route == "completions" else (CHAT, "messages")
    body = {}
    for name, valid in fields.items():
        if r.random() < (0.95 if name == required else 0.5):
            body[name] = data.draw(junk if r.random() < 1 / 12 else valid)
    if r.random() < 0.1:
        body |= data.draw(st.dictionaries(st.text(min_size=1, max_size=8), junk, max_size=2))
    return route, body


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("qwen3-tiny")


@pytest.fixture(scope="module")
def fuzz_server(model, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(model, tmp_path_factory.mktemp("fuzz") / "server.log", "--api-key", KEY,
                         "--max-model-len", "64", "--max-num-seqs", "8")
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


def _json_safe(body: object) -> bytes:
    """The body as bytes: JSON (NaN and inf as Python writes them, which is not JSON: the server must refuse it)."""
    return body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()


def _check(status: int, reply: object, body: object) -> None:
    assert status < 500, (status, reply, body)
    if status >= 400:
        assert isinstance(reply, dict) and set(reply["error"]) == {"message", "type", "param", "code"}, reply
        return
    assert status == 200
    if isinstance(reply, str):  # a stream: it ends with [DONE], with no error event in it
        events = [line[6:] for line in reply.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", (reply[-300:], body)
        assert all("error" not in json.loads(e) for e in events[:-1]), (reply[-300:], body)
    else:
        assert reply["choices"] and reply["usage"]["completion_tokens"] >= 0, reply


def test_fuzzed_requests_never_get_a_server_error(fuzz_server: ServerProcess) -> None:
    url = fuzz_server.url
    seen = {"2xx": 0, "4xx": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data: st.DataObject) -> None:
        route, body = draw_request(data)
        status, reply = http("POST", f"{url}/v1/{route}", _json_safe(body), key=KEY, timeout=30)
        _check(status, reply, body)
        seen["2xx" if status < 300 else "4xx"] += 1

    one()
    assert seen["2xx"] > EXAMPLES // 10 and seen["4xx"] > EXAMPLES // 10, seen  # both kinds were exercised
    assert http("GET", url + "/health")[0] == 200
    wait_for(lambda: metrics(url, KEY)["cupaged_kv_blocks_used"] == 0, "every KV block to be free")
    m = metrics(url, KEY)
    assert m["cupaged_num_requests_running"] == 0 and m["cupaged_num_requests_waiting"] == 0


@pytest.fixture(scope="module")
def llm(model) -> LLM:
    return LLM(str(model), device=DEVICE, max_model_len=64)


valid_sampling = st.fixed_dictionaries({
    "prompt": st.lists(st.integers(min_value=3, max_value=VOCAB - 1), min_size=1, max_size=12),
    "max_tokens": st.integers(min_value=1, max_value=6),
    "temperature": st.floats(min_value=0.3, max_value=1.5),
    "seed": st.integers(min_value=0, max_value=2**32),
    "top_k": st.sampled_from([0, 5, 40]),
    "top_p": st.sampled_from([1.0, 0.9, 0.5]),
    "min_p": st.sampled_from([0.0, 0.05]),
    "ignore_eos": st.booleans(),
})


def test_seeded_valid_requests_equal_the_offline_engine(fuzz_server: ServerProcess, llm: LLM) -> None:
    url = fuzz_server.url

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(valid_sampling)
    def one(body: dict) -> None:
        # the tokens come back as "token_id:N" with logprobs 0 (vLLM's return_tokens_as_token_ids)
        status, reply = http("POST", f"{url}/v1/completions", dict(body, model=NAME, logprobs=0,
                                                                   return_tokens_as_token_ids=True), key=KEY)
        assert status == 200, reply
        params = {k: v for k, v in body.items() if k != "prompt"}
        offline = llm.generate([body["prompt"]], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
        tokens = [int(t.removeprefix("token_id:")) for t in reply["choices"][0]["logprobs"]["tokens"]]
        assert tokens == offline.token_ids and reply["choices"][0]["text"] == offline.text, (body, reply)

    one()


def test_soak_with_aborts_and_disconnects_loses_nothing(model, tmp_path) -> None:
    """2,000 requests, 32 at a time, on a cache of 24 blocks (preemption all along): a fifth are dropped by their
    client mid-way. Every other request ends exactly once with all its tokens; the server counts each request
    once; nothing stays running, waiting or holding a block."""
    import asyncio
    import random

    import aiohttp

    proc = ServerProcess(model, tmp_path / "soak.log", "--num-kv-blocks", "24", "--max-num-seqs", "16",
                         "--max-model-len", "64", "--max-queue-depth", "-1")
    url, total = proc.url, 2000
    rnd = random.Random(0)
    plan = [(rnd.random() < 0.5, rnd.randint(1, 8), rnd.random() < 0.2) for _ in range(total)]

    async def one(session: aiohttp.ClientSession, i: int, sem: asyncio.Semaphore) -> tuple[str, int]:
        stream, max_tokens, drop = plan[i]
        body = {"prompt": [(7 * i + j) % 1000 + 3 for j in range(1 + i % 30)], "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0, "stream": stream, "stream_options": {"include_usage": True}}
        async with sem:
            try:
                async with session.post(url + "/v1/completions", json=body,
                                        timeout=aiohttp.ClientTimeout(total=0.01 if drop else 60)) as r:
                    assert r.status == 200, await r.text()
                    if not stream:
                        reply = await r.json()
                        return reply["choices"][0]["finish_reason"], reply["usage"]["completion_tokens"]
                    reason, usage = None, None
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            chunk = json.loads(line[6:])
                            for c in chunk["choices"]:
                                reason = c["finish_reason"] or reason
                            usage = chunk.get("usage") or usage
                    return reason, usage["completion_tokens"]
            except asyncio.TimeoutError:
                assert drop
                return "dropped", 0

    async def main() -> list[tuple[str, int]]:
        sem = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*[one(session, i, sem) for i in range(total)])

    try:
        results = asyncio.run(asyncio.wait_for(main(), 240))
        for (stream, max_tokens, drop), (reason, tokens) in zip(plan, results):
            if reason != "dropped":
                assert (reason, tokens) == ("length", max_tokens), (stream, max_tokens, reason, tokens)
        wait_for(lambda: metrics(url)["cupaged_kv_blocks_used"] == 0, "every KV block to be free")
        m = metrics(url)
        assert m["cupaged_num_requests_running"] == 0 and m["cupaged_num_requests_waiting"] == 0
        ended = sum(v for k, v in m.items() if k.startswith("cupaged_requests_finished_total"))
        kept = sum(r != "dropped" for r, _ in results)
        # each accepted request ended once, finished or aborted when its client went away (a client may go away
        # before the server even read its request)
        assert ended == m["cupaged_requests_accepted_total"] and kept <= ended <= total, (ended, kept, m)
        assert m["cupaged_num_preemptions_total"] > 0
    finally:
        assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()
