"""Tool calling for /v1/chat/completions: the request's tools and tool_choice, the prompt that shows them to the
model, the grammar that forces a call, and the parsers that turn the model's text into OpenAI `tool_calls`.

Two output formats, picked from the chat template:
- Hermes / Qwen (the default): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call,
  possibly with text around them.
- Llama 3.1 JSON (templates that mention `<|python_tag|>`): the whole reply is `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`, several calls separated by `;`.

A template that does not use `tools` at all (SmolLM2's) gets the tools as a Hermes-style system message, and the
history's tool calls and results as text in the same format, so the model sees what it would have written.

`ToolCallParser` is one state machine for both the streamed and the whole reply: a whole reply comes in one piece,
so every call in it is complete and is checked as a whole (malformed markup stays content); a stream commits to
a call as soon as its name is known and then streams the raw text of its arguments, as they arrive. A call's
`arguments` is the model's own JSON text of the arguments object, so the streamed fragments concatenate to
exactly the non-streamed string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field as dc_field
from typing import Any

from cupaged.sampling_params import SamplingParamsError, StructuredOutputsParams
from cupaged.serve.protocol import ApiError, field
from cupaged.structured import grammar_for

HERMES, LLAMA3_JSON = "hermes", "llama3_json"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
# The start of a call object whose name comes first: its arguments can then be streamed as they arrive.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_JSON = json.JSONDecoder()
_CHOICES = "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"


@dataclass
class ToolRequest:
    """What a chat request asks of tools: `tools` as the client gave them (validated), `choice` one of "none",
    "auto", "required" or the name of the function to call, and whether several calls may come at once."""

    tools: list[dict]
    choice: str
    parallel: bool

    @property
    def parses(self) -> bool:
        """Whether the reply is parsed for tool calls ("none" leaves it as text)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice not in ("none", "auto")


def tool_request_from(body: dict) -> ToolRequest | None:
    """The tools of a chat body, validated (ApiError 400 naming the field); None when it has none."""
    tools = field(body, "tools", "list", [])
    choice = body.get("tool_choice")
    parallel = field(body, "parallel_tool_calls", "bool", True)
    names: list[str] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ApiError(400, f"{where} must be an object with \"type\": \"function\"", "tools", "invalid_type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ApiError(400, f"{where}.function must be an object", "tools", "invalid_type")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ApiError(400, f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got "
                                f"{json.dumps(name)[:80]}", "tools", "invalid_value")
        if name in names:
            raise ApiError(400, f"{where}.function.name {name!r} is given twice", "tools", "invalid_value")
        names.append(name)
        if not isinstance(function.get("description", ""), str):
            raise ApiError(400, f"{where}.function.description must be a string", "tools", "invalid_type")
        if not isinstance(function.get("parameters", {}), dict):
            raise ApiError(400, f"{where}.function.parameters must be a JSON schema (an object)", "tools",
                           "invalid_type")
    if choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise ApiError(400, f"'tool_choice' must be {_CHOICES}, got {json.dumps(choice)[:80]}", "tool_choice",
                           "invalid_type")
        if function["name"] not in names:
            raise ApiError(400, f"tool_choice names the function {function['name']!r}, which is not in 'tools'",
                           "tool_choice", "invalid_value")
        choice = function["name"]
    elif choice not in ("none", "auto", "required"):
        raise ApiError(400, f"'tool_choice' must be {_CHOICES}, got {json.dumps(choice)[:80]}", "tool_choice",
                       "invalid_value")
    elif choice == "required" and not tools:
        raise ApiError(400, "tool_choice 'required' needs 'tools'", "tool_choice", "invalid_value")
    if not tools:
        return None
    return ToolRequest(tools, choice, parallel)


