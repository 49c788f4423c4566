"""`cupaged serve`: the real server in a subprocess on 127.0.0.1, driven by the official openai client and by raw
HTTP. Greedy outputs must equal offline `LLM.generate`; bad input gets OpenAI-style errors; disconnects and
SIGTERM abort cleanly. Every wait here is bounded in time and count.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")
openai = pytest.importorskip("openai")

from cupaged import LLM, SamplingParams  # noqa: E402

from tests.serving import KEY, LIMIT, NAME, ServerProcess, http, metrics, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def model(checkpoints) -> Path:
    return checkpoints("qwen3-tiny")


@pytest.fixture(scope="module")
def llm(model: Path) -> LLM:
    return LLM(str(model), device="cpu")


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(model, tmp_path_factory.mktemp("server") / "server.log", "--api-key", KEY)
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


@pytest.fixture(scope="module")
def slow_server(model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One sequence at a time, 20 ms a step, at most one request waiting."""
    proc = ServerProcess(model, tmp_path_factory.mktemp("slow") / "server.log", "--max-num-seqs", "1",
                         "--max-queue-depth", "1", step_delay=0.02)
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=LIMIT)


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


# -- routes, auth -----------------------------------------------------------------------------------------------

def test_health_models_and_api_key(server: ServerProcess, client: openai.OpenAI) -> None:
    assert http("GET", server.url + "/health") == (200, {"status": "ok"})  # no key needed
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    for key in (None, "wrong"):
        status, body = http("GET", server.url + "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body = http("POST", server.url + "/v1/completions", {"prompt": "hi"}, key=key)
        assert status == 401
    status, _ = http("GET", server.url + "/metrics")
    assert status == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=LIMIT)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="hi", max_tokens=2)


# -- outputs equal offline generation ---------------------------------------------------------------------------

def test_completion_streamed_and_not_equal_offline(client: openai.OpenAI, llm: LLM) -> None:
    prompt = "The quick brown fox jumps over the lazy dog"
    offline = llm.generate([prompt], greedy(24), use_tqdm=False)[0].outputs[0]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == NAME
    assert out.choices[0].text == offline.text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # token ids as the prompt give the same completion
    ids = llm.tokenizer.encode(prompt)
    assert client.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text == offline.text


