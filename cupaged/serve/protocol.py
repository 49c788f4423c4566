"""The OpenAI request bodies: parsing and validation into prompts, messages and SamplingParams.

Every problem is an ApiError with OpenAI's error shape (message, type, param, code) and an HTTP status.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cupaged.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams
from cupaged.structured import grammar_for


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_MISSING = object()


def field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked against a JSON type: int, number, bool, str, list, object; null means the default."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value),
          "bool": isinstance(value, bool),
          "str": isinstance(value, str),
          "list": isinstance(value, list),
          "object": isinstance(value, dict)}[kind]
    if not ok:
        article = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string",
                   "list": "an array", "object": "an object"}[kind]
        raise ApiError(400, f"'{name}' must be {article}, got {json.dumps(value)[:80]}", name, "invalid_type")
    return float(value) if kind == "number" else value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _unsupported(body: dict, name: str, allowed: tuple = ()) -> None:
    value = body.get(name)
    if value is not None and value not in allowed and value != {} and value != []:
        raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")


def sampling_params_from(body: dict, chat: bool, forced: StructuredOutputsParams | None = None
                         ) -> tuple[SamplingParams, str | None]:
    """SamplingParams for an OpenAI request body, and the field that set max_tokens (None: not given). `forced` is
    the grammar of a tool call the request's tool_choice requires (serve/tool_calls.py)."""
    n = field(body, "n", "int", 1)
    best_of = field(body, "best_of", "int", None)
    if best_of is not None and best_of > n and field(body, "stream", "bool", False):
        raise ApiError(400, "best_of must equal n when streaming: which n samples are best is known only at the end",
                       "best_of")
    for name in ("suffix", "functions") if chat else ("suffix", "functions", "tools"):
        _unsupported(body, name)
    if not chat:  # a chat's tool_choice is checked with its tools (serve/tool_calls.py)
        _unsupported(body, "tool_choice", ("none", "auto"))
    structured = structured_outputs_from(body)
    if forced is not None:
        if structured is not None:
            raise ApiError(400, "a tool_choice that forces a call ('required' or a named function) constrains the "
                                "output to that call: it cannot be combined with 'response_format' or "
                                "'structured_outputs'", "tool_choice", "invalid_value")
        structured = forced
    if field(body, "echo", "bool", False) and body.get("logprobs") is not None:
        raise ApiError(400, "'echo' with 'logprobs' is not supported: the engine computes no prompt logprobs", "echo",
                       "unsupported_parameter")
    max_tokens_field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = field(body, max_tokens_field, "int", None)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or an array of strings", "stop", "invalid_type")
    stop_token_ids = field(body, "stop_token_ids", "list", [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise ApiError(400, "'stop_token_ids' must be an array of integers", "stop_token_ids", "invalid_type")
    if chat:
        want_logprobs = field(body, "logprobs", "bool", False)
        top = field(body, "top_logprobs", "int", None)
        if top is not None and not want_logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if want_logprobs else None
    else:
        logprobs = field(body, "logprobs", "int", None)
    logit_bias = field(body, "logit_bias", "object", None)
    if logit_bias is not None:  # OpenAI's keys are token ids written as strings
        try:
            logit_bias = {int(k): v for k, v in logit_bias.items()}
        except ValueError:
            raise ApiError(400, "'logit_bias' keys must be token ids (integers written as strings)", "logit_bias",
                           "invalid_type") from None
    kwargs = dict(
        n=n,
        logit_bias=logit_bias,
        allowed_token_ids=field(body, "allowed_token_ids", "list", None),
        bad_words=field(body, "bad_words", "list", []),
        best_of=best_of,
        temperature=field(body, "temperature", "number", 1.0),
        top_p=field(body, "top_p", "number", 1.0),
        top_k=field(body, "top_k", "int", 0),
        min_p=field(body, "min_p", "number", 0.0),
        presence_penalty=field(body, "presence_penalty", "number", 0.0),
        frequency_penalty=field(body, "frequency_penalty", "number", 0.0),
        repetition_penalty=field(body, "repetition_penalty", "number", 1.0),
        seed=field(body, "seed", "int", None),
        max_tokens=max_tokens,
        min_tokens=field(body, "min_tokens", "int", 0),
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=field(body, "ignore_eos", "bool", False),
        include_stop_str_in_output=field(body, "include_stop_str_in_output", "bool", False),
        skip_special_tokens=field(body, "skip_special_tokens", "bool", True),
        logprobs=logprobs,
        structured_outputs=structured,
    )
    try:
        return SamplingParams(**kwargs), max_tokens_field if max_tokens is not None else None
    except ValueError as exc:
        raise ApiError(400, str(exc), param_of(exc, chat)) from None


_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def structured_outputs_from(body: dict) -> StructuredOutputsParams | None:
    """The output constraint of a body: OpenAI's `response_format` (json_object, or json_schema with its schema;
    strict or not, constrained decoding follows the schema) or vLLM's `structured_outputs` ({"json" | "regex" |
    "choice" | "grammar" | "json_object": ...}). The schema, regex or grammar is compiled here, so that a bad one
    is a 400 naming the field the client wrote."""
    response_format = field(body, "response_format", "object", {})
    extra = field(body, "structured_outputs", "object", None)
    kind = response_format.get("type", "text")
    if kind == "text" and extra is None:
        return None
    if kind != "text" and extra is not None:
        raise ApiError(400, "give either 'response_format' or 'structured_outputs', not both", "structured_outputs")
    name = "structured_outputs" if kind == "text" else "response_format"
    if kind not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"response_format's type must be 'text', 'json_object' or 'json_schema', got "
                            f"{json.dumps(kind)[:80]}", name, "invalid_value")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError(400, "response_format of type 'json_schema' needs 'json_schema': {\"name\": ..., "
                                "\"schema\": {...}}, with the schema an object", name, "invalid_type")
        given = {"json": spec["schema"]}
    elif kind == "json_object":
        given = {"json_object": True}
    else:
        unknown = sorted(set(extra) - set(_STRUCTURED_KEYS))
        if unknown:
            raise ApiError(400, f"structured_outputs: {', '.join(unknown)} not supported (give one of "
                                f"{', '.join(_STRUCTURED_KEYS)})", name, "unsupported_parameter")
        given = {k: v for k, v in extra.items() if v is not None}
    try:
        structured = StructuredOutputsParams(**given)
        grammar_for(structured)
    except SamplingParamsError as exc:
        raise ApiError(400, str(exc), name) from None
    return structured


def param_of(exc: ValueError, chat: bool) -> str | None:
    """The request field a SamplingParams error is about (OpenAI's `param`), named as the client sent it."""
    name = getattr(exc, "field", None)
    if name == "max_tokens" and chat:
        return "max_completion_tokens"
    return {"logprobs": "top_logprobs" if chat else "logprobs"}.get(name, name)


def chat_messages(body: dict) -> list[dict[str, Any]]:
    """OpenAI messages as {"role", "content": str} for the chat template (text content parts are joined); a `tool`
    message keeps its "tool_call_id", an assistant message its "tool_calls" (checked: each arguments string is
    a JSON object, which templates are given)."""
    messages = field(body, "messages", "list", None)
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages", "invalid_type")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", "messages",
                           "invalid_type")
        role = "system" if m["role"] == "developer" else m["role"]
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ApiError(400, f"messages[{i}] of role 'tool' needs a string 'tool_call_id'", "messages",
                               "invalid_type")
            message["tool_call_id"] = m["tool_call_id"]
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = _history_tool_calls(m["tool_calls"], i)
        out.append(message)
    return out


def _history_tool_calls(calls: Any, i: int) -> list[dict]:
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be an array", "messages", "invalid_type")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), str):
            raise ApiError(400, f"{where}[{j}] must be {{\"id\": ..., \"type\": \"function\", \"function\": "
                                f"{{\"name\": string, \"arguments\": string}}}}", "messages", "invalid_type")
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ApiError(400, f"{where}[{j}].function.arguments must be a JSON object's text", "messages",
                           "invalid_value")
        out.append({"id": str(call.get("id", "")), "type": "function",
                    "function": {"name": function["name"], "arguments": function["arguments"]}})
    return out


def completion_prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt", _MISSING)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "batched prompts are not supported: send one prompt per request", "prompt",
                       "unsupported_parameter")
    if prompt is _MISSING:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    raise ApiError(400, "'prompt' must be a string or an array of token ids", "prompt", "invalid_type")
