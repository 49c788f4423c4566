"""AsyncLLM: the asyncio front of an engine core that runs in a process of its own.

    llm = AsyncLLM(model, {"device": "cuda"})     # blocks until the model is loaded in the core's process
    llm.start()                                    # inside the running event loop
    async for out in llm.generate("r1", ids, SamplingParams(output_kind="delta")):
        ...

One task reads the core's messages (one per step, for every live request), turns them into RequestOutputs
(OutputProcessor: detokenizing, stop strings, logprobs) and hands each to its request's queue; `generate`
yields from that queue. A generator that is closed early (the client went away) aborts its request in the core.
If the core's process ends, every live request gets a last output with finish reason "error", `dead` says why,
and `on_dead` (if set) is called: the server then stops; nothing waits on a dead core.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import zmq

from cupaged.engine.core import check_request
from cupaged.engine.core_client import CoreProcess
from cupaged.engine.output_processor import OutputProcessor, RequestOutput
from cupaged.engine.protocol import EngineCoreOutputs, EngineCoreRequest, EngineStats
from cupaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine core's process is gone: no request can be served."""


class AsyncLLM:
    def __init__(self, model: str, engine_options: dict):
        self.client = CoreProcess(model, engine_options, asyncio=True)
        info = self.client.info
        self.config, self.tokenizer = self.client.config, self.client.tokenizer
        self.max_model_len = info.max_model_len
        self.processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats(kv_blocks_total=info.num_kv_blocks)
        self.dead: str | None = None
        self.on_dead: Callable[[str], None] | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    @property
    def core_pid(self) -> int | None:
        return self.client.pid

    @property
    def num_live(self) -> int:
        """Requests accepted and not yet finished."""
        return len(self.processor.requests)

    @property
    def num_waiting(self) -> int:
        """Requests accepted that the core does not run yet (queued there, or on their way)."""
        return max(0, self.num_live - self.stats.num_running_requests)

    def start(self) -> None:
        """Begin reading the core's outputs and watching its process (call from the event loop)."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.client.process.sentinel, self._core_ended)
        self._reader = asyncio.ensure_future(self._read_outputs())

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request; returns its outputs as they come (the last one has `finished` set). Raises ValueError
        now for a request that can never run, EngineDead when the core is gone. Closing the iterator before the
        end aborts the request."""
        if self.dead:
            raise EngineDead(self.dead)
        check_request(prompt_token_ids, params, self.client.info)
        queue: asyncio.Queue = asyncio.Queue()
        self.processor.add_request(request_id, prompt, prompt_token_ids, params)
        self._queues[request_id] = queue
        self.client.add_request(EngineCoreRequest(request_id, prompt_token_ids, params,
                                                  self.tokenizer.bad_words_token_ids(params.bad_words)))
        return self._outputs(request_id, queue)

    async def _outputs(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        """End a request now (the client went away, the server shuts down); False if it is not live."""
        if not self.processor.abort(request_id):
            return False
        if not self.dead:
            self.client.abort(request_id)
        return True

    def abort_all(self) -> None:
        for request_id in list(self.processor.requests):
            self.abort(request_id)
        self._deliver(EngineCoreOutputs([], self.stats))  # the aborted requests' last outputs

    async def _read_outputs(self) -> None:
        """Every message the core sent since the last look, processed as one: when this loop falls behind the
        core, a request gets one output (and its client one write) for several steps instead of one per step."""
        sock = self.client.output
        while True:
            messages = [await sock.recv(copy=False)]
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                messages.append(sock.recv(flags=zmq.NOBLOCK, copy=False).result())
            try:
                outs = [self.client.decoder.decode(m.buffer) for m in messages]
                merged = EngineCoreOutputs([d for out in outs for d in out.outputs], outs[-1].stats)
                self.stats = merged.stats
                self._deliver(merged)
            except Exception as exc:  # noqa: BLE001 - a bug here must not leave every request waiting forever
                logger.exception("the front failed to read the engine core's outputs")
                for request_id in list(self.processor.requests):
                    self.client.abort(request_id)
                self.processor.fail_all(f"the server failed to read the engine's outputs: {type(exc).__name__}")
                self._deliver(EngineCoreOutputs([], self.stats))
            # A recv whose message is already there completes without yielding: let the requests' handlers write
            # what was just delivered before reading on, or a core faster than this loop starves them (every
            # stream would get its tokens in one burst at the end).
            await asyncio.sleep(0)

    def _deliver(self, core_out: EngineCoreOutputs) -> None:
        outputs, aborts = self.processor.process(core_out)
        if aborts and not self.dead:
            self.client.abort_many(aborts)
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _core_ended(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.client.process.sentinel)
        self.client.process.join(1)
        self.dead = self.client.dead() or "the engine core process ended"
        logger.error("%s: failing %d live request(s)", self.dead, self.num_live)
        if self._reader is not None:
            self._reader.cancel()
        self.processor.fail_all(self.dead)
        self._deliver(EngineCoreOutputs([], self.stats))
        if self.on_dead is not None:
            self.on_dead(self.dead)

    def shutdown(self) -> None:
        """Stop reading and stop the core's process (waits a few seconds at most)."""
        if self._reader is not None:
            self._reader.cancel()
        try:
            asyncio.get_running_loop().remove_reader(self.client.process.sentinel)
        except RuntimeError:  # no loop running
            pass
        self.client.close()