def test_chat_streamed_and_not_equal_offline(client: openai.OpenAI, llm: LLM) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    offline = llm.chat(messages, greedy(20)).outputs[0]
    out = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=20, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == offline.text
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 20
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sampling_fields_map_to_sampling_params(client: openai.OpenAI, llm: LLM) -> None:
    """A seeded sample with every sampling field set equals the offline sample with the same SamplingParams."""
    prompt = "Once upon a time"
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, min_p=0.01, presence_penalty=0.5,
                            frequency_penalty=0.3, repetition_penalty=1.2, seed=1234, max_tokens=16, ignore_eos=True)
    offline = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    kw = dict(model=NAME, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.9, presence_penalty=0.5,
              frequency_penalty=0.3, seed=1234,
              extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.2, "ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == offline.text
    # a stop string cuts the text as offline, streamed or not
    text = offline.text
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].strip())
    cut = llm.generate([prompt], SamplingParams(**{**params.__dict__, "stop": [stop]}), use_tqdm=False)[0].outputs[0]
    assert len(cut.text) < len(text)
    out = client.completions.create(**kw, stop=stop)
    assert out.choices[0].text == cut.text and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_equal_offline(client: openai.OpenAI, llm: LLM) -> None:
    prompt = "Hello there"
    offline = llm.generate([prompt], greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x.logprob for x in offline.logprobs], abs=1e-4)
    assert lp.tokens == [f"token_id:{i}" for i in offline.token_ids]
    assert [sorted(t) for t in lp.top_logprobs] == [sorted(f"token_id:{i}" for i in x.top) for x in offline.logprobs]
    messages = [{"role": "user", "content": prompt}]
    offline = llm.chat(messages, greedy(5, logprobs=2)).outputs[0]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([x.logprob for x in offline.logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_n_and_best_of_equal_offline(client: openai.OpenAI, llm: LLM) -> None:
    """n samples of one request (streamed and not), and best_of's n most likely, as LLM.generate gives them."""
    prompt = "Several answers"
    params = SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=8, ignore_eos=True)
    offline = [c.text for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    out = client.completions.create(model=NAME, prompt=prompt, n=3, temperature=0.9, seed=11, max_tokens=8,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2] and [c.text for c in out.choices] == offline
    assert out.usage.completion_tokens == 24
    texts, reasons = ["", "", ""], [None, None, None]
    for chunk in client.completions.create(model=NAME, prompt=prompt, n=3, temperature=0.9, seed=11, max_tokens=8,
                                           stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            assert reasons[c.index] is None, "a choice went on after its last chunk"
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason
    assert texts == offline and reasons == ["length"] * 3
    best = SamplingParams(n=2, best_of=4, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    offline = [c.text for c in llm.generate([prompt], best, use_tqdm=False)[0].outputs]
    out = client.completions.create(model=NAME, prompt=prompt, n=2, best_of=4, temperature=1.0, seed=5, max_tokens=6,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in out.choices] == offline
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=NAME, messages=messages, n=2, temperature=0.9, seed=3, max_tokens=5,
                                          extra_body={"ignore_eos": True})
    offline = [c.text for c in llm.chat(messages, SamplingParams(n=2, temperature=0.9, seed=3, max_tokens=5,
                                                                 ignore_eos=True)).outputs]
    assert [c.message.content for c in chat.choices] == offline


def test_logit_bias_allowed_token_ids_and_bad_words_equal_offline(client: openai.OpenAI, llm: LLM) -> None:
    cases = [(dict(logit_bias={123: 100}), {"logit_bias": {"123": 100}}),  # OpenAI's keys are strings
             (dict(allowed_token_ids=[7, 99, 500]), {"allowed_token_ids": [7, 99, 500]}),
             (dict(bad_words=["the", "a"]), {"bad_words": ["the", "a"]})]
    for extra, body in cases:
        offline = llm.generate(["Masks"], SamplingParams(temperature=0.8, seed=2, max_tokens=6, ignore_eos=True,
                                                         **extra), use_tqdm=False)[0].outputs[0].text
        out = client.completions.create(model=NAME, prompt="Masks", max_tokens=6, temperature=0.8, seed=2,
                                        extra_body={"ignore_eos": True, **body})
        assert out.choices[0].text == offline, extra


def test_echo_puts_the_prompt_first(client: openai.OpenAI, llm: LLM) -> None:
    offline = llm.generate(["Echo this"], greedy(4), use_tqdm=False)[0].outputs[0].text
    out = client.completions.create(model=NAME, prompt="Echo this", max_tokens=4, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == "Echo this" + offline
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="Echo this", max_tokens=4, temperature=0, echo=True, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == "Echo this" + offline


def test_concurrent_clients_equal_offline(server: ServerProcess, llm: LLM) -> None:
    """40 clients at once, half streaming: one engine batches them and each gets its offline greedy output."""
    prompts = [f"Request number {i}: " + "tell me something " * (i % 7) for i in range(40)]
    lengths = [4 + (i * 7) % 29 for i in range(40)]
    offline = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    peak = {"running": 0}

    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, str, int]:
        kw = dict(model=NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                  extra_body={"ignore_eos": True})
        if i % 2:
            out = await aclient.completions.create(**kw)
            return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens
        text, reason, usage = "", None, None
        stream = await aclient.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, reason, usage

    async def watch(done: asyncio.Event) -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            for _ in range(int(LIMIT / 0.01)):
                if done.is_set():
                    return
                async with session.get(server.url + "/metrics") as r:
                    m = re.search(r"^cupaged_num_requests_running (\d+)", await r.text(), re.M)
                peak["running"] = max(peak["running"], int(m.group(1)))
                await asyncio.sleep(0.01)

    async def main() -> list[tuple[str, str, int]]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=LIMIT)
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(aclient, i) for i in range(40))), LIMIT)
        finally:
            done.set()
            await watcher
            await aclient.close()

    results = asyncio.run(main())
    for i, (text, reason, n) in enumerate(results):
        assert (text, reason, n) == (offline[i].outputs[0].text, "length", lengths[i]), i
    assert peak["running"] > 1  # the requests really shared steps
    m = metrics(server.url, KEY)
    assert m["cupaged_kv_blocks_used"] == 0 and m["cupaged_num_requests_running"] == 0


