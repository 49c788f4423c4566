"""`cupaged serve`: an OpenAI-compatible HTTP server around one LLMEngine (aiohttp, the `serve` extra).

    cupaged serve --model /tmp/qwen3-tiny --device cpu --port 8000 [--api-key KEY]

Routes: POST /v1/completions, POST /v1/chat/completions (OpenAI's request and response shapes; `stream: true`
sends server-sent events ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus).

Threads. LLMEngine is not thread-safe and `step()` blocks for the model's compute, so ONE engine thread
creates the engine (on the GPU its CuPy state lives in that thread) and is the only code that touches it. The
asyncio thread parses and validates requests, tokenizes prompts and writes responses. They meet in two places:
- `EngineWorker.commands`, a `queue.Queue` of ("add", stream) / ("abort", id) / ("abort_all", _) / ("stop", _).
  The engine thread blocks on it while idle; while requests are live it drains it between steps, so a new
  request joins the running batch at the next step (continuous batching across HTTP clients).
- each request's `asyncio.Queue`: after every step the engine thread hands all the step's events to the event
  loop in one `loop.call_soon_threadsafe` call. The first event of a request is `Accepted` or `Rejected` (the
  engine's ValueError: HTTP 400), then `Delta`s (new text, token ids, logprobs) until one carries the finish
  reason.
A client that disconnects cancels its handler (aiohttp's handler_cancellation), whose `finally` aborts the
request: the engine frees its blocks at once and /metrics counts it.

Shutdown (SIGTERM or SIGINT): new requests get 503 at once, running ones may finish for --shutdown-timeout
seconds, then the rest are aborted (a stream ends with a chunk whose finish_reason is "abort"; a non-streamed
request gets what was generated, with finish_reason "abort"), and the process exits 0. A second signal aborts
at once.

Testing hook: the environment variable CUPAGED_SERVE_STEP_DELAY (seconds) makes the engine thread sleep after
each step, a slow model for the tests of disconnects, queue limits and shutdown.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import queue
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import click

from cupaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Events from the engine thread to a request's handler


@dataclass
class Accepted:
    pass


@dataclass
class Rejected:
    message: str
    status: int = 400
    type: str = "invalid_request_error"


@dataclass
class Delta:
    text: str                          # new text since the previous event
    token_ids: list[int]               # new token ids
    logprobs: list | None              # their Logprob entries when asked for
    finish_reason: str | None          # "stop", "length", "abort" on the last event
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    final_text: str | None = None      # the whole text, on the last event


@dataclass
class Failed:
    message: str


@dataclass(eq=False)
class RequestStream:
    """One request as both threads see it. The engine thread owns the counters below `queue`."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    num_tokens: int = 0                # tokens already sent (engine thread)
    last_token_time: float | None = None
    finished: bool = False             # the handler has seen the last event (asyncio thread)
    tokens_as_ids: bool = False        # logprob tokens as "token_id:N" (vLLM's return_tokens_as_token_ids)


