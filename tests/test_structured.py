"""Structured outputs (llguidance): JSON schemas, json_object, regexes, choices and Lark grammars on the CPU engine
with random weights, where only the constraint can make the output valid; n > 1, beams, preemption, bad
constraints refused, and the server's response_format and structured_outputs."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import msgspec
import pytest

from cupaged import LLMEngine, SamplingParams, StructuredOutputsParams
from cupaged.engine.protocol import EngineCoreRequest
from cupaged.sampling_params import SamplingParamsError
from cupaged.structured import grammar_for

from tests.serving import KEY, ServerProcess, http

MAX_TOKENS = 200


@pytest.fixture(scope="module")
def engine(checkpoints) -> LLMEngine:
    return LLMEngine(str(checkpoints("qwen3-tiny")), device="cpu", num_kv_blocks=1024)


def run(engine: LLMEngine, params: list[SamplingParams], prompt: list[int] | None = None) -> list:
    """Run one request per params (all in one batch); their final outputs, in order."""
    for i, p in enumerate(params):
        engine.add_request(f"s{i}", prompt or [5 + i % 50, 17, 29], p)
    done = {}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert len(done) == len(params)
    return [done[f"s{i}"] for i in range(len(params))]


def _schemas() -> list[dict]:
    """50 schemas: listed ones of each feature, then generated nests of small objects, arrays, enums and ranges."""
    listed = [
        # additionalProperties false throughout: otherwise any key may follow, and a random model's keys are long
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999}},
         "required": ["a"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
         "required": ["name", "age"], "additionalProperties": False},
        {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
        {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
         "additionalProperties": False},
        {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
         "required": ["ok", "note"], "additionalProperties": False},
        {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"],
         "additionalProperties": False},
        {"type": "object", "properties": {"p": {"$ref": "#/$defs/point"}, "q": {"$ref": "#/$defs/point"}},
         "required": ["p", "q"], "additionalProperties": False,
         "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                               "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                             "required": ["x", "y"], "additionalProperties": False}}},
        {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "string", "maxLength": 4}]},
        {"type": "object", "properties": {"v": {"anyOf": [{"type": "boolean"}, {"enum": [1, 2, 3]}]}},
         "required": ["v"], "additionalProperties": False},
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                   "minItems": 1, "maxItems": 3}},
         "required": ["tags"], "additionalProperties": False},
        {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
         "required": ["id"], "additionalProperties": False},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "b": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["a"], "additionalProperties": False},  # b optional
        {"type": "object", "properties": {"inner": {"type": "object", "properties": {
            "deep": {"type": "object", "properties": {"z": {"const": "zz"}}, "required": ["z"],
                     "additionalProperties": False}}, "required": ["deep"], "additionalProperties": False}},
         "required": ["inner"], "additionalProperties": False},
        {"enum": ["alpha", "beta", 3, None, True]},
        {"type": "string", "maxLength": 8},
        {"type": "integer", "minimum": 10, "maximum": 20},
        {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}],
         "minItems": 2, "maxItems": 2},
        {"type": "object", "properties": {"m": {"type": "array", "items": {"type": "array", "items": {
            "type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 2}, "minItems": 1,
            "maxItems": 2}}, "required": ["m"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1,
                                                                              "maximum": 9}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"oneOf": [{"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"],
                    "additionalProperties": False},
                   {"type": "object", "properties": {"b": {"const": 2}}, "required": ["b"],
                    "additionalProperties": False}]},
    ]
    rng = random.Random(16)

    def leaf() -> dict:
        return rng.choice([
            {"type": "integer", "minimum": rng.randint(-50, 0), "maximum": rng.randint(1, 50)},
            {"type": "string", "maxLength": rng.randint(1, 6)},
            {"type": "boolean"},
            {"enum": rng.sample(["x", "y", "z", "w", 7, 8, False], rng.randint(1, 4))},
            {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
             "minItems": rng.randint(0, 2), "maxItems": 3},
        ])

    def node(depth: int) -> dict:
        keys = rng.sample(["a", "b", "c", "d", "e"], rng.randint(1, 3))
        props = {k: node(depth - 1) if depth and rng.random() < 0.4 else leaf() for k in keys}
        return {"type": "object", "properties": props, "required": rng.sample(keys, rng.randint(1, len(keys))),
                "additionalProperties": False}

    return listed + [node(2) for _ in range(50 - len(listed))]


SCHEMAS = _schemas()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schemas_give_valid_json(engine: LLMEngine, temperature: float) -> None:
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=MAX_TOKENS,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for i, schema in enumerate(SCHEMAS)]
    for schema, out in zip(SCHEMAS, run(engine, params)):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)


def test_json_object_and_schema_as_text(engine: LLMEngine) -> None:
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS,
                             structured_outputs=StructuredOutputsParams(json_object=True)) for i in range(4)]
    params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(
        json=json.dumps(SCHEMAS[1]))))
    outs = run(engine, params)
    finished = [o.outputs[0] for o in outs[:4] if o.outputs[0].finish_reason == "stop"]
    assert finished, [o.outputs[0].text for o in outs]  # any object: a random model may go on past the budget
    for completion in finished:
        assert isinstance(json.loads(completion.text), dict)
    jsonschema.validate(json.loads(outs[4].outputs[0].text), SCHEMAS[1])


REGEXES = [r"[a-c]{2,5}-[0-9]{2}", r"(yes|no)!", r"[0-9]{3}-[0-9]{4}", r"[a-z0-9]{1,8}@[a-z]{1,5}\.(com|org)",
           r"(ab)+c?", r"[A-Z][a-z]{0,6} [A-Z][a-z]{0,6}", r"0x[0-9a-f]{1,8}", r"\(\d{1,2}, \d{1,2}\)"]


def test_regexes_are_matched(engine: LLMEngine) -> None:
    params = [SamplingParams(temperature=t, seed=i, max_tokens=60,
                             structured_outputs=StructuredOutputsParams(regex=regex))
              for i, regex in enumerate(REGEXES) for t in (0.0, 1.0)]
    for p, out in zip(params, run(engine, params)):
        completion = out.outputs[0]
        regex = p.structured_outputs.regex
        if completion.finish_reason == "length":  # an unbounded regex (ab)+ may go on: its prefix still matches
            assert regex == r"(ab)+c?" and re.fullmatch(r"(ab)*a?", completion.text), completion.text
        else:
            assert completion.finish_reason == "stop" and re.fullmatch(regex, completion.text), (regex, completion)


def test_choice_gives_one_of_them(engine: LLMEngine) -> None:
    choices = ["yes", "no", "maybe so", "it depends: {x}"]
    params = [SamplingParams(temperature=t, seed=i, max_tokens=20,
                             structured_outputs=StructuredOutputsParams(choice=choices))
              for i in range(8) for t in (0.0, 1.5)]
    texts = [o.outputs[0].text for o in run(engine, params)]
    assert set(texts) <= set(choices) and len(set(texts)) > 1, texts


def test_the_grammar_wins_over_bans_and_allowed_ids_that_leave_nothing(engine: LLMEngine) -> None:
    """A complete grammar allows only EOS; min_tokens bans EOS; allowed_token_ids that the grammar never allows:
    a row must keep a token to sample, and the grammar's is kept."""
    choice = StructuredOutputsParams(choice=["yes", "no"])
    outs = run(engine, [SamplingParams(temperature=1.0, seed=i, max_tokens=30, min_tokens=20, structured_outputs=choice)
                        for i in range(3)]
               + [SamplingParams(temperature=0, max_tokens=30, allowed_token_ids=[1000], structured_outputs=choice)])
    for out in outs:
        assert out.outputs[0].text in ("yes", "no") and out.outputs[0].finish_reason == "stop", out.outputs[0]