# -- bad input --------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (route, body, status, param or None, code or None)
    ("completions", b"{not json", 400, None, "invalid_json"),
    ("completions", b"[1, 2]", 400, None, "invalid_json"),
    ("chat/completions", b"\xff\xfe", 400, None, "invalid_json"),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "invalid_type"),
    ("completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens", "invalid_type"),
    ("completions", {"prompt": 42}, 400, "prompt", "invalid_type"),
    ("completions", {"max_tokens": 3}, 400, "prompt", "missing_required_parameter"),
    ("completions", {"prompt": "hi", "stop": [1]}, 400, "stop", "invalid_type"),
    ("chat/completions", {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages", "invalid_type"),
    ("chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "messages", "invalid_type"),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "model_not_found"),
    ("completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 600}, 400,
     "max_completion_tokens", "context_length_exceeded"),
    ("completions", {"prompt": "hello world " * 3000, "max_tokens": 4}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": "hi", "n": 0}, 400, "n", None),
    ("completions", {"prompt": "hi", "n": 2, "best_of": 1}, 400, "best_of", None),
    ("completions", {"prompt": "hi", "n": 1, "best_of": 3, "stream": True}, 400, "best_of", None),
    ("completions", {"prompt": "hi", "echo": True, "logprobs": 2}, 400, "echo", "unsupported_parameter"),
    ("completions", {"prompt": "hi", "logit_bias": {"a": 1}}, 400, "logit_bias", "invalid_type"),
    ("completions", {"prompt": "hi", "logit_bias": {"5": 200}}, 400, "logit_bias", None),
    ("completions", {"prompt": "hi", "logit_bias": {"99999": 1}}, 400, "logit_bias", None),
    ("completions", {"prompt": "hi", "allowed_token_ids": []}, 400, "allowed_token_ids", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "bad_words": [3]}, 400, "bad_words", None),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),  # SamplingParams refuses
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"prompt": [5, 100000]}, 400, "prompt", None),                   # the engine refuses
    ("completions", {"prompt": ""}, 400, "prompt", None),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter"),
    ("completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", None),           # over max_logprobs (20)
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs", None),
    ("completions", {"prompt": "hi", "stop_token_ids": [5000], "min_tokens": 2}, 400, "stop_token_ids", None),
    ("completions", b'{"prompt": "hi", "temperature": 1' + b"0" * 400 + b"}", 400, "temperature", "invalid_type"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools", "invalid_type"),  # a tool without its function
]


@pytest.mark.parametrize("route, body, status, param, code", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server: ServerProcess, route: str, body: bytes | dict, status: int,
                                        param: str | None, code: str | None) -> None:
    got, reply = http("POST", f"{server.url}/v1/{route}", body, key=KEY)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)


def test_unknown_route_and_method(server: ServerProcess) -> None:
    status, reply = http("GET", server.url + "/v1/nothing", key=KEY)
    assert status == 404 and "error" in reply
    status, reply = http("GET", server.url + "/v1/completions", key=KEY)
    assert status == 405 and "error" in reply


