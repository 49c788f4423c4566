"""How fast the server's own process can stream, without a GPU: the real HTTP app, AsyncLLM's front and its
OutputProcessor, fed by a stand-in core (a thread) that gives every live request one token every --step-ms (as a GPU
core would at that step time) and sends each step over ZeroMQ as msgpack, as a real core does.

    python -m bench.bench_front --model /tmp/qwen3-0.6b-shape -c 64 --step-ms 4 -n 256

The load comes from bench/bench_serve.py in a process of its own (`--url`). If the front keeps up, the tokens/s
served is concurrency / step time and ITL is the step time; where it falls behind, TTFT and ITL grow. The table of
bench_serve is printed last; the stand-in core's offered tokens/s is printed before it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import msgspec
import numpy as np
import zmq
import zmq.asyncio

from cupaged.checkpoint import open_checkpoint
from cupaged.engine.async_llm import AsyncLLM
from cupaged.engine.output_processor import OutputProcessor
from cupaged.engine.protocol import (CoreInfo, EngineCoreOutputs, EngineCoreRequest, EngineStats, RequestDelta,
                                     SequenceDelta)
from cupaged.serve.app import Server
from cupaged.serve.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


class StandInCore:
    """What AsyncLLM asks of its core client, with a token per live request per step instead of a model."""

    def __init__(self, config, tokenizer, max_model_len: int):
        self.info = CoreInfo(max_model_len, 1 << 20, 16, config.vocab_size, "cpu", "float32")
        self.config, self.tokenizer = config, tokenizer
        self.pid = os.getpid()
        self.live: dict[str, list[int]] = {}  # request id -> [tokens left]
        self.encoder, self.decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineCoreOutputs)
        self.rng = np.random.default_rng(0)
        self.lock = threading.Lock()  # the stepping thread and the event loop's adds and aborts

    def add_request(self, request: EngineCoreRequest) -> None:
        with self.lock:
            self.live[request.request_id] = [request.params.max_tokens]

    def abort(self, request_id: str, index: int | None = None) -> None:
        with self.lock:
            self.live.pop(request_id, None)

    def abort_many(self, aborts: list[tuple[str, int | None]]) -> None:
        for request_id, _ in aborts:
            self.abort(request_id)

    def step(self) -> bytes:
        """One step's message, as a core would send it."""
        outputs = []
        tokens = self.rng.integers(3, self.config.vocab_size, len(self.live)).tolist()
        for (request_id, left), token in zip(list(self.live.items()), tokens):
            left[0] -= 1
            done = left[0] <= 0
            outputs.append(RequestDelta(request_id, [SequenceDelta(0, [token], "length" if done else None)], done))
            if done:
                del self.live[request_id]
        stats = EngineStats(num_running=len(self.live), num_running_requests=len(self.live))
        return self.encoder.encode(EngineCoreOutputs(outputs, stats))

    def close(self) -> None:
        pass


class StandInLLM(AsyncLLM):
    """AsyncLLM with the stand-in core: its front (the reader of the core's socket, processor, queues, delivery) is
    the real one. The stand-in steps in a thread of its own and sends each step over ZeroMQ, as a core would."""

    def __init__(self, model: str, step_s: float):
        config, tokenizer, _ = open_checkpoint(model)
        self.client = StandInCore(config, tokenizer, config.max_position_embeddings)
        self.config, self.tokenizer = config, tokenizer
        self.max_model_len = config.max_position_embeddings
        self.processor = OutputProcessor(tokenizer)
        self.stats = EngineStats()
        self.dead, self.on_dead, self._queues, self._reader = None, None, {}, None
        self.step_s = step_s
        self._address = f"ipc://{tempfile.mkdtemp(prefix='cupaged-front-')}/outputs"
        self.client.output = zmq.asyncio.Context().socket(zmq.PULL)
        self.client.output.bind(self._address)
        self._stop = threading.Event()

    @property
    def core_pid(self) -> int | None:
        return self.client.pid

    def start(self) -> None:
        threading.Thread(target=self._steps, daemon=True).start()
        self._reader = asyncio.ensure_future(self._read_outputs())

    def _steps(self) -> None:
        push = zmq.Context().socket(zmq.PUSH)
        push.connect(self._address)
        next_step = time.perf_counter()
        while not self._stop.is_set():
            next_step += self.step_s
            time.sleep(max(0.0, next_step - time.perf_counter()))
            with self.client.lock:
                message = self.client.step() if self.client.live else None
            if message is not None:
                push.send(message)

    def shutdown(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.cancel()


async def serve(llm: StandInLLM, port: int, ready: asyncio.Event, stop: asyncio.Event) -> None:
    from aiohttp import web

    llm.start()
    runner = web.AppRunner(Server(llm, Metrics(), "front", None, -1).app(), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ready.set()
    await stop.wait()
    await runner.cleanup()


@click.command()
@click.option("--model", required=True, help="A checkpoint directory: its tokenizer and config are used.")
@click.option("--concurrency", "-c", default=64, show_default=True)
@click.option("--num-requests", "-n", default=256, show_default=True)
@click.option("--step-ms", default=4.0, show_default=True, help="The stand-in core's step time.")
@click.option("--input-len", default=128, show_default=True)
@click.option("--output-len", default=128, show_default=True)
@click.option("--port", default=18123, show_default=True)
@click.option("--json", "json_path", default=None)
def main(model: str, concurrency: int, num_requests: int, step_ms: float, input_len: int, output_len: int,
         port: int, json_path: str | None) -> None:
    """Stream from the real server front at a stand-in core's pace and report what the clients got."""
    llm = StandInLLM(model, step_ms / 1e3)
    click.echo(f"stand-in core: a token per live request every {step_ms} ms: up to "
               f"{concurrency / step_ms * 1e3:.0f} tokens/s at concurrency {concurrency}", err=True)

    async def run() -> int:
        ready, stop = asyncio.Event(), asyncio.Event()
        server = asyncio.ensure_future(serve(llm, port, ready, stop))
        await ready.wait()
        cmd = [sys.executable, "-m", "bench.bench_serve", "--url", f"http://127.0.0.1:{port}", "-n", str(num_requests),
               "-c", str(concurrency), "--input-len", str(input_len), "--output-len", str(output_len),
               "--vocab", str(min(1000, llm.config.vocab_size))] + (["--json", json_path] if json_path else [])
        load = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                                    stdout=subprocess.PIPE)
        out, _ = await load.communicate()
        click.echo(out.decode())
        stop.set()
        await server
        llm.shutdown()
        return load.returncode

    raise SystemExit(asyncio.run(run()))


if __name__ == "__main__":
    main()
