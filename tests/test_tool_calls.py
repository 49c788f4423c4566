"""Tool calling in /v1/chat/completions: the parsers (Hermes/Qwen and Llama 3.1 JSON; streamed in any chunking
gives the calls of the whole reply), request validation, the prompt, the grammar of forced calls through a live
server on a random-weight checkpoint, and the real SmolLM2 model through the openai client.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cupaged.serve.protocol import ApiError, chat_messages, sampling_params_from
from cupaged.serve.tool_calls import (HERMES, LLAMA3_JSON, ToolCallParser, ToolRequest, forced_call_grammar,
                                      parse_reply, template_messages, tool_format, tool_request_from)
from cupaged.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "now", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                  "required": ["utc"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# well-formed replies, and the (content, [(name, arguments)]) each parses to
WELL_FORMED = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>', HERMES,
     None, [("get_weather", '{"city": "Paris", "days": 3}')]),
    ('Let me look.\n<tool_call>\n{"name": "f", "arguments": {"s": "a } ] \\" </tool_call>", "x": [1, {"y": null}]}}'
     '\n</tool_call>\n<tool_call>{"name":"g","arguments":{}}</tool_call>', HERMES,
     "Let me look.", [("f", '{"s": "a } ] \\" </tool_call>", "x": [1, {"y": null}]}'), ("g", "{}")]),
    ('<tool_call>\n{"arguments": {"b": true}, "name": "h"}\n</tool_call>', HERMES, None, [("h", '{"b": true}')]),
    ('<tool_call>\n{"name": "u", "arguments": {"a": 1}}', HERMES, None, [("u", '{"a": 1}')]),  # no closing tag
    ("No tools needed: 2 < 3 and <b>bold</b>.", HERMES, "No tools needed: 2 < 3 and <b>bold</b>.", []),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"q": "x;y"}}', LLAMA3_JSON,
     None, [("f", '{"a": 1}'), ("g", '{"q": "x;y"}')]),
    ('\n {"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}', LLAMA3_JSON,
     None, [("get_weather", '{"city": "Oslo", "days": 1}')]),
    ("Plain words, {braces} too.", LLAMA3_JSON, "Plain words, {braces} too.", []),
    ('{"answer": 42}', LLAMA3_JSON, '{"answer": 42}', []),
    ('{"name": "f", "parameters": {"a": 1}} and then prose', LLAMA3_JSON, "and then prose", [("f", '{"a": 1}')]),
]

MALFORMED = [
    ('<tool_call>{"name": "f", "arguments": {oops}}</tool_call> then text', HERMES),
    ('<tool_call>{"name": "f", "arguments": "not an object"}</tool_call>', HERMES),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', HERMES),
    ('<tool_call>\n{"name": "f", "arguments": {"a": ', HERMES),  # cut off
    ('{"name": "f", "parameters": [1]}', LLAMA3_JSON),
    ('{"name": "f", "parameters": {"a": 1', LLAMA3_JSON),
]


def calls_of(calls) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("text,fmt,content,calls", WELL_FORMED)
def test_whole_reply_parses(text: str, fmt: str, content: str | None, calls: list) -> None:
    got_content, got_calls = parse_reply(text, fmt)
    assert (got_content, calls_of(got_calls)) == (content, calls)
    for call in got_calls:
        assert call.id.startswith("call_") and len(call.id) > 10
        assert isinstance(json.loads(call.arguments), dict)
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("text,fmt", MALFORMED)
def test_malformed_calls_stay_content(text: str, fmt: str) -> None:
    assert parse_reply(text, fmt) == (text, [])


def stream(text: str, fmt: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]], list[dict]]:
    """Feed `text` cut at `cuts`; (content, calls assembled from the delta entries, the entries)."""
    parser = ToolCallParser(fmt)
    bounds = [0, *sorted(set(cuts)), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    deltas = [parser.feed(p) for p in pieces[:-1]] + [parser.finish(pieces[-1])]
    content, calls, entries = "", {}, []
    for delta in deltas:
        content += delta.content
        assert len({e["index"] for e in delta.tool_calls}) == len(delta.tool_calls)  # one entry per call a chunk
        for entry in delta.tool_calls:
            entries.append(entry)
            if entry["index"] not in calls:
                # a call's first entry names it; arguments follow
                assert entry["id"].startswith("call_") and entry["type"] == "function"
                assert entry["index"] == len(calls)
                calls[entry["index"]] = [entry["function"]["name"], ""]
            else:
                assert set(entry) == {"index", "function"} and set(entry["function"]) == {"arguments"}
            calls[entry["index"]][1] += entry["function"]["arguments"]
    return content, [tuple(c) for c in calls.values()], entries


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(WELL_FORMED), st.lists(st.integers(min_value=1, max_value=160), max_size=12))
def test_streamed_in_any_chunking_gives_the_whole_replys_calls(case: tuple, cuts: list[int]) -> None:
    text, fmt, content, calls = case
    cuts = [c for c in cuts if c < len(text)]
    got_content, got_calls, _ = stream(text, fmt, cuts)
    assert got_calls == calls
    assert got_content == (content or "")
    assert "<tool_call" not in got_content and "python_tag" not in got_content


def test_streamed_one_character_at_a_time_streams_arguments() -> None:
    text = WELL_FORMED[1][0]
    _, calls, entries = stream(text, HERMES, list(range(1, len(text))))
    assert calls == WELL_FORMED[1][3]
    # the first call's arguments arrive in many fragments, after the entry that names it
    assert sum(1 for e in entries if e["index"] == 0) > 10
    assert entries[0]["function"] == {"name": "f", "arguments": "{"}  # named as soon as its arguments begin


def test_malformed_streams_lose_nothing() -> None:
    """A stream commits to a call once its name is known (so a call broken later stays a call, as far as it came);
    before that, nothing is lost: what was no call is content."""
    rng = random.Random(0)
    for text, fmt in MALFORMED:
        for _ in range(30):
            content, calls, _ = stream(text, fmt, rng.sample(range(1, len(text)), rng.randint(0, 6)))
            assert (content, calls) == (text, []) or [name for name, _ in calls] == ["f"]


def test_format_follows_the_template() -> None:
    assert tool_format(None) == HERMES
    assert tool_format("{{ '<|im_start|>' }}{% if tools %}<tools>{% endif %}") == HERMES
    assert tool_format("{{- '<|python_tag|>' + tool_call.name }} parameters") == LLAMA3_JSON


# -- validation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,param,says", [
    ({"tools": {"type": "function"}}, "tools", "array"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0]"),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools", "parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools", "description"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "'required' or {\"type\": \"function\""),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "got {\"type\": \"function\"}"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
])
def test_bad_tools_are_refused_naming_the_field(body: dict, param: str, says: str) -> None:
    with pytest.raises(ApiError) as info:
        tool_request_from(body)
    assert info.value.status == 400 and info.value.param == param
    assert says in info.value.message


def test_tool_choice_defaults() -> None:
    assert tool_request_from({}) is None
    assert tool_request_from({"tool_choice": "none"}) is None
    request = tool_request_from({"tools": TOOLS})
    assert (request.choice, request.parallel, request.parses, request.forced) == ("auto", True, True, False)
    named = tool_request_from({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "now"}},
                               "parallel_tool_calls": False})
    assert (named.choice, named.parallel, named.forced) == ("now", False, True)
    assert not tool_request_from({"tools": TOOLS, "tool_choice": "none"}).parses


def test_forced_call_with_another_constraint_is_refused() -> None:
    forced = forced_call_grammar(ToolRequest(TOOLS, "required", True), HERMES)
    for extra in ({"response_format": {"type": "json_object"}}, {"structured_outputs": {"regex": "a+"}}):
        with pytest.raises(ApiError) as info:
            sampling_params_from({"messages": [], **extra}, chat=True, forced=forced)
        assert info.value.param == "tool_choice" and "cannot be combined" in info.value.message
    params, _ = sampling_params_from({"messages": []}, chat=True, forced=forced)
    assert params.structured_outputs is forced
    assert forced_call_grammar(ToolRequest(TOOLS, "auto", True), HERMES) is None


def test_completions_refuse_tools() -> None:
    for body in ({"tools": TOOLS}, {"tool_choice": "required"}):
        with pytest.raises(ApiError) as info:
            sampling_params_from(body, chat=False)
        assert info.value.param in ("tools", "tool_choice")


def test_unusable_parameters_schema_is_refused_naming_tools() -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}
    with pytest.raises(ApiError) as info:
        forced_call_grammar(ToolRequest([bad], "f", False), HERMES)
    assert info.value.param == "tools" and "bogus" in info.value.message


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "days": 2}'}}
HISTORY = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": "Weather in Oslo?"},
           {"role": "assistant", "content": None, "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "call_1", "content": "Snow, -3 C"}]


@pytest.mark.parametrize("messages,says", [
    ([{"role": "tool", "content": "x"}], "tool_call_id"),
    ([{"role": "assistant", "tool_calls": {"id": "x"}}], "messages[0].tool_calls must be an array"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}], "messages[0].tool_calls[0]"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "JSON object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], "JSON object"),
])
def test_bad_tool_history_is_refused(messages: list, says: str) -> None:
    with pytest.raises(ApiError) as info:
        chat_messages({"messages": messages})
    assert info.value.status == 400 and info.value.param == "messages" and says in info.value.message


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# a template with a place for tools, as Qwen's: tools and calls come as data
WITH_TOOLS = ("{% if tools is defined %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
              "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.tool_calls is defined %}"
              "{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
              "{% endif %}|{% endfor %}")


def render(template: str, messages: list, request: ToolRequest | None) -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(HFTokenizer(WordLevel({"a": 0}, unk_token="a")), template)
    rendered, tools = template_messages(chat_messages({"messages": messages}), request, template)
    return tokenizer.apply_chat_template(rendered, tools=tools)


def test_history_renders_as_text_for_a_template_without_tools() -> None:
    prompt = render(CHATML, HISTORY, ToolRequest(TOOLS, "auto", True))
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools")  # appended to the system message
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
            '\n</tool_call><|im_end|>') in prompt
    assert "<|im_start|>user\n<tool_response>\nSnow, -3 C\n</tool_response><|im_end|>" in prompt
    # with tool_choice "none" the tools are not shown; the history still is
    quiet = render(CHATML, HISTORY[1:], ToolRequest(TOOLS, "none", True))
    assert "# Tools" not in quiet and "<tool_response>" in quiet and quiet.startswith("<|im_start|>user")
    assert render(CHATML, HISTORY[1:2], ToolRequest(TOOLS, "auto", True)).startswith("<|im_start|>system\n# Tools")


def test_history_and_tools_go_to_a_template_that_takes_them() -> None:
    prompt = render(WITH_TOOLS, HISTORY, ToolRequest(TOOLS, "required", True))
    assert prompt == ("TOOLS:get_weather;now;|system: Be brief.|user: Weather in Oslo?|assistant: CALL get_weather Oslo|"
                      "tool: Snow, -3 C|")
    assert "TOOLS" not in render(WITH_TOOLS, HISTORY, None)  # no tools: `tools` is undefined, as before


# -- through the server ------------------------------------------------------------------------------------------

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from tests.serving import LIMIT, NAME, ServerProcess, http  # noqa: E402


def _checkpoint(tmp_path_factory: pytest.TempPathFactory, preset: str) -> Path:
    from tools.make_checkpoint import make_checkpoint

    # room for the tools' system prompt, which this tiny vocabulary spells in many tokens
    return make_checkpoint(tmp_path_factory.mktemp(preset), preset, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(_checkpoint(tmp_path_factory, "qwen3-tiny"),
                         tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory):
    """A Llama 3 checkpoint whose template says it knows `<|python_tag|>`: Llama 3.1's JSON calls."""
    path = _checkpoint(tmp_path_factory, "llama3-tiny")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] += "{# Llama 3.1 calls tools after <|python_tag|> #}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    proc = ServerProcess(path, tmp_path_factory.mktemp("llama") / "server.log")
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


