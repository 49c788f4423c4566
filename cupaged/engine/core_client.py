"""The engine core in a process of its own, and the front's handle on it.

`cupaged serve` runs the core this way (and `LLMEngine(..., engine_core_process=True)` can): the core process
loads the model and then does nothing but schedule, run and sample, step after step, while the front's process
(HTTP, tokenizing, detokenizing, stop strings) runs beside it, so neither waits on the other's interpreter.

They talk over two ZeroMQ sockets on ipc:// paths in a private temporary directory: the front PUSHes requests and
aborts to the core, the core PUSHes one msgpack message per step (EngineCoreOutputs, for every request that
advanced) back. The model's config, tokenizer and sizes come once, over a pipe, when loading is done (a load error
comes back the same way, as the exception the core raised). The core exits when told to, or when its parent is
gone; the front watches the core's process and reports its death (`CoreDied`), never waits on a dead one.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from cupaged.engine.protocol import CoreInfo, EngineCoreOutputs, EngineCoreRequest, RequestDelta, SequenceDelta

logger = logging.getLogger(__name__)

ADD, ABORT, SHUTDOWN = b"add", b"abort", b"shutdown"
STEP_DELAY_VAR = "CUPAGED_CORE_STEP_DELAY"  # seconds the core sleeps after each step (tests: a slow model)
POLL_MS = 200  # how often a waiting side looks at the other's process


class CoreDied(RuntimeError):
    """The engine core's process ended while requests were live (or before it was told to)."""


def run_core(model: str, options: dict, input_addr: str, output_addr: str, ready: Any, parent: int) -> None:
    """The core process's main: load, say ready, then apply requests and run steps until told to stop."""
    from cupaged.engine.core import DeviceLost, EngineCore

    try:
        core = EngineCore(model, **options)
    except BaseException as exc:  # noqa: BLE001 - the front re-raises it
        ready.send(("error", exc))
        raise SystemExit(1) from None
    ready.send(("ready", core.info(), core.config, core.tokenizer))
    ready.close()
    # Everything loaded so far lives as long as the process: keep it out of the collector's sweeps, whose pauses
    # over a big heap would stall the steps (this process holds nothing else that must ever be freed early).
    gc.collect()
    gc.freeze()
    context = zmq.Context()
    inputs, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inputs.connect(input_addr)
    outputs.connect(output_addr)
    decode_request = msgspec.msgpack.Decoder(EngineCoreRequest)
    decode_aborts = msgspec.msgpack.Decoder(list[tuple[str, int | None]])
    encoder = msgspec.msgpack.Encoder()
    rejected: list[RequestDelta] = []
    # testing hook: a slow model, for tests of disconnects, queue limits and shutdown
    step_delay = float(os.environ.get(STEP_DELAY_VAR) or 0)
    while True:
        busy = core.has_unfinished() or rejected
        # idle: wait for a message, looking up now and then whether the front still exists
        while not busy and not inputs.poll(POLL_MS):
            if os.getppid() != parent:
                return
        while inputs.poll(0):
            kind, *payload = inputs.recv_multipart(copy=False)
            kind = kind.bytes
            if kind == SHUTDOWN:
                return
            if kind == ADD:
                rejection = _add(core, decode_request, payload[0].buffer)
                if rejection is not None:
                    rejected.append(rejection)
            elif kind == ABORT:
                for request_id, index in decode_aborts.decode(payload[0].buffer):
                    core.abort(request_id, index)
        if core.has_unfinished() or rejected:
            try:
                out = core.step() if core.has_unfinished() else EngineCoreOutputs([], core.stats)
            except DeviceLost as exc:  # the front sees the process end, and fails what is live
                logger.error("%s", exc)
                raise SystemExit(1) from None
            if rejected:
                out.outputs += rejected
                rejected = []
            outputs.send(encoder.encode(out), copy=False)
            if step_delay:
                time.sleep(step_delay)


