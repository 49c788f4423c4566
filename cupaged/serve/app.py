"""The HTTP application: OpenAI's routes on an AsyncLLM, and the `cupaged serve` command.

Everything here runs in one asyncio event loop: parsing and validating requests (protocol.py), tokenizing
prompts (long ones in a thread), and writing responses from the RequestOutputs that AsyncLLM yields (text deltas,
already detokenized). The engine core runs in a process of its own; this module uses only AsyncLLM's public
interface.

A client that disconnects cancels its handler (aiohttp's handler_cancellation), whose `finally` aborts the
request: the core frees its blocks at once and /metrics counts it.

Shutdown (SIGTERM or SIGINT): new requests get 503 at once, running ones may finish for --shutdown-timeout
seconds, then the rest are aborted (a stream ends with a chunk whose finish_reason is "abort"; a non-streamed
request gets what was generated, with finish_reason "abort"), the core's process is stopped and the command exits
0. A second signal aborts at once. If the core's process dies, live streams end with an error event, /health and
new requests get 503, and the command exits 1 a moment later.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

import click

from cupaged.engine.async_llm import AsyncLLM
from cupaged.engine.output_processor import Logprob, RequestOutput
from cupaged.options import ENGINE_OPTIONS, engine_kwargs, model_path, setup_logging, with_options
from cupaged.sampling_params import SamplingParams
from cupaged.serve.metrics import Metrics
from cupaged.serve.protocol import ApiError, chat_messages, completion_prompt, field, param_of, sampling_params_from
from cupaged.serve.tool_calls import ToolCallParser, forced_call_grammar, parse_reply, template_messages, \
    tool_format, tool_request_from

logger = logging.getLogger(__name__)

DEAD_LINGER = 1.0  # seconds the server answers 503 after its core died, before it exits


@dataclass(eq=False)
class _Live:
    """A request being answered."""

    request_id: str
    num_prompt_tokens: int
    arrival: float
    last_token_time: float | None = None
    num_tokens: int = 0
    finished: bool = False


class Server:
    def __init__(self, engine: AsyncLLM, metrics: Metrics, model_name: str, api_key: str | None,
                 max_queue_depth: int):
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.api_key = api_key
        self.max_queue_depth = max_queue_depth
        self.created = int(time.time())
        self.draining = False
        self.active: set[_Live] = set()
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
        model = field(body, "model", "str", None)
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    def _token(self, token_id: int, as_id: bool = False) -> str:
        if as_id:  # vLLM's return_tokens_as_token_ids: unambiguous where a token is part of a character
            return f"token_id:{token_id}"
        text = self._token_text.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 1 << 20:
                self._token_text[token_id] = text
        return text

    def _limit_tokens(self, ids: list[int], params: SamplingParams, max_tokens_field: str | None,
                      chat: bool) -> None:
        """OpenAI's context-length checks: the prompt plus max_tokens must fit the model's context."""
        limit, n = self.engine.max_model_len, len(ids)
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

        if self.engine.dead:
            return web.json_response({"status": "failed", "message": self.engine.dead}, status=503)
        if self.draining:
            return web.json_response({"status": "shutting down"}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_route(self, request: Any) -> Any:
        from aiohttp import web

        text = self.metrics.render(self.engine.stats, self.engine.num_waiting)
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "cupaged",
                "max_model_len": self.engine.max_model_len}

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
        ids = await self._encode(self.engine.tokenizer.encode, prompt) if isinstance(prompt, str) else prompt
        self._limit_tokens(ids, params, given, chat=False)
        echo = None
        if field(body, "echo", "bool", False):  # the prompt's text before each completion's
            echo = prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(ids)
        return await self._generate(request, body, ids, params, chat=False, echo=echo)

    async def chat_completions(self, request: Any) -> Any:
        body = await self._json(request)
        self._check_model(body)
        messages = chat_messages(body)
        tools = tool_request_from(body)
        template = self.engine.tokenizer.chat_template
        fmt = tool_format(template)
        forced = forced_call_grammar(tools, fmt) if tools is not None else None
        params, given = sampling_params_from(body, chat=True, forced=forced)
        messages, template_tools = template_messages(messages, tools, template)
        try:
            ids = await self._encode(self.engine.tokenizer.encode_chat, messages, template_tools)
        except ValueError as exc:  # no chat template, or the template refused the conversation
            raise ApiError(400, str(exc), "messages") from None
        self._limit_tokens(ids, params, given, chat=True)
        return await self._generate(request, body, ids, params, chat=True,
                                    tool_format=fmt if tools is not None and tools.parses else None)

    # -- generation ------------------------------------------------------------------------------------------
    async def _generate(self, request: Any, body: dict, ids: list[int], params: SamplingParams, chat: bool,
                        echo: str | None = None, tool_format: str | None = None) -> Any:
        """`tool_format`: parse tool calls of this format (serve/tool_calls.py) out of the replies."""
        stream = field(body, "stream", "bool", False)
        options = field(body, "stream_options", "object", {}) or {}
        include_usage = bool(options.get("include_usage")) if stream else False
        as_ids = field(body, "return_tokens_as_token_ids", "bool", False)
        if self.engine.dead:
            raise ApiError(503, self.engine.dead, code="engine_dead")
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.max_queue_depth >= 0 and self.engine.num_waiting >= self.max_queue_depth:
            raise ApiError(503, f"the server is overloaded: {self.engine.num_waiting} requests are waiting; "
                                "retry later", code="overloaded")
        # a stream is written as tokens come; a whole answer is made once, from the request's last output (which,
        # with best_of, holds the n best samples: known only then)
        params.output_kind = "delta" if stream else "final_only"
        live = _Live(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", len(ids),
                     request.get("arrival", time.monotonic()))
        try:
            outputs = self.engine.generate(live.request_id, ids, params)
        except ValueError as exc:
            raise ApiError(400, str(exc), param_of(exc, chat)) from None
        self.metrics.accepted += 1
        self.active.add(live)
        self.idle.clear()
        try:
            if stream:
                return await self._stream(request, live, outputs, chat, include_usage, params, as_ids, echo,
                                          tool_format)
            return await self._collect(live, outputs, chat, params, as_ids, echo, tool_format)
        finally:
            # the client went away (the handler is cancelled), or a bug: free the request's blocks
            if not live.finished:
                self.engine.abort(live.request_id)
                self.metrics.on_finish("abort")
            self.active.discard(live)
            if not self.active:
                self.idle.set()

    def _count(self, live: _Live, out: RequestOutput) -> None:
        """Metrics of the tokens an output brings (of all its completions)."""
        n = sum(len(c.token_ids) for c in out.outputs)
        if n:
            now = time.monotonic()
            if live.last_token_time is None and n > 1 and out.first_token_time is not None:
                # a whole answer comes in one output: its first token came earlier, when the front saw it
                self.metrics.on_tokens(live.arrival, None, live.num_prompt_tokens, 1, out.first_token_time)
                live.last_token_time, live.num_tokens, n = out.first_token_time, live.num_tokens + 1, n - 1
            self.metrics.on_tokens(live.arrival, live.last_token_time, live.num_prompt_tokens, n, now)
            self.metrics.on_tokens_of_step(n, now)
            live.last_token_time = now
            live.num_tokens += n
        if out.finished:
            live.finished = True
            self.metrics.on_finish(out.outputs[0].finish_reason or "stop")

    def _completion_logprobs(self, logprobs: list[Logprob], offset: int, as_ids: bool) -> tuple[dict, int]:
        tokens, lps, tops, offsets = [], [], [], []
        for lp in logprobs:
            tokens.append(self._token(lp.token_id, as_ids))
            lps.append(lp.logprob)
            tops.append({self._token(t, as_ids): v for t, v in lp.top.items()})
            offsets.append(offset)
            offset += len(self._token(lp.token_id))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset

    def _chat_logprobs(self, logprobs: list[Logprob], as_ids: bool) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            text = self._token(token_id)
            return {"token": self._token(token_id, as_ids), "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top.items()])
                for lp in logprobs]

    @staticmethod
    def _usage(live: _Live) -> dict:
        return {"prompt_tokens": live.num_prompt_tokens, "completion_tokens": live.num_tokens,
                "total_tokens": live.num_prompt_tokens + live.num_tokens}

    @staticmethod
    def _error(out: RequestOutput) -> ApiError | None:
        if any(c.finish_reason == "error" for c in out.outputs):
            return ApiError(500, out.error or "the engine failed", code="engine_error")
        return None

    async def _collect(self, live: _Live, outputs: Any, chat: bool, params: SamplingParams, as_ids: bool,
                       echo: str | None, tool_format: str | None) -> Any:
        from aiohttp import web

        async for out in outputs:  # one output, when the request finishes ("final_only")
            self._count(live, out)
        error = self._error(out)
        if error is not None:
            raise error
        want = params.logprobs is not None
        choices = []
        for c in out.outputs:
            choice: dict[str, Any] = {"index": c.index}
            finish_reason = c.finish_reason
            if chat:
                choice["message"] = {"role": "assistant", "content": c.text}
                if tool_format is not None:
                    content, calls = parse_reply(c.text, tool_format)
                    choice["message"]["content"] = content
                    if calls:
                        choice["message"]["tool_calls"] = [call.to_openai() for call in calls]
                        finish_reason = _with_calls(finish_reason)
                choice["logprobs"] = {"content": self._chat_logprobs(c.logprobs or [], as_ids)} if want else None
            else:
                choice["text"] = (echo or "") + c.text
                choice["logprobs"] = self._completion_logprobs(c.logprobs or [], 0, as_ids)[0] if want else None
            choice["finish_reason"] = finish_reason
            choice["stop_reason"] = c.stop_reason
            choices.append(choice)
        return web.json_response({
            "id": live.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": choices, "usage": self._usage(live)})

    async def _stream(self, request: Any, live: _Live, outputs: Any, chat: bool, include_usage: bool,
                      params: SamplingParams, as_ids: bool, echo: str | None, tool_format: str | None) -> Any:
        """Server-sent events: a chunk for each completion that brought tokens in a step (text or not, as vLLM
        streams, so a client sees each token's timing), its last one with its finish reason; then [DONE]. With
        `tool_format`, each completion's text goes through a ToolCallParser: calls stream as `delta.tool_calls`,
        and their markup never reaches `delta.content`."""
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        offsets: dict[int, int] = {}
        finished: set[int] = set()  # completions whose last chunk went out
        parsers = {i: ToolCallParser(tool_format) for i in range(params.n)} if tool_format is not None else {}
        base = {"id": live.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        want = params.logprobs is not None

        def sse(payload: dict) -> bytes:
            return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

        # the common chunk (one completion, new text, no logprobs, not its last) is spliced around its text's JSON
        marker = json.dumps("\0text\0")
        plain = {"index": 0, "delta": {"content": "\0text\0"}} if chat else {"index": 0, "text": "\0text\0"}
        head, tail = sse(dict(base, choices=[dict(plain, logprobs=None, finish_reason=None)])).split(marker.encode())

        try:
            await response.prepare(request)  # a client gone already fails here, as in any write below
            first = []
            for index in range(params.n):
                if chat:
                    first.append(sse(dict(base, choices=[{"index": index, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}])))
                elif echo:
                    first.append(sse(dict(base, choices=[{"index": index, "text": echo, "logprobs": None,
                                                          "finish_reason": None}])))
            if first:
                await response.write(b"".join(first))
            async for out in outputs:
                self._count(live, out)
                error = self._error(out)
                if error is not None:
                    await response.write(sse(error.body()))
                    return response
                chunks = []
                for c in out.outputs:
                    last = c.finish_reason is not None
                    if c.index in finished or (not c.token_ids and not last):
                        continue
                    if params.n == 1 and not want and not last and not parsers:
                        chunks.append(head + json.dumps(c.text, ensure_ascii=False).encode() + tail)
                        continue
                    choice: dict[str, Any] = {"index": c.index}
                    finish_reason = c.finish_reason
                    if chat:
                        if parsers:
                            parser = parsers[c.index]
                            delta = parser.finish(c.text) if last else parser.feed(c.text)
                            if last and parser.calls:
                                finish_reason = _with_calls(finish_reason)
                            choice["delta"] = {k: v for k, v in (("content", delta.content),
                                                                 ("tool_calls", delta.tool_calls)) if v}
                        else:
                            choice["delta"] = {"content": c.text} if c.text or not last else {}
                        choice["logprobs"] = {"content": self._chat_logprobs(c.logprobs or [], as_ids)} \
                            if want else None
                    else:
                        choice["text"] = c.text
                        choice["logprobs"], offsets[c.index] = self._completion_logprobs(
                            c.logprobs or [], offsets.get(c.index, 0), as_ids) if want else (None, 0)
                    choice["finish_reason"] = finish_reason
                    if last:
                        choice["stop_reason"] = c.stop_reason
                        finished.add(c.index)
                    chunks.append(sse(dict(base, choices=[choice])))
                if chunks:
                    await response.write(b"".join(chunks))
            usage = [sse(dict(base, choices=[], usage=self._usage(live)))] if include_usage else []
            await response.write(b"".join(usage) + b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the client went away mid-stream: `_generate` aborts the request
            logger.info("client of %s disconnected", live.request_id)
        return response

    # -- shutdown --------------------------------------------------------------------------------------------
    async def drain(self, timeout: float, force: asyncio.Event) -> None:
        """Refuse new requests, give the running ones `timeout` seconds, then abort the rest."""
        self.draining = True
        if self.active and not self.engine.dead:
            logger.warning("shutting down: waiting up to %.0fs for %d request(s)", timeout, len(self.active))
            idle, forced = asyncio.ensure_future(self.idle.wait()), asyncio.ensure_future(force.wait())
            await asyncio.wait([idle, forced], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            forced.cancel()
        if self.active:
            logger.warning("shutting down: aborting %d request(s)", len(self.active))
        self.engine.abort_all()  # their handlers get a last output with finish reason "abort"
        try:
            await asyncio.wait_for(self.idle.wait(), timeout=10)
        except asyncio.TimeoutError:
            logger.error("%d request(s) did not end after their abort", len(self.active))


def _with_calls(finish_reason: str | None) -> str | None:
    """OpenAI's finish reason of a reply that made tool calls: "tool_calls" where the model stopped by itself."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


# --------------------------------------------------------------------------------------------------------------
# The command


async def _serve_forever(server: Server, host: str, port: int, shutdown_timeout: float) -> int:
    """Serve until a signal (returns 0) or the core's death (returns 1)."""
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

    def on_dead(why: str) -> None:
        click.echo(f"cupaged: {why}: stopping", err=True)
        loop.call_later(DEAD_LINGER, stop.set)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    server.engine.on_dead = on_dead
    server.engine.start()
    runner = web.AppRunner(server.app(), handler_cancellation=True, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = ", ".join(f"http://{a[0]}:{a[1]}" if ":" not in a[0] else f"http://[{a[0]}]:{a[1]}"
                          for a in runner.addresses)
        click.echo(f"cupaged: serving {server.model_name!r} on {bound} (engine core: process {server.engine.core_pid})",
                   err=True)
        await stop.wait()
        await server.drain(shutdown_timeout, force)
    finally:
        await runner.cleanup()
    return 1 if server.engine.dead else 0


@click.command()
@with_options(ENGINE_OPTIONS)
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
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise click.ClickException("cupaged serve needs aiohttp: pip install cupaged[serve]") from None
    if max_queue_depth == 0 or max_queue_depth < -1:
        raise click.BadParameter("must be -1 (no limit) or at least 1", param_hint="--max-queue-depth")
    setup_logging(o["verbose"])
    try:
        model = model_path(o)
        engine = AsyncLLM(model, engine_kwargs(o))
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    server = Server(engine, Metrics(), served_model_name or o["model"] or os.path.basename(model), api_key,
                    max_queue_depth)
    try:
        code = asyncio.run(_serve_forever(server, host, port, shutdown_timeout))
    except OSError as exc:  # the port is taken, or the address is not ours
        raise click.ClickException(str(exc)) from None
    finally:
        engine.shutdown()
    click.echo("cupaged: stopped", err=True)
    if code:
        raise SystemExit(code)