def client_of(server: ServerProcess) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=LIMIT)


def ask(client: "openai.OpenAI", stream: bool, **kw: object) -> tuple[str | None, list[dict], str]:
    """(content, tool calls as dicts, finish reason) of one chat completion; a stream's deltas assembled."""
    kw = {"model": NAME, "messages": [{"role": "user", "content": "Weather in Lima?"}], "max_tokens": 120, **kw}
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for entry in delta.tool_calls or []:
            if entry.index == len(calls):
                assert entry.id and entry.function.name and entry.type == "function"
                calls.append({"id": entry.id, "name": entry.function.name, "arguments": ""})
            calls[entry.index]["arguments"] += entry.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content or None, calls, finish


def check_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["name"] in names and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("choice", ["required", "get_weather", "now"])
def test_forced_calls_match_the_tools_schema(server: ServerProcess, choice: str, temperature: float,
                                             stream: bool) -> None:
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    names = {"get_weather", "now"} if choice == "required" else {choice}
    for seed in range(2 if temperature else 1):
        content, calls, finish = ask(client_of(server), stream, tools=TOOLS, tool_choice=tool_choice,
                                     parallel_tool_calls=False, temperature=temperature, seed=seed)
        assert finish == "tool_calls" and content is None and len(calls) == 1
        check_calls(calls, names)