def _add(core: Any, decoder: msgspec.msgpack.Decoder, message: memoryview) -> RequestDelta | None:
    """Queue one request; what to report instead if it cannot be (the front checks first: this one lost a race, or
    a check differs), never an exception that would end the core."""
    try:
        request = decoder.decode(message)
        core.add_request(request)
        return None
    except (msgspec.ValidationError, ValueError) as exc:
        try:
            request_id = msgspec.msgpack.decode(message)[0]
        except Exception:  # noqa: BLE001 - not even a request id: nobody to tell
            logger.error("dropped an unreadable request: %s", exc)
            return None
        return RequestDelta(str(request_id), [SequenceDelta(0, [], "error")], True, error=str(exc))


class CoreProcess:
    """Starts the core's process and speaks to it. Blocks until the model is loaded (raises what loading raised).

    `asyncio=True` makes the output socket an asyncio one (zmq.asyncio), for fronts that live in an event loop.
    """

    def __init__(self, model: str, options: dict, asyncio: bool = False):
        self._dir = tempfile.mkdtemp(prefix="cupaged-core-")
        input_addr, output_addr = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.bind(input_addr)
        if asyncio:
            self._async_context = zmq.asyncio.Context()
            self.output = self._async_context.socket(zmq.PULL)
        else:
            self.output = self._context.socket(zmq.PULL)
        self.output.bind(output_addr)
        for sock in (self._input, self.output):
            sock.setsockopt(zmq.LINGER, 0)
        mp = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state forked from this one
        reader, writer = mp.Pipe(duplex=False)
        self.process = mp.Process(target=run_core, name="cupaged-engine-core", daemon=True,
                                  args=(model, options, input_addr, output_addr, writer, os.getpid()))
        self.process.start()
        writer.close()
        self.decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._encoder = msgspec.msgpack.Encoder()
        try:
            while not reader.poll(POLL_MS / 1000):
                if not self.process.is_alive():
                    raise CoreDied(f"the engine core exited while loading (exit code {self.process.exitcode})")
            message = reader.recv()
        except EOFError:  # it ended between its last word and ours
            self.process.join(POLL_MS / 1000)
            self.close()
            raise CoreDied(f"the engine core exited while loading (exit code {self.process.exitcode})") from None
        except BaseException:
            self.close()
            raise
        finally:
            reader.close()
        if message[0] == "error":
            self.close()
            raise message[1]
        _, self.info, self.config, self.tokenizer = message
        self.info: CoreInfo

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def dead(self) -> str | None:
        """Why the core is gone, or None while it runs."""
        if self.process.is_alive():
            return None
        return f"the engine core process ended (exit code {self.process.exitcode})"

    def add_request(self, request: EngineCoreRequest) -> None:
        self._input.send_multipart([ADD, self._encoder.encode(request)], copy=False)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.abort_many([(request_id, index)])

    def abort_many(self, aborts: list[tuple[str, int | None]]) -> None:
        if aborts:
            self._input.send_multipart([ABORT, self._encoder.encode(aborts)], copy=False)

    def get_outputs(self, block: bool) -> EngineCoreOutputs | None:
        """Every step's outputs that have arrived, merged (None if none); with `block`, waits for one, raising
        CoreDied if the core is gone."""
        merged: EngineCoreOutputs | None = None
        while True:
            if not self.output.poll(POLL_MS if block and merged is None else 0):
                if merged is not None or not block:
                    return merged
                why = self.dead()
                if why is not None:
                    raise CoreDied(why)
                continue
            out = self.decoder.decode(self.output.recv(copy=False).buffer)
            if merged is None:
                merged = out
            else:
                merged.outputs += out.outputs
                merged.stats = out.stats

    def close(self, timeout: float = 5.0) -> None:
        """Tell the core to stop, and make sure it does."""
        if self.process.is_alive():
            try:
                self._input.send_multipart([SHUTDOWN], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout)
        for sock in (self._input, self.output):
            sock.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)