def test_bad_requests_leave_the_server_serving(server: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="hi", n=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=3).usage.completion_tokens >= 1
    m = metrics(server.url, KEY)
    assert m['cupaged_requests_rejected_total{reason="invalid"}'] >= 1
    assert m['cupaged_requests_rejected_total{reason="unknown_model"}'] >= 1


def test_metrics_are_prometheus_text(server: ServerProcess, client: openai.OpenAI) -> None:
    client.completions.create(model=NAME, prompt="count", max_tokens=5, extra_body={"ignore_eos": True})
    status, text = http("GET", server.url + "/metrics", key=KEY)
    assert status == 200
    sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"\})? -?[0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    m = metrics(server.url, KEY)
    for name in ("cupaged_num_requests_running", "cupaged_num_requests_waiting", "cupaged_kv_blocks_used",
                 "cupaged_kv_blocks_total", "cupaged_generation_tokens_total", "cupaged_generation_tokens_per_second",
                 "cupaged_requests_aborted_total", "cupaged_time_to_first_token_seconds_count",
                 "cupaged_inter_token_latency_seconds_count"):
        assert name in m, name
    assert m["cupaged_kv_blocks_total"] > 0 and m["cupaged_generation_tokens_total"] >= 5
    for hist in ("cupaged_time_to_first_token_seconds", "cupaged_inter_token_latency_seconds"):
        buckets = [v for k, v in m.items() if k.startswith(hist + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == m[hist + "_count"] > 0


# -- disconnects and queue limits (a slow engine: 20 ms a step, one sequence at a time) ---------------------------

async def _open_stream(session: aiohttp.ClientSession, url: str, max_tokens: int) -> aiohttp.ClientResponse:
    """Start a streamed completion and return once its first token arrived."""
    response = await session.post(url + "/v1/completions", json={
        "prompt": "abort me", "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0})
    assert response.status == 200
    for _ in range(100):
        line = await asyncio.wait_for(response.content.readline(), LIMIT)
        if line.startswith(b"data: {"):
            return response
    pytest.fail("no token came")


def test_client_disconnect_aborts_and_frees_blocks(slow_server: ServerProcess) -> None:
    url = slow_server.url
    before = metrics(url)

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            response = await _open_stream(session, url, 400)  # 8 s of tokens: it cannot finish first
            assert metrics(url)["cupaged_kv_blocks_used"] > 0
            response.close()  # hang up mid-stream

    asyncio.run(main())
    wait_for(lambda: metrics(url)["cupaged_requests_aborted_total"] == before["cupaged_requests_aborted_total"] + 1,
             "the abort")
    wait_for(lambda: metrics(url)["cupaged_kv_blocks_used"] == 0, "the blocks to be freed")
    after = metrics(url)
    assert after["cupaged_num_requests_running"] == 0
    assert after["cupaged_generation_tokens_total"] - before["cupaged_generation_tokens_total"] < 400


def test_non_streamed_client_disconnect_aborts(slow_server: ServerProcess) -> None:
    url = slow_server.url
    before = metrics(url)["cupaged_requests_aborted_total"]

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(session.post(url + "/v1/completions", json={
                    "prompt": "wait", "max_tokens": 400, "ignore_eos": True}), 0.3)

    asyncio.run(main())
    wait_for(lambda: metrics(url)["cupaged_requests_aborted_total"] == before + 1, "the abort")
    wait_for(lambda: metrics(url)["cupaged_kv_blocks_used"] == 0, "the blocks to be freed")


def test_full_queue_gets_503(slow_server: ServerProcess) -> None:
    url = slow_server.url

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            running = await _open_stream(session, url, 400)  # holds the one sequence slot
            waiting = asyncio.ensure_future(session.post(url + "/v1/completions", json={
                "prompt": "queued", "max_tokens": 400, "ignore_eos": True}))
            for _ in range(1000):
                m = metrics(url)
                if (m["cupaged_num_requests_running"], m["cupaged_num_requests_waiting"]) == (1, 1):
                    break
                await asyncio.sleep(0.01)
            async with session.post(url + "/v1/completions", json={"prompt": "one too many"}) as r:
                assert r.status == 503
                error = (await r.json())["error"]
                assert error["type"] == "server_error" and error["code"] == "overloaded"
            running.close()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

    before = metrics(url)
    asyncio.run(main())
    wait_for(lambda: metrics(url)["cupaged_requests_aborted_total"] == before["cupaged_requests_aborted_total"] + 2,
             "both aborts")
    wait_for(lambda: metrics(url)["cupaged_kv_blocks_used"] == 0, "the blocks to be freed")
    assert metrics(url)['cupaged_requests_rejected_total{reason="overloaded"}'] == 1


# -- graceful shutdown ------------------------------------------------------------------------------------------

def test_sigterm_under_load_answers_or_aborts_every_request(model: Path, tmp_path: Path) -> None:
    proc = ServerProcess(model, tmp_path / "server.log", "--shutdown-timeout", "1", step_delay=0.02)
    url = proc.url

    async def request(session: aiohttp.ClientSession, i: int) -> str:
        """The finish reason the client saw."""
        stream, max_tokens = i % 2 == 0, 3 if i % 4 < 2 else 400  # short ones end in time, long ones not
        body = {"prompt": f"load {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
        async with session.post(url + "/v1/completions", json=body) as r:
            assert r.status == 200
            if not stream:
                return (await r.json())["choices"][0]["finish_reason"]
            reasons, done = [], False
            async for line in r.content:
                if line.strip() == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: "):
                    chunk = json.loads(line[6:])
                    reasons += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
            assert done and len(reasons) == 1
            return reasons[0]

    async def main() -> tuple[list[str], int]:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.ensure_future(request(session, i)) for i in range(16)]
            for _ in range(1000):
                m = metrics(url)
                finished = m.get('cupaged_requests_finished_total{finish_reason="length"}', 0)
                if m["cupaged_num_requests_running"] + finished >= 16:
                    break
                await asyncio.sleep(0.01)
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with session.post(url + "/v1/completions", json={"prompt": "late"}) as r:
                late = r.status
            return await asyncio.wait_for(asyncio.gather(*tasks), LIMIT), late

    reasons, late = asyncio.run(main())
    assert late == 503
    assert reasons.count("length") == 8 and reasons.count("abort") == 8, reasons
    assert proc.proc.wait(LIMIT) == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()
    proc.stop()


# -- the engine core in a process of its own -------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_core_runs_in_its_own_process_and_its_death_stops_the_server(model: Path, tmp_path: Path) -> None:
    """The engine core is a child process of the server; when it dies, a live stream ends with an error event,
    /health and new requests get 503, and the server exits non-zero: never a hang."""
    proc = ServerProcess(model, tmp_path / "server.log", step_delay=0.02)
    url = proc.url
    core = int(re.search(r"engine core: process (\d+)", proc.output()).group(1))
    assert core in _children(proc.proc.pid) and core != proc.proc.pid
    with open(f"/proc/{core}/cmdline", "rb") as f:
        assert b"python" in f.read()

    async def main() -> tuple[list[dict], int, int]:
        async with aiohttp.ClientSession() as session:
            response = await _open_stream(session, url, 400)
            os.kill(core, signal.SIGKILL)
            events = []
            async for line in response.content:
                if line.startswith(b"data: {"):
                    events.append(json.loads(line[6:]))
            async with session.get(url + "/health") as r:
                health = r.status
            async with session.post(url + "/v1/completions", json={"prompt": "after"}) as r:
                late = r.status
            return events, health, late

    events, health, late = asyncio.run(asyncio.wait_for(main(), LIMIT))
    assert "error" in events[-1] and "engine core" in events[-1]["error"]["message"], events[-1]
    assert health == 503 and late == 503
    assert proc.proc.wait(LIMIT) == 1, proc.output()
    assert "Traceback" not in proc.output(), proc.output()