def test_lark_grammar(engine: LLMEngine) -> None:
    grammar = r"""
        start: expr
        expr: term (("+" | "-") term)*
        term: NUMBER | "(" expr ")"
        NUMBER: /[1-9][0-9]?/
    """
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=80,
                             structured_outputs=StructuredOutputsParams(grammar=grammar)) for i in range(6)]
    for out in run(engine, params):
        completion = out.outputs[0]
        if completion.finish_reason == "stop":  # the grammar is unbounded: a sample may still be going on
            assert re.fullmatch(r"[0-9+\-()]+", completion.text)
            eval(completion.text, {"__builtins__": {}})  # an arithmetic expression Python reads too
    assert any(o.outputs[0].finish_reason == "stop" for o in run(engine, params[:3]))


def test_n_samples_each_follow_the_schema(engine: LLMEngine) -> None:
    schema = SCHEMAS[2]
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=MAX_TOKENS,
                            structured_outputs=StructuredOutputsParams(json=schema))
    (out,) = run(engine, [params])
    assert len(out.outputs) == 4 and len({c.text for c in out.outputs}) > 1
    for completion in out.outputs:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), schema)


def test_beams_each_follow_the_choice(engine: LLMEngine) -> None:
    choices = ["red", "green", "blue", "yellow"]
    params = SamplingParams(beam_width=3, n=3, temperature=0, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(choice=choices))
    (out,) = run(engine, [params])
    assert len(out.outputs) == 3
    for completion in out.outputs:
        assert completion.text in choices, completion.text