def tool_format(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches its model: Llama 3.1's JSON when it mentions
    `<|python_tag|>` (Llama 3.1-3.3 templates do), else Hermes / Qwen."""
    return LLAMA3_JSON if chat_template and PYTHON_TAG in chat_template else HERMES


def template_uses_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


# -- the prompt ---------------------------------------------------------------------------------------------------

def _call_text(name: str, arguments: Any, fmt: str) -> str:
    """One call as the model writes it."""
    if fmt == LLAMA3_JSON:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n" \
           f"{TOOL_CALL_CLOSE}"


def tools_system_prompt(tools: list[dict], fmt: str) -> str:
    """The tools described for a model whose template has no place for them (Hermes' / Qwen 2.5's wording)."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if fmt == LLAMA3_JSON:
        how = ("To call a function, reply with only a JSON object of the form "
               '{"name": <function-name>, "parameters": <args-json-object>}.')
    else:
        how = ("For each function call, return a json object with function name and arguments within "
               f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n{TOOL_CALL_OPEN}\n"
               f'{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}')
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{lines}\n"
            f"</tools>\n\n{how}")


def template_messages(messages: list[dict], request: ToolRequest | None, chat_template: str | None
                      ) -> tuple[list[dict], list[dict] | None]:
    """The messages and `tools` to render. A template that uses tools gets them and the history's calls as
    structured data (arguments as objects, as Hugging Face templates expect); any other gets everything as text."""
    fmt = tool_format(chat_template)
    tools = request.tools if request is not None and request.choice != "none" else None
    if template_uses_tools(chat_template):
        out = []
        for m in messages:
            if "tool_calls" in m:
                calls = [{"id": c["id"], "type": "function", "function": {
                    "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                    for c in m["tool_calls"]]
                m = dict(m, tool_calls=calls)
            out.append(m)
        return out, tools
    out = []
    for m in messages:
        if "tool_calls" in m:
            calls = [_call_text(c["function"]["name"], json.loads(c["function"]["arguments"]), fmt)
                     for c in m["tool_calls"]]
            text = ("; " if fmt == LLAMA3_JSON else "\n").join(calls)
            m = {"role": "assistant", "content": f"{m['content']}\n{text}" if m["content"] else text}
        elif m["role"] == "tool":  # as Qwen 2.5's template shows a tool's result
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if tools:
        prompt = tools_system_prompt(tools, fmt)
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{prompt}")
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


# -- the grammar that forces a call -------------------------------------------------------------------------------

def _lark_literal(text: str) -> str:
    return json.dumps(text)  # llguidance's Lark strings take JSON's escapes


def forced_call_grammar(request: ToolRequest, fmt: str) -> StructuredOutputsParams | None:
    """For tool_choice "required" or a named function: a Lark grammar (llguidance's dialect, with each function's
    parameters as an embedded JSON schema) whose every match is one call, or several when parallel calls are
    allowed, in the model's format. None when nothing is forced."""
    if not request.forced:
        return None
    tools = [t for t in request.tools if request.choice == "required" or t["function"]["name"] == request.choice]
    key, open_, close, sep = ("parameters", "", "", "; ") if fmt == LLAMA3_JSON else \
        ("arguments", TOOL_CALL_OPEN + "\n", "\n" + TOOL_CALL_CLOSE, "\n")
    rules = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = dict(function.get("parameters") or {"type": "object"})
        # compact JSON: a weak model allowed free whitespace can spend its whole budget on newlines
        schema["x-guidance"] = dict(schema.get("x-guidance") or {}, whitespace_flexible=False)
        head = f'{open_}{{"name": "{function["name"]}", "{key}": '
        rules.append(f"call_{i}: {_lark_literal(head)} args_{i} {_lark_literal('}' + close)}\n"
                     f"args_{i}: %json {json.dumps(schema)}")
    repeat = f" ({_lark_literal(sep)} call)*" if request.parallel else ""
    alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
    grammar = f"start: call{repeat}\ncall: {alternatives}\n" + "\n".join(rules) + "\n"
    forced = StructuredOutputsParams(grammar=grammar)
    try:
        grammar_for(forced)
    except SamplingParamsError as exc:  # a function's parameters that are no JSON schema llguidance takes
        raise ApiError(400, f"tools: the parameters of the function(s) tool_choice forces are not a usable JSON "
                            f"schema: {exc}", "tools", "invalid_value") from None
    return forced


# -- parsing the reply --------------------------------------------------------------------------------------------

@dataclass
class ToolCall:
    """A call as OpenAI returns it: `arguments` is the JSON text of the arguments object."""

    name: str
    arguments: str
    id: str = dc_field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedDelta:
    """What one piece of the reply adds: text, and `delta.tool_calls` entries in OpenAI's chunk format."""

    content: str = ""
    tool_calls: list[dict] = dc_field(default_factory=list)


def _parse_call(body: str) -> ToolCall | None:
    """A complete call object's text as a call, or None if it is not one."""
    head = _HEAD.match(body)
    if head is not None and body[head.end():head.end() + 1] == "{":
        try:
            name = json.loads(f'"{head.group(1)}"')
            arguments, end = _JSON.raw_decode(body, head.end())
        except json.JSONDecodeError:
            return None
        if isinstance(arguments, dict) and re.fullmatch(r"\s*\}\s*", body[end:]):
            return ToolCall(name, body[head.end():end])
        return None
    try:  # the keys in another order: whole, re-serialized
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or set(obj) - {"name", "arguments", "parameters"} or \
            not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters"))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class _ValueScanner:
    """Finds where a JSON value that starts with `{` ends, a piece at a time: tracks strings and nesting only. A
    character no JSON could hold there (markup, say) ends the value early."""

    _OUTSIDE = set(" \t\r\n0123456789-+.eE,:[]{}\"truefalsn")

    def __init__(self) -> None:
        self.depth, self.in_string, self.escape = 0, False, False

    def feed(self, text: str) -> tuple[int, bool]:
        """(how many characters of `text` belong to the value, whether it ended)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1, True
            elif ch not in self._OUTSIDE:
                return i, True
        return len(text), False


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker` (held back: it may be markup)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Turns a reply, fed in pieces, into content and tool calls; see the module docstring."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._buf = ""
        # the whole reply so far: a Llama reply that turns out not to be calls is all content
        self._raw: str | None = "" if fmt == LLAMA3_JSON else None
        self._state = self._text if fmt == HERMES else self._start
        self._scanner = _ValueScanner()
        self._space = ""  # trailing whitespace of the content, released only if more content follows
        self._out = ParsedDelta()

    def feed(self, text: str) -> ParsedDelta:
        """A piece of the reply: what it adds (text that may still turn out to be markup is held back)."""
        self._add(text)
        self._run(final=False)
        return self._take()

    def finish(self, text: str = "") -> ParsedDelta:
        """The reply's last piece, and what was held back. A call still open is checked as a whole when nothing of
        it was streamed yet (a whole reply: malformed or cut off, it stays content), else kept as far as it came."""
        self._add(text)
        self._run(final=True)
        if not self.calls:
            self._out.content += self._space
        self._space = ""
        return self._take()

    def _add(self, text: str) -> None:
        self._buf += text
        if self._raw is not None:
            self._raw += text

    def _take(self) -> ParsedDelta:
        out, self._out = self._out, ParsedDelta()
        return out

    def _emit_content(self, text: str) -> None:
        text = self._space + text
        stripped = text.rstrip()
        self._space = text[len(stripped):]
        self._out.content += stripped

    def _emit_call(self, call: ToolCall) -> None:
        self._out.tool_calls.append({"index": len(self.calls), "id": call.id, "type": "function",
                                     "function": {"name": call.name, "arguments": call.arguments}})
        self.calls.append(call)

    def _emit_arguments(self, text: str) -> None:
        if not text:
            return
        self.calls[-1].arguments += text
        entries, index = self._out.tool_calls, len(self.calls) - 1
        if entries and entries[-1]["index"] == index:  # one entry per call in a chunk, as OpenAI sends them
            entries[-1]["function"]["arguments"] += text
        else:
            entries.append({"index": index, "function": {"arguments": text}})

    def _run(self, final: bool) -> None:
        """Run states until one waits for more text. Each state consumes what it can of the buffer and returns
        the next state, or None to wait."""
        while True:
            state = self._state(final)
            if state is None:
                return
            self._state = state

    def _commit_head(self) -> bool:
        """Start streaming a call whose name and the start of its arguments object have arrived."""
        head = _HEAD.match(self._buf)
        if head is None or self._buf[head.end():head.end() + 1] != "{":
            return False
        try:
            name = json.loads(f'"{head.group(1)}"')
        except json.JSONDecodeError:
            return False
        self._emit_call(ToolCall(name, ""))
        self._buf = self._buf[head.end():]
        self._scanner = _ValueScanner()
        return True

    def _arguments(self, final: bool) -> Any:
        n, done = self._scanner.feed(self._buf)
        self._emit_arguments(self._buf[:n])
        self._buf = self._buf[n:]
        if done:
            return self._call_end if self.fmt == HERMES else self._object_end
        return None

    # Hermes
    def _text(self, final: bool) -> Any:
        at = self._buf.find(TOOL_CALL_OPEN)
        if at >= 0:
            self._emit_content(self._buf[:at])
            self._buf = self._buf[at + len(TOOL_CALL_OPEN):]
            return self._call
        keep = 0 if final else _held_prefix(self._buf, TOOL_CALL_OPEN)
        self._emit_content(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return None

    def _call(self, final: bool) -> Any:
        start = 0  # the closing tag comes after the arguments (whose strings may hold one)
        head = _HEAD.match(self._buf)
        if head is not None and self._buf[head.end():head.end() + 1] == "{":
            n, done = _ValueScanner().feed(self._buf[head.end():])
            start = head.end() + n if done else len(self._buf)
        at = self._buf.find(TOOL_CALL_CLOSE, start)
        if at >= 0 or final:  # the whole call is here: checked as a whole
            body = self._buf[:at] if at >= 0 else self._buf
            call = _parse_call(body)
            if call is not None:
                self._emit_call(call)
            else:
                self._emit_content(TOOL_CALL_OPEN + body + (TOOL_CALL_CLOSE if at >= 0 else ""))
            self._buf = self._buf[at + len(TOOL_CALL_CLOSE):] if at >= 0 else ""
            return self._text if self._buf or not final else None
        return self._arguments if self._commit_head() else None

    def _call_end(self, final: bool) -> Any:
        at = self._buf.find(TOOL_CALL_CLOSE)
        if at < 0:  # what lies between the arguments and the closing tag ("}\n") is markup
            if final:
                self._buf = ""
            return None
        self._buf = self._buf[at + len(TOOL_CALL_CLOSE):]
        return self._text

    # Llama 3.1 JSON
    def _start(self, final: bool) -> Any:
        text = self._buf.lstrip()
        if text.startswith(PYTHON_TAG):
            self._buf = text[len(PYTHON_TAG):]
            return self._object
        if text.startswith("{"):
            self._buf = text
            return self._object
        if not final and (not text or PYTHON_TAG.startswith(text)):
            return None
        return self._plain

    def _object(self, final: bool) -> Any:
        text = self._buf.lstrip()
        if not text and not final:
            return None
        if not text.startswith("{"):
            return self._plain
        n, done = _ValueScanner().feed(text)
        if done or final:  # the whole object is here: checked as a whole
            call = _parse_call(text[:n]) if done else _parse_call(text)
            if call is None:
                return self._plain
            self._emit_call(call)
            self._buf = text[n:] if done else ""
            return self._separator if self._buf or not final else None
        self._buf = text
        return self._arguments if self._commit_head() else None

    def _object_end(self, final: bool) -> Any:
        end = re.match(r"\s*\}", self._buf)
        if end is None:
            if final or self._buf.strip():
                return self._plain
            return None
        self._buf = self._buf[end.end():]
        return self._separator

    def _separator(self, final: bool) -> Any:
        sep = re.match(r"\s*;?\s*", self._buf)
        rest = self._buf[sep.end():]
        if not rest:
            if final:
                self._buf = ""
            return None
        self._buf = rest
        return self._object

    def _plain(self, final: bool) -> Any:
        """Not (or no longer) calls: the rest is content; the whole reply if no call came before."""
        if not self.calls and self._raw is not None:
            self._buf, self._raw = self._raw, None
        self._emit_content(self._buf)
        self._buf = ""
        return None


def parse_reply(text: str, fmt: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's content (None when it is only calls) and tool calls."""
    parser = ToolCallParser(fmt)
    content = parser.finish(text).content
    return (content or None) if parser.calls else content, parser.calls