def test_parallel_forced_calls_are_each_valid(server: ServerProcess) -> None:
    finished = 0
    for seed in range(3):
        content, calls, finish = ask(client_of(server), False, tools=TOOLS, tool_choice="required", temperature=1.0,
                                     seed=seed, max_tokens=400)
        if finish == "tool_calls":  # a random model may go on calling until its budget ends
            check_calls(calls, {"get_weather", "now"})
            assert content is None
            finished += 1
    assert finished


def test_each_of_n_streamed_choices_gets_its_own_calls(server: ServerProcess) -> None:
    calls: dict[int, dict[int, list[str]]] = {0: {}, 1: {}}
    finish = {}
    for chunk in client_of(server).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, n=2, seed=1, temperature=1.0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
            max_tokens=120, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.content
            for entry in choice.delta.tool_calls or []:
                got = calls[choice.index].setdefault(entry.index, [entry.function.name, ""])
                got[1] += entry.function.arguments or ""
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for index in (0, 1):
        assert list(calls[index]) == [0] and calls[index][0][0] == "get_weather"
        jsonschema.validate(json.loads(calls[index][0][1]), SCHEMAS["get_weather"])


def test_streamed_and_whole_replies_agree(server: ServerProcess) -> None:
    kw = dict(tools=TOOLS, tool_choice="required", temperature=1.0, seed=7, max_tokens=400)
    whole, streamed = ask(client_of(server), False, **kw), ask(client_of(server), True, **kw)
    strip = [[{k: v for k, v in c.items() if k != "id"} for c in r[1]] for r in (whole, streamed)]
    assert strip[0] == strip[1] and whole[0] == streamed[0] and whole[2] == streamed[2]