def test_preempted_requests_keep_their_grammar(checkpoints) -> None:
    engine = LLMEngine(str(checkpoints("qwen3-tiny")), device="cpu", num_kv_blocks=24, block_size=8)
    schema = {"type": "object", "properties": {"k": {"type": "array", "items": {"type": "integer", "minimum": 100,
                                                                                 "maximum": 999},
                                                     "minItems": 6, "maxItems": 8}},
              "required": ["k"], "additionalProperties": False}
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=100,
                             structured_outputs=StructuredOutputsParams(json=schema)) for i in range(6)]
    outs = run(engine, params, prompt=list(range(10, 40)))
    assert engine.stats.num_preemptions > 0, "the cache was meant to be too small: preemption must happen"
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


@pytest.mark.parametrize("given, words", [
    (dict(json={"type": "nonsense"}), "structured_outputs.json"),
    (dict(regex="a(b"), "unclosed group"),
    (dict(grammar="start: undefined_rule"), "structured_outputs.grammar"),
])
def test_bad_constraints_are_refused(engine: LLMEngine, given: dict, words: str) -> None:
    params = SamplingParams(structured_outputs=StructuredOutputsParams(**given))
    with pytest.raises(SamplingParamsError, match=re.escape(words)) as info:
        engine.add_request("bad", [5, 6], params)
    assert info.value.field == "structured_outputs"
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("given", [{}, dict(regex="a", choice=["b"]), dict(choice=[]), dict(json=3),
                                   dict(regex=""), dict(json_object=1), dict(choice=["a", 2])])
def test_malformed_structured_outputs_params(given: dict) -> None:
    with pytest.raises(SamplingParamsError) as info:
        StructuredOutputsParams(**given)
    assert info.value.field == "structured_outputs"
    with pytest.raises(SamplingParamsError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})


@pytest.mark.parametrize("given", [dict(json={"type": "object"}), dict(json='{"type": "integer"}'),
                                   dict(regex="a+"), dict(choice=["x", "y"]), dict(grammar='start: "a"'),
                                   dict(json_object=True)])
def test_params_travel_to_the_core_process(given: dict) -> None:
    request = EngineCoreRequest("r", [1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(**given)))
    decoded = msgspec.msgpack.Decoder(EngineCoreRequest).decode(msgspec.msgpack.encode(request))
    assert decoded.params == request.params
    grammar_for(decoded.params.structured_outputs)



@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(checkpoints("qwen3-tiny"), tmp_path_factory.mktemp("server") / "server.log", "--api-key", KEY)
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


def _text(route: str, reply: dict) -> tuple[str, str]:
    choice = reply["choices"][0]
    return (choice["message"]["content"] if route == "chat/completions" else choice["text"]), choice["finish_reason"]


def _body(route: str, **extra) -> dict:
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if route == "chat/completions" else {"prompt": "hi"}
    return {**prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_server_response_format_and_structured_outputs(server: ServerProcess, route: str) -> None:
    schema = SCHEMAS[1]
    url = f"{server.url}/v1/{route}"
    status, reply = http("POST", url, _body(route, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}), key=KEY)
    assert status == 200, reply
    text, reason = _text(route, reply)
    assert reason == "stop"
    jsonschema.validate(json.loads(text), schema)
    finished = 0
    for seed in range(4):
        status, reply = http("POST", url, _body(route, temperature=1.0, seed=seed,
                                                response_format={"type": "json_object"}), key=KEY)
        assert status == 200, reply
        text, reason = _text(route, reply)
        if reason == "stop":  # any object: a random model may write past the budget
            finished += 1
            assert isinstance(json.loads(text), dict)
    assert finished
    status, reply = http("POST", url, _body(route, temperature=1.0, seed=1,
                                            structured_outputs={"choice": ["left", "right"]}), key=KEY)
    assert status == 200 and _text(route, reply) in [("left", "stop"), ("right", "stop")], reply


@pytest.mark.parametrize("extra, param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(structured_outputs={"regex": "a(b"}), "structured_outputs"),
    (dict(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
    (dict(structured_outputs={"whitespace_pattern": "a"}), "structured_outputs"),
    (dict(structured_outputs={"choice": "ab"}), "structured_outputs"),
    (dict(structured_outputs={"choice": ["a"]}, response_format={"type": "json_object"}), "structured_outputs"),
])
def test_server_refuses_bad_constraints(server: ServerProcess, extra: dict, param: str) -> None:
    status, reply = http("POST", f"{server.url}/v1/completions", _body("completions", **extra), key=KEY)
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["message"], reply