@dataclass(frozen=True)
class Snapshot:
    """What the engine looked like after the engine thread's last step or command."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    preemptions: int = 0


# --------------------------------------------------------------------------------------------------------------
# Metrics, written by hand in Prometheus' text format


class Histogram:
    def __init__(self, buckets: list[float]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                  f"{name}_count {self.count}"]
        return lines


class Metrics:
    """Counters and histograms shared by both threads (one lock)."""

    WINDOW = 10.0  # seconds of history behind the tokens/s gauge

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.ttft = Histogram([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.itl = Histogram([0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5])
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.aborted = 0
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step that produced tokens

    def on_tokens(self, stream: RequestStream, n: int, now: float) -> None:
        with self.lock:
            self.generation_tokens += n
            if stream.last_token_time is None:
                self.ttft.observe(now - stream.arrival)
                self.prompt_tokens += len(stream.prompt_ids)
            else:  # n tokens since the last ones: n gaps of equal length
                for _ in range(n):
                    self.itl.observe((now - stream.last_token_time) / n)
            stream.last_token_time = now

    def on_step(self, tokens: int, now: float) -> None:
        with self.lock:
            if tokens:
                self.recent.append((now, tokens))
            while self.recent and self.recent[0][0] < now - self.WINDOW:
                self.recent.popleft()

    def on_finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            if reason == "abort":
                self.aborted += 1

    def on_reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def render(self, snap: Snapshot, pending: int) -> str:
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - self.WINDOW:
                self.recent.popleft()
            span = max(min(self.WINDOW, now - self.start), 1e-3)
            rate = sum(n for _, n in self.recent) / span
            lines = []

            def metric(name: str, kind: str, help_text: str, value: float | dict, label: str = "") -> None:
                lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
                if isinstance(value, dict):
                    for key, v in sorted(value.items()):
                        lines.append(f'{name}{{{label}="{key}"}} {v}')
                else:
                    lines.append(f"{name} {value}")

            metric("cupaged_num_requests_running", "gauge", "Requests whose sequences hold KV blocks.", snap.running)
            metric("cupaged_num_requests_waiting", "gauge", "Requests accepted but not yet running.",
                   snap.waiting + pending)
            metric("cupaged_kv_blocks_used", "gauge", "KV-cache blocks in use.", snap.kv_blocks_used)
            metric("cupaged_kv_blocks_total", "gauge", "KV-cache blocks in all.", snap.kv_blocks_total)
            metric("cupaged_kv_cache_usage_ratio", "gauge", "Fraction of the KV-cache blocks in use.",
                   round(snap.kv_blocks_used / max(snap.kv_blocks_total, 1), 6))
            metric("cupaged_num_preemptions_total", "counter", "Requests preempted to free KV blocks.",
                   snap.preemptions)
            metric("cupaged_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
            metric("cupaged_prompt_tokens_total", "counter", "Prompt tokens of requests that produced a token.",
                   self.prompt_tokens)
            metric("cupaged_generation_tokens_per_second", "gauge",
                   f"Tokens generated per second over the last {self.WINDOW:g} s.", round(rate, 3))
            lines += self.ttft.render("cupaged_time_to_first_token_seconds",
                                      "Time from a request's arrival to its first token.")
            lines += self.itl.render("cupaged_inter_token_latency_seconds", "Time between a request's tokens.")
            metric("cupaged_requests_finished_total", "counter", "Requests finished, by finish reason.",
                   dict(self.finished) or {"stop": 0}, "finish_reason")
            metric("cupaged_requests_aborted_total", "counter",
                   "Requests aborted (client disconnected or server shutting down).", self.aborted)
            metric("cupaged_requests_rejected_total", "counter", "Requests refused before running, by reason.",
                   dict(self.rejected) or {"invalid": 0}, "reason")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# The engine thread


class EngineWorker:
    """Owns the LLMEngine in one thread; everything else talks to it through `commands`."""

    def __init__(self, model: str, engine_options: dict, metrics: Metrics, step_delay: float = 0.0):
        self.model = model
        self.engine_options = engine_options
        self.metrics = metrics
        self.step_delay = step_delay
        self.commands: queue.Queue = queue.Queue()
        self.snapshot = Snapshot()
        self.pending = 0                       # submitted, not yet seen by the engine thread
        self.pending_lock = threading.Lock()
        self.failed: str | None = None         # set if the engine loop crashed
        self.closed = False                    # after abort_all, new requests are refused
        self.tokenizer = None
        self.max_model_len = 0
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self.thread = threading.Thread(target=self._main, name="cupaged-engine", daemon=True)

    # -- called from the asyncio thread ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread and wait until the model is loaded (re-raises a load error)."""
        self.thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, stream: RequestStream) -> None:
        with self.pending_lock:
            self.pending += 1
        self.commands.put(("add", stream))

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    def abort_all(self) -> None:
        self.commands.put(("abort_all", None))

    def stop(self, timeout: float = 10.0) -> None:
        self.commands.put(("stop", None))
        self.thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        return self.snapshot.waiting + self.pending

    # -- the engine thread -----------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            from cupaged.engine.llm_engine import LLMEngine

            self.engine = LLMEngine(self.model, **self.engine_options)
            self.tokenizer = self.engine.tokenizer
            self.max_model_len = self.engine.max_model_len
            self._publish()
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - a bug or a device error: fail every request, keep answering
            logger.exception("the engine loop failed")
            self.failed = f"the engine failed: {type(exc).__name__}: {exc}"
            self._deliver([(s, Failed(self.failed)) for s in self._streams.values()])
            self._streams.clear()
            self._refuse_until_stopped()

    def _loop(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests()
            if not self._drain(block=not busy):
                return
            if not self.engine.has_unfinished_requests():
                continue
            self._dispatch(self.engine.step())
            if self.step_delay:
                time.sleep(self.step_delay)

    def _drain(self, block: bool) -> bool:
        """Apply the queued commands (waiting for one if `block`). False once told to stop."""
        events: list[tuple[RequestStream, Any]] = []
        try:
            while True:
                try:
                    kind, arg = self.commands.get(timeout=1.0) if block else self.commands.get_nowait()
                except queue.Empty:
                    return True
                block = False
                if kind == "stop":
                    for s in self._streams.values():
                        self.engine.abort(s.request_id)
                    return False
                if kind == "add":
                    events.append((arg, self._add(arg)))
                elif kind == "abort":
                    if arg in self._streams:
                        self.engine.abort(arg)
                elif kind == "abort_all":
                    self.closed = True
                    for request_id in list(self._streams):
                        self.engine.abort(request_id)
        finally:
            self._publish()  # first: a client that hears back sees /metrics up to date
            self._deliver(events)

    def _add(self, s: RequestStream) -> Accepted | Rejected:
        with self.pending_lock:
            self.pending -= 1
        if self.closed:
            return Rejected("the server is shutting down", 503, "server_error")
        try:
            self.engine.add_request(s.request_id, s.prompt_ids, s.params)
        except ValueError as exc:
            return Rejected(str(exc))
        except Exception as exc:  # noqa: BLE001 - refuse this request, keep serving the others
            logger.exception("add_request failed")
            return Rejected(f"{type(exc).__name__}: {exc}", 500, "server_error")
        self._streams[s.request_id] = s
        return Accepted()

    def _dispatch(self, outputs: list) -> None:
        now = time.monotonic()
        events, step_tokens = [], 0
        for out in outputs:
            s = self._streams.get(out.request_id)
            if s is None:
                continue
            c = out.outputs[0]
            new_ids = c.token_ids[s.num_tokens:]
            logprobs = c.logprobs[s.num_tokens:len(c.token_ids)] if c.logprobs is not None else None
            if new_ids:
                self.metrics.on_tokens(s, len(new_ids), now)
                step_tokens += len(new_ids)
            s.num_tokens = len(c.token_ids)
            finish = (c.finish_reason or "stop") if out.finished else None
            events.append((s, Delta(c.delta, list(new_ids), logprobs, finish, c.stop_reason,
                                    len(out.prompt_token_ids), len(c.token_ids), c.text if out.finished else None)))
            if out.finished:
                del self._streams[out.request_id]
                self.metrics.on_finish(finish)
        self.metrics.on_step(step_tokens, now)
        self._publish()
        self._deliver(events)

    def _publish(self) -> None:
        e = self.engine
        self.snapshot = Snapshot(len(e.scheduler.running), len(e.scheduler.waiting), e.blocks.num_used,
                                 e.blocks.num_blocks, e.scheduler.num_preemptions)

    @staticmethod
    def _deliver(events: list[tuple[RequestStream, Any]]) -> None:
        """Hand events to their handlers' queues: one wake-up of each event loop per call."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for s, event in events:
            by_loop.setdefault(s.loop, []).append((s.queue, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _refuse_until_stopped(self) -> None:
        while True:
            kind, arg = self.commands.get()
            if kind == "stop":
                return
            if kind == "add":
                with self.pending_lock:
                    self.pending -= 1
                self._deliver([(arg, Rejected(self.failed or "the engine failed", 500, "server_error"))])


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, event in batch:
        q.put_nowait(event)


# --------------------------------------------------------------------------------------------------------------
# Request parsing


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_MISSING = object()


def _field(body: dict, name: str, kind: str, default: Any = None) -> Any:
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


def sampling_params_from(body: dict, chat: bool) -> tuple[SamplingParams, str | None]:
    """SamplingParams for an OpenAI request body, and the field that set max_tokens (None: not given)."""
    n = _field(body, "n", "int", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported: send one request per completion", "n", "unsupported_parameter")
    best_of = _field(body, "best_of", "int", None)
    if best_of not in (None, 1):
        raise ApiError(400, "best_of is not supported", "best_of", "unsupported_parameter")
    for name in ("logit_bias", "suffix", "tools", "functions"):
        _unsupported(body, name)
    _unsupported(body, "tool_choice", ("none", "auto"))
    if _field(body, "response_format", "object", {}).get("type", "text") != "text":
        raise ApiError(400, "only the 'text' response_format is supported", "response_format",
                       "unsupported_parameter")
    if _field(body, "echo", "bool", False):
        raise ApiError(400, "'echo' is not supported by this server", "echo", "unsupported_parameter")
    max_tokens_field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _field(body, max_tokens_field, "int", None)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or an array of strings", "stop", "invalid_type")
    stop_token_ids = _field(body, "stop_token_ids", "list", [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise ApiError(400, "'stop_token_ids' must be an array of integers", "stop_token_ids", "invalid_type")
    if chat:
        want_logprobs = _field(body, "logprobs", "bool", False)
        top = _field(body, "top_logprobs", "int", None)
        if top is not None and not want_logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if want_logprobs else None
    else:
        logprobs = _field(body, "logprobs", "int", None)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise ApiError(400, f"logprobs must be in [0, 20], got {logprobs}", "top_logprobs" if chat else "logprobs")
    kwargs = dict(
        temperature=_field(body, "temperature", "number", 1.0),
        top_p=_field(body, "top_p", "number", 1.0),
        top_k=_field(body, "top_k", "int", 0),
        min_p=_field(body, "min_p", "number", 0.0),
        presence_penalty=_field(body, "presence_penalty", "number", 0.0),
        frequency_penalty=_field(body, "frequency_penalty", "number", 0.0),
        repetition_penalty=_field(body, "repetition_penalty", "number", 1.0),
        seed=_field(body, "seed", "int", None),
        max_tokens=max_tokens,
        min_tokens=_field(body, "min_tokens", "int", 0),
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=_field(body, "ignore_eos", "bool", False),
        include_stop_str_in_output=_field(body, "include_stop_str_in_output", "bool", False),
        skip_special_tokens=_field(body, "skip_special_tokens", "bool", True),
        logprobs=logprobs,
    )
    try:
        return SamplingParams(**kwargs), max_tokens_field if max_tokens is not None else None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def chat_messages(body: dict) -> list[dict[str, str]]:
    """OpenAI messages as {"role", "content": str} for the chat template (text content parts are joined)."""
    messages = _field(body, "messages", "list", None)
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
        out.append({"role": role, "content": content})
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


# --------------------------------------------------------------------------------------------------------------
# The HTTP application


class Server:
    def __init__(self, worker: EngineWorker, metrics: Metrics, model_name: str, api_key: str | None,
                 max_queue_depth: int):
        self.worker = worker
        self.metrics = metrics
        self.model_name = model_name
        self.api_key = api_key
        self.max_queue_depth = max_queue_depth
        self.created = int(time.time())
        self.draining = False
        self.active: set[RequestStream] = set()
        self.idle = asyncio.Event()      # set while no request is active
        self.idle.set()
        self._token_text: dict[int, str] = {}

    def app(self) -> Any:
        from aiohttp import web

        app = web.Application(middlewares=[self.middleware], client_max_size=16 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_route)
        return app

    # -- plumbing --------------------------------------------------------------------------------------------
    @property
    def middleware(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def middleware(request: Any, handler: Any) -> Any:
            request["arrival"] = time.monotonic()  # time to first token counts from here
            try:
                if self.api_key is not None and request.path != "/health":
                    given = request.headers.get("Authorization", "")
                    if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {self.api_key}".encode()):
                        raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                       code="invalid_api_key")
                return await handler(request)
            except ApiError as exc:
                if request.path in ("/v1/completions", "/v1/chat/completions") and exc.status != 401:
                    if exc.code == "shutting_down":
                        reason = "shutting_down"
                    elif exc.status in (404, 503):
                        reason = "unknown_model" if exc.status == 404 else "overloaded"
                    else:
                        reason = "error" if exc.status >= 500 else "invalid"
                    self.metrics.on_reject(reason)
                return web.json_response(exc.body(), status=exc.status)
            except web.HTTPException as exc:  # unknown route, wrong method, body too large
                if exc.status < 400:
                    raise
                return web.json_response(ApiError(exc.status, exc.reason or "error").body(), status=exc.status,
                                         headers={k: v for k, v in exc.headers.items() if k == "Allow"})
            except Exception as exc:  # noqa: BLE001 - a bug: answer in OpenAI's shape, keep serving
                logger.exception("error handling %s %s", request.method, request.path)
                return web.json_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}").body(),
                                         status=500)
        return middleware

    async def _json(self, request: Any) -> dict:
        try:
            raw = await request.read()
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _check_model(self, body: dict) -> None:
        model = _field(body, "model", "str", None)
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    def _token(self, token_id: int, as_id: bool = False) -> str:
        if as_id:  # vLLM's return_tokens_as_token_ids: unambiguous where a token is part of a character
            return f"token_id:{token_id}"
        text = self._token_text.get(token_id)
        if text is None:
            text = self.worker.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 1 << 20:
                self._token_text[token_id] = text
        return text

    def _limit_tokens(self, ids: list[int], params: SamplingParams, max_tokens_field: str | None,
                      chat: bool) -> None:
        """OpenAI's context-length checks: the prompt plus max_tokens must fit the model's context."""
        limit, n = self.worker.max_model_len, len(ids)
        param = "messages" if chat else "prompt"
        if not ids:
            raise ApiError(400, "the prompt is empty", param)
        if n >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                f"{param} has {n} tokens, which leaves no room for a completion.", param,
                           "context_length_exceeded")
        if max_tokens_field is None:  # OpenAI's defaults: the rest of the context for chat, 16 for completions
            params.max_tokens = limit - n if chat else min(16, limit - n)
            if params.min_tokens > params.max_tokens:
                raise ApiError(400, f"min_tokens ({params.min_tokens}) must not exceed max_tokens "
                                    f"({params.max_tokens}, the default here)", "min_tokens")
        elif n + params.max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{n + params.max_tokens} tokens ({n} in the {param}, {params.max_tokens} for the "
                                f"completion). Please reduce the length of the {param} or the completion.",
                           max_tokens_field, "context_length_exceeded")

    async def _encode(self, fn: Any, *args: Any) -> list[int]:
        if sum(len(str(a)) for a in args) < 8192:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- routes ----------------------------------------------------------------------------------------------
    async def health(self, request: Any) -> Any:
        from aiohttp import web

        if self.worker.failed:
            return web.json_response({"status": "failed", "message": self.worker.failed}, status=500)
        if self.draining:
            return web.json_response({"status": "shutting down"}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_route(self, request: Any) -> Any:
        from aiohttp import web

        text = self.metrics.render(self.worker.snapshot, self.worker.pending)
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "cupaged",
                "max_model_len": self.worker.max_model_len}

    async def models(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Any) -> Any:
        from aiohttp import web

        if request.match_info["model"] != self.model_name:
            raise ApiError(404, f"The model `{request.match_info['model']}` does not exist.", "model",
                           "model_not_found")
        return web.json_response(self._model_card())

    async def completions(self, request: Any) -> Any:
        body = await self._json(request)
        self._check_model(body)
        prompt = completion_prompt(body)
        params, given = sampling_params_from(body, chat=False)
        ids = await self._encode(self.worker.tokenizer.encode, prompt) if isinstance(prompt, str) else prompt
        self._limit_tokens(ids, params, given, chat=False)
        return await self._generate(request, body, ids, params, chat=False)

    async def chat_completions(self, request: Any) -> Any:
        body = await self._json(request)
        self._check_model(body)
        messages = chat_messages(body)
        params, given = sampling_params_from(body, chat=True)
        try:
            ids = await self._encode(self.worker.tokenizer.encode_chat, messages)
        except ValueError as exc:  # no chat template, or the template refused the conversation
            raise ApiError(400, str(exc), "messages") from None
        self._limit_tokens(ids, params, given, chat=True)
        return await self._generate(request, body, ids, params, chat=True)

    # -- generation ------------------------------------------------------------------------------------------
    async def _generate(self, request: Any, body: dict, ids: list[int], params: SamplingParams, chat: bool) -> Any:
        stream = _field(body, "stream", "bool", False)
        options = _field(body, "stream_options", "object", {}) or {}
        include_usage = bool(options.get("include_usage")) if stream else False
        if self.worker.failed:
            raise ApiError(500, self.worker.failed)
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.max_queue_depth >= 0 and self.worker.num_waiting >= self.max_queue_depth:
            raise ApiError(503, f"the server is overloaded: {self.worker.num_waiting} requests are waiting; "
                                "retry later", code="overloaded")
        loop = asyncio.get_running_loop()
        s = RequestStream(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", ids, params, loop, asyncio.Queue(),
                          request.get("arrival", time.monotonic()))
        s.tokens_as_ids = _field(body, "return_tokens_as_token_ids", "bool", False)
        self.active.add(s)
        self.idle.clear()
        submitted = False
        try:
            self.worker.submit(s)
            submitted = True
            first = await s.queue.get()
            if isinstance(first, Failed):
                s.finished = True
                raise ApiError(500, first.message)
            if isinstance(first, Rejected):
                s.finished = True
                raise ApiError(first.status, first.message, code="shutting_down" if first.status == 503 else None,
                               type=first.type)
            if stream:
                return await self._stream(request, s, chat, include_usage)
            return await self._collect(s, chat)
        finally:
            if submitted and not s.finished:  # the client went away (or a bug): free the request's blocks
                self.worker.abort(s.request_id)
            self.active.discard(s)
            if not self.active:
                self.idle.set()

    def _completion_logprobs(self, d: Delta, offset: int, as_ids: bool) -> tuple[dict, int]:
        tokens, lps, tops, offsets = [], [], [], []
        for lp in d.logprobs or []:
            tokens.append(self._token(lp.token_id, as_ids))
            lps.append(lp.logprob)
            tops.append({self._token(t, as_ids): v for t, v in lp.top.items()})
            offsets.append(offset)
            offset += len(self._token(lp.token_id))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset

    def _chat_logprobs(self, d: Delta, as_ids: bool) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            text = self._token(token_id)
            return {"token": self._token(token_id, as_ids), "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top.items()])
                for lp in d.logprobs or []]

    @staticmethod
    def _usage(d: Delta) -> dict:
        return {"prompt_tokens": d.num_prompt_tokens, "completion_tokens": d.num_output_tokens,
                "total_tokens": d.num_prompt_tokens + d.num_output_tokens}

    async def _collect(self, s: RequestStream, chat: bool) -> Any:
        from aiohttp import web

        logprobs: list = []
        while True:
            d = await s.queue.get()
            if isinstance(d, Failed):
                s.finished = True
                raise ApiError(500, d.message)
            logprobs += d.logprobs or []
            if d.finish_reason is not None:
                s.finished = True
                break
        want = s.params.logprobs is not None
        whole = Delta(d.final_text or "", [], logprobs, d.finish_reason, d.stop_reason, d.num_prompt_tokens,
                      d.num_output_tokens)
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": whole.text}
            choice["logprobs"] = {"content": self._chat_logprobs(whole, s.tokens_as_ids)} if want else None
        else:
            choice["text"] = whole.text
            choice["logprobs"] = self._completion_logprobs(whole, 0, s.tokens_as_ids)[0] if want else None
        choice["finish_reason"] = d.finish_reason
        choice["stop_reason"] = d.stop_reason
        return web.json_response({
            "id": s.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": [choice], "usage": self._usage(d)})

    async def _stream(self, request: Any, s: RequestStream, chat: bool, include_usage: bool) -> Any:
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        created, offset = int(time.time()), 0
        base = {"id": s.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": self.model_name}
        want = s.params.logprobs is not None

        def sse(payload: dict) -> bytes:
            return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

        # the common chunk (new text, no logprobs, not the last) is spliced around the JSON of its text alone
        marker = json.dumps("\0text\0")
        plain = {"index": 0, "delta": {"content": "\0text\0"}} if chat else {"index": 0, "text": "\0text\0"}
        head, tail = sse(dict(base, choices=[dict(plain, logprobs=None, finish_reason=None)])).split(marker.encode())

        if chat:
            role = {"role": "assistant", "content": ""}
            await response.write(sse(dict(base, choices=[{"index": 0, "delta": role, "logprobs": None,
                                                           "finish_reason": None}])))
        last: Delta | None = None
        try:
            while last is None or last.finish_reason is None:
                events = [await s.queue.get()]
                while not s.queue.empty():
                    events.append(s.queue.get_nowait())
                out = []
                for d in events:
                    if isinstance(d, Failed):
                        s.finished = True
                        out.append(sse(ApiError(500, d.message).body()))
                        await response.write(b"".join(out))
                        return response
                    last = d
                    if not d.text and not d.logprobs and d.finish_reason is None:
                        continue  # nothing to say yet (half a UTF-8 character, or text held back for a stop string)
                    if not want and d.finish_reason is None:
                        out.append(head + json.dumps(d.text, ensure_ascii=False).encode() + tail)
                        continue
                    choice: dict[str, Any] = {"index": 0}
                    if chat:
                        choice["delta"] = {"content": d.text} if d.text or d.finish_reason is None else {}
                        choice["logprobs"] = {"content": self._chat_logprobs(d, s.tokens_as_ids)} if want else None
                    else:
                        choice["text"] = d.text
                        choice["logprobs"], offset = self._completion_logprobs(d, offset, s.tokens_as_ids) \
                            if want else (None, offset)
                    choice["finish_reason"] = d.finish_reason
                    if d.finish_reason is not None:
                        choice["stop_reason"] = d.stop_reason
                    out.append(sse(dict(base, choices=[choice])))
                    if d.finish_reason is not None:
                        s.finished = True
                        break
                if out:
                    await response.write(b"".join(out))
            tail = [sse(dict(base, choices=[], usage=self._usage(last)))] if include_usage else []
            await response.write(b"".join(tail) + b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the client went away mid-stream: `_generate` aborts the request
            logger.info("client of %s disconnected", s.request_id)
        return response

    # -- shutdown --------------------------------------------------------------------------------------------
    async def drain(self, timeout: float, force: asyncio.Event) -> None:
        """Refuse new requests, give the running ones `timeout` seconds, then abort the rest."""
        self.draining = True
        if self.active:
            logger.warning("shutting down: waiting up to %.0fs for %d request(s)", timeout, len(self.active))
            idle, forced = asyncio.ensure_future(self.idle.wait()), asyncio.ensure_future(force.wait())
            await asyncio.wait([idle, forced], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            forced.cancel()
        if self.active:
            logger.warning("shutting down: aborting %d request(s)", len(self.active))
        self.worker.abort_all()
        try:
            await asyncio.wait_for(self.idle.wait(), timeout=10)
        except asyncio.TimeoutError:
            logger.error("%d request(s) did not end after their abort", len(self.active))


# --------------------------------------------------------------------------------------------------------------
# The command


async def _serve_forever(server: Server, host: str, port: int, shutdown_timeout: float) -> None:
    from aiohttp import web

    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: aborting every request now", signal.Signals(signum).name)
            force.set()
        else:
            click.echo(f"cupaged: {signal.Signals(signum).name}: shutting down", err=True)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    runner = web.AppRunner(server.app(), handler_cancellation=True, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = ", ".join(f"http://{a[0]}:{a[1]}" if ":" not in a[0] else f"http://[{a[0]}]:{a[1]}"
                          for a in runner.addresses)
        click.echo(f"cupaged: serving {server.model_name!r} on {bound}", err=True)
        await stop.wait()
        await server.drain(shutdown_timeout, force)
    finally:
        await runner.cleanup()


class _ServeCommand(click.Command):
    """Takes `run`'s engine options from cupaged.cli when first parsed: cli.py imports this module to register
    the command, so importing cli here at import time would be circular."""

    _with_engine_options = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._with_engine_options:
            from cupaged.cli import ENGINE_OPTIONS, with_options

            holder = with_options(ENGINE_OPTIONS)(lambda: None)
            self.params[:0] = list(reversed(holder.__click_params__))
            self._with_engine_options = True
        return super().get_params(ctx)


@click.command(cls=_ServeCommand)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--api-key", default=None, envvar="CUPAGED_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health (env CUPAGED_API_KEY).")
@click.option("--max-queue-depth", type=int, default=1024, show_default=True,
              help="Refuse new requests (503) while this many are waiting; -1: no limit.")
@click.option("--served-model-name", default=None, help="The model name clients send. Default: --model as given.")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds running requests may take to finish before they are aborted.")
def serve(host: str, port: int, api_key: str | None, max_queue_depth: int, served_model_name: str | None,
          shutdown_timeout: float, **o: Any) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    from cupaged.cli import engine_kwargs, model_path, setup_logging

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise click.ClickException("cupaged serve needs aiohttp: pip install cupaged[serve]") from None
    if max_queue_depth == 0 or max_queue_depth < -1:
        raise click.BadParameter("must be -1 (no limit) or at least 1", param_hint="--max-queue-depth")
    setup_logging(o["verbose"])
    try:
        model = model_path(o)
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    metrics = Metrics()
    worker = EngineWorker(model, engine_kwargs(o), metrics, float(os.environ.get("CUPAGED_SERVE_STEP_DELAY") or 0))
    try:
        worker.start()
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    server = Server(worker, metrics, served_model_name or o["model"] or os.path.basename(model), api_key,
                    max_queue_depth)
    try:
        asyncio.run(_serve_forever(server, host, port, shutdown_timeout))
    except OSError as exc:  # the port is taken, or the address is not ours
        raise click.ClickException(str(exc)) from None
    finally:
        worker.stop()
    click.echo("cupaged: stopped", err=True)