def test_tool_choice_none_and_history(server: ServerProcess) -> None:
    client = client_of(server)
    plain = client.chat.completions.create(model=NAME, messages=HISTORY, max_tokens=8, temperature=0)
    none = client.chat.completions.create(model=NAME, messages=HISTORY, max_tokens=8, temperature=0, tools=TOOLS,
                                          tool_choice="none")
    # "none": the tools are not shown, nothing is parsed: the same answer as without tools
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens and not none.choices[0].message.tool_calls
    auto = client.chat.completions.create(model=NAME, messages=HISTORY, max_tokens=8, temperature=0, tools=TOOLS)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools' system prompt


def test_server_refuses_bad_tool_requests(server: ServerProcess) -> None:
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, param in [({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
                          "tool_choice"),
                         ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
                         ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                          "tool_choice"),
                         ({"messages": [{"role": "tool", "content": "x"}]}, "messages")]:
        status, body = http("POST", server.url + "/v1/chat/completions", {**base, **extra})
        assert status == 400 and body["error"]["param"] == param, body
    status, body = http("POST", server.url + "/v1/completions", {"prompt": "hi", "tools": TOOLS})
    assert status == 400 and body["error"]["param"] == "tools"


@pytest.mark.parametrize("stream", [False, True])
def test_llama_format_forced_calls(llama_server: ServerProcess, stream: bool) -> None:
    content, calls, finish = ask(client_of(llama_server), stream, tools=TOOLS, tool_choice="required",
                                 parallel_tool_calls=False, temperature=0)
    assert finish == "tool_calls" and content is None and len(calls) == 1
    check_calls(calls, {"get_weather", "now"})


# -- the real default model --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install cupaged[gguf])")
    from cupaged.default_model import DefaultModelError, default_model_path

    try:
        path = default_model_path()
    except DefaultModelError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"default model not available: {exc}")
    proc = ServerProcess(path, tmp_path_factory.mktemp("smollm2") / "server.log")
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


CITY_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name"}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_smollm2_calls_the_weather_tool(smollm2_server: ServerProcess, stream: bool) -> None:
    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    content, calls, finish = ask(client, stream, tools=[CITY_WEATHER], tool_choice="required",
                                 parallel_tool_calls=False, temperature=0, max_tokens=40,
                                 messages=[{"role": "user", "content": "What is the weather like in Paris today?"}])
    assert finish == "tool_calls" and content is None and len(calls) == 1
    assert calls[0]["name"] == "get_weather"
    arguments = json.loads(calls[0]["arguments"])
    jsonschema.validate(arguments, CITY_WEATHER["function"]["parameters"])
    assert "paris" in arguments["city"].lower()
