"""Load test of `cupaged serve`: N streamed completions, C at a time, over loopback, within a time limit; then
the same requests offline, in the same run, through `cupaged.LLMEngine`, for the ratio server / offline.

    python -m bench.bench_serve --model CKPT --device cuda --num-requests 256 --concurrency 32 --json out.json
    python -m bench.bench_serve --url http://127.0.0.1:8000 --num-requests 64     # a server already running

The issue's two workloads on the Qwen3-0.6B shape (256 requests; targets: server / offline >= 0.9 in both, and at
concurrency 64 TTFT p50 <= 50 ms, p99 <= 300 ms, ITL p99 <= 30 ms), one command each:

    python -m tools.make_checkpoint --preset qwen3-0.6b --dtype bfloat16 --out /tmp/qwen3-0.6b
    python -m bench.bench_serve --model /tmp/qwen3-0.6b --device cuda -n 256 -c 64 \
        --input-len 128 --output-len 128 --range-ratio 0.5 --json serve_c64.json
    python -m bench.bench_serve --model /tmp/qwen3-0.6b --device cuda -n 256 -c 256 \
        --input-len 562 --output-len 562 --range-ratio 0.8 --json serve_c256.json

A CPU smoke run: `python -m tools.make_checkpoint --preset qwen3-tiny --out /tmp/qwen3-tiny`, then
`python -m bench.bench_serve --model /tmp/qwen3-tiny --device cpu -n 16 -c 4 --input-len 16 --output-len 16`.

With --model the bench starts the server itself (`python -m cupaged.cli serve` on a free loopback port, extra
server options through --server-arg), waits for /health, sends one warm-up request (kernel compilation), runs
the load, and stops the server with SIGTERM. Each request is a streamed /v1/completions of random token ids
(prompt length uniform in input_len * [1 - range_ratio, 1 + range_ratio], likewise the output length, EOS
ignored so every request generates exactly its length; random.seed(--seed)).

Then, once the server has exited (it held the GPU's memory), the same requests run offline in this process
(`--no-offline` skips it): an LLMEngine with the server's engine options (--model, --device, --dtype and the
--server-arg ones, parsed as `cupaged serve` parses them) but at most --concurrency sequences a step, as the
server never has more; one warm-up request, then every request at once, greedy, EOS ignored, max_tokens its
output length, output_kind="final_only". server / offline is the ratio of their output tokens/s.

Reported: requests/s and output tokens/s over the wall time of the load; TTFT (request sent to first streamed
chunk) and ITL (time between streamed chunks; the server sends a chunk for every step that brought tokens, text
or not, as vLLM does, so a random-weight model whose tokenizer covers few of its ids still shows each token) as
p50/p90/p99 in milliseconds; counts of completed, failed and unfinished (cut by
--time-limit) requests; offline output tokens/s and server / offline. A short table is printed last; --json
writes every figure.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger(__name__)


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None


def workload(num_requests: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
             seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    return [([rng.randrange(vocab) for _ in range(length(input_len))], length(output_len))
            for _ in range(num_requests)]


async def one_request(session, url: str, model: str, prompt: list[int], max_tokens: int) -> Result:
    result = Result()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = last = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    result.ok = result.error is None
                    break
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("finish_reason") == "abort":
                        result.error = "aborted by the server"
                    # every chunk with a choice is tokens arriving, text or not (as vLLM's benchmark counts them):
                    # a random-weight model samples ids its small test tokenizer decodes to nothing
                    if result.ttft is None:
                        result.ttft = now - t0
                    else:
                        result.itl.append(now - last)
                    last = now
    except (OSError, asyncio.TimeoutError, ValueError) as exc:  # aiohttp's errors are OSErrors
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - t0
    return result


async def run_load(url: str, model: str, requests: list[tuple[list[int], int]], concurrency: int,
                   time_limit: float, api_key: str | None) -> tuple[list[Result], int, float]:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=time_limit)
    results: list[Result] = []
    gate = asyncio.Semaphore(concurrency)

    async def limited(session, prompt: list[int], n: int) -> None:
        async with gate:
            results.append(await one_request(session, url, model, prompt, n))

    async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(limited(session, p, n)) for p, n in requests]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=30)
        elapsed = time.perf_counter() - t0
    return results, len(pending), elapsed


def summarize(results: list[Result], unfinished: int, elapsed: float, config: dict) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]

    def pct(values: list[float]) -> dict:
        if not values:
            return {"p50": None, "p90": None, "p99": None, "mean": None}
        a = np.asarray(values) * 1000
        return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}

    output_tokens = sum(r.output_tokens for r in ok)
    return {**config, "completed": len(ok), "failed": len(failed), "unfinished": unfinished,
            "first_error": failed[0].error if failed else None, "wall_s": elapsed,
            "requests_per_s": len(ok) / elapsed, "output_tokens": output_tokens,
            "output_tokens_per_s": output_tokens / elapsed,
            "total_tokens_per_s": (output_tokens + sum(r.prompt_tokens for r in ok)) / elapsed,
            "ttft_ms": pct([r.ttft for r in ok if r.ttft is not None]),
            "itl_ms": pct([x for r in ok for x in r.itl]),
            "latency_ms": pct([r.latency for r in ok if r.latency is not None])}


def table(s: dict) -> str:
    def triple(d: dict) -> str:
        return " / ".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50", "p90", "p99"))

    offline, ratio = s.get("offline_output_tokens_per_s"), s.get("server_over_offline")
    rows = [("requests", f"{s['completed']} completed, {s['failed']} failed, {s['unfinished']} unfinished"),
            ("concurrency", str(s["concurrency"])),
            ("wall time s", f"{s['wall_s']:.2f}"),
            ("requests/s", f"{s['requests_per_s']:.2f}"),
            ("output tokens/s", f"{s['output_tokens_per_s']:.1f}"),
            ("TTFT ms p50/p90/p99", triple(s["ttft_ms"])),
            ("ITL ms p50/p90/p99", triple(s["itl_ms"])),
            ("latency ms p50/p90/p99", triple(s["latency_ms"])),
            ("offline output tokens/s", "n/a" if offline is None else f"{offline:.1f}"),
            ("server / offline", "n/a" if ratio is None else f"{ratio:.2f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def offline_engine_options(model: str, device: str, dtype: str, server_args: list[str],
                           concurrency: int) -> dict:
    """The LLMEngine options the started server got, parsed from its command line as `cupaged serve` parses it,
    with at most `concurrency` sequences a step (the server never has more). If that parser cannot be used (the
    server's command line changed), model, device and dtype alone, with a warning."""
    try:
        from cupaged.cli import engine_kwargs
        from cupaged.cli import main as cli

        ctx = cli.commands["serve"].make_context(
            "serve", ["--model", model, "--device", device, "--dtype", dtype, *server_args])
        options = engine_kwargs(ctx.params)
    except Exception as exc:  # a click error, or a cli without these names
        logger.warning("offline run: cannot parse the server's options (%s); using --model, --device and --dtype "
                       "alone", exc)
        options = dict(device=None if device == "auto" else device, dtype=dtype)
    options["max_num_seqs"] = min(options.get("max_num_seqs") or concurrency, concurrency)
    return options


def run_offline(model: str, requests: list[tuple[list[int], int]], options: dict) -> dict:
    """The same requests through an in-process LLMEngine, all queued at once; output tokens/s over the time from
    the first step to the last output (after one warm-up request)."""
    from cupaged import LLMEngine, SamplingParams

    engine = LLMEngine(model, **options)
    engine.add_request("warmup", requests[0][0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                                          output_kind="final_only"))
    generated = 0
    t0 = time.perf_counter()
    with click.progressbar(length=len(requests), label="offline", file=sys.stderr) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    generated += len(out.outputs[0].token_ids)
                    bar.update(1)
    elapsed = time.perf_counter() - t0
    del engine
    gc.collect()
    return {"offline_output_tokens": generated, "offline_wall_s": elapsed,
            "offline_output_tokens_per_s": generated / elapsed,
            "offline_engine_options": {k: v for k, v in options.items() if v is not None}}


def check_loopback(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise click.BadParameter(f"{url}: this bench only talks to a server on the loopback interface",
                                 param_hint="--url")


def get_json(url: str, api_key: str | None, timeout: float = 5.0) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


class Server:
    """`cupaged serve` started by the bench on a free loopback port."""

    def __init__(self, model: str, device: str, extra: list[str], api_key: str | None, startup_timeout: float):
        self.log = Path(tempfile.mkstemp(prefix="cupaged-serve-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "cupaged.cli", "serve", "--model", model, "--device", device,
               "--host", "127.0.0.1", "--port", "0", *extra]
        if api_key:
            cmd += ["--api-key", api_key]
        click.echo(f"starting: {shlex.join(cmd)} (log: {self.log})", err=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        self.url = None
        while self.url is None:
            found = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", self.log.read_text())
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise click.ClickException(f"the server did not start; its log:\n{self.log.read_text()[-4000:]}")
            else:
                time.sleep(0.1)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@click.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              help="A running server (loopback only); ignored with --model.")
@click.option("--model", default=None, help="Start `cupaged serve --model MODEL` for the run, and stop it after.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="--device of the server started with --model.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="--dtype of the server started with --model.")
@click.option("--server-arg", "server_args", multiple=True,
              help="More options for the started server, e.g. --server-arg '--max-num-seqs 128' (repeatable).")
@click.option("--served-model-name", default=None, help="Model name to send. Default: the server's first model.")
@click.option("--api-key", default=None, envvar="CUPAGED_API_KEY")
@click.option("--num-requests", "-n", type=int, default=256, show_default=True)
@click.option("--concurrency", "-c", type=int, default=32, show_default=True, help="Requests in flight at once.")
@click.option("--input-len", type=int, default=128, show_default=True, help="Mean prompt length in tokens.")
@click.option("--output-len", type=int, default=128, show_default=True, help="Mean output length in tokens.")
@click.option("--range-ratio", type=float, default=0.5, show_default=True,
              help="Lengths are uniform in len * [1 - r, 1 + r].")
@click.option("--vocab", type=int, default=1000, show_default=True, help="Prompt token ids are drawn below this.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--time-limit", type=float, default=600.0, show_default=True,
              help="Seconds for the whole load; requests still running then are cancelled (unfinished).")
@click.option("--startup-timeout", type=float, default=900.0, show_default=True,
              help="Seconds the started server may take to load.")
@click.option("--no-offline", is_flag=True, help="Skip the offline run of the same requests (with --model).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures here.")
def main(url: str, model: str | None, device: str, dtype: str, server_args: tuple[str, ...],
         served_model_name: str | None, api_key: str | None, num_requests: int, concurrency: int, input_len: int,
         output_len: int, range_ratio: float, vocab: int, seed: int, time_limit: float, startup_timeout: float,
         no_offline: bool, json_path: str | None) -> None:
    """Load-test a cupaged server: requests/s, output tokens/s, TTFT and ITL percentiles; then the same requests
    offline, for server / offline."""
    try:
        import aiohttp  # noqa: F401  (only checking that it is there)
    except ImportError:
        raise click.ClickException("the bench needs aiohttp: pip install cupaged[serve]") from None
    if num_requests < 1 or concurrency < 1 or not 0 <= range_ratio < 1:
        raise click.BadParameter("need --num-requests >= 1, --concurrency >= 1 and 0 <= --range-ratio < 1")
    server = None
    extra = [a for arg in server_args for a in shlex.split(arg)]
    if model:
        server = Server(model, device, ["--dtype", dtype, *extra], api_key, startup_timeout)
        url = server.url
    check_loopback(url)
    url = url.rstrip("/")
    try:
        deadline = time.monotonic() + (startup_timeout if server else 10)
        while get_json(url + "/health", None)[0] != 200:
            if time.monotonic() > deadline:
                raise click.ClickException(f"{url}/health does not answer 200")
            time.sleep(0.2)
        status, models = get_json(url + "/v1/models", api_key)
        if status != 200:
            raise click.ClickException(f"{url}/v1/models answered HTTP {status}")
        card = models["data"][0]
        name = served_model_name or card["id"]
        requests = workload(num_requests, input_len, output_len, range_ratio, vocab, seed)
        longest = max(len(p) + n for p, n in requests)
        if card.get("max_model_len") and longest > card["max_model_len"]:
            raise click.ClickException(f"a request needs {longest} tokens, more than the server's context of "
                                       f"{card['max_model_len']}: lower --input-len/--output-len")
        click.echo(f"warming up {url} ({name})", err=True)
        warm, _, _ = asyncio.run(run_load(url, name, [(requests[0][0], 8)], 1, startup_timeout, api_key))
        if not (warm and warm[0].ok):
            raise click.ClickException(f"the warm-up request failed: {warm[0].error if warm else 'timed out'}")
        click.echo(f"{num_requests} requests, concurrency {concurrency}", err=True)
        results, unfinished, elapsed = asyncio.run(run_load(url, name, requests, concurrency, time_limit, api_key))
    finally:
        exit_code = server.stop() if server else None
    config = {"url": url, "model": name, "num_requests": num_requests, "concurrency": concurrency,
              "input_len": input_len, "output_len": output_len, "range_ratio": range_ratio, "seed": seed,
              "dtype": dtype, "server_args": list(server_args), "server_exit_code": exit_code}
    summary = summarize(results, unfinished, elapsed, config)
    summary |= {"offline_output_tokens_per_s": None, "server_over_offline": None}
    if model and not no_offline:  # the server has exited: the GPU's memory is free again
        click.echo(f"the same {num_requests} requests offline", err=True)
        summary |= run_offline(model, requests, offline_engine_options(model, device, dtype, extra, concurrency))
        summary["server_over_offline"] = summary["output_tokens_per_s"] / summary["offline_output_tokens_per_s"]
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
    if summary["first_error"]:
        click.echo(f"first error: {summary['first_error']}", err=True)
    click.echo(table(summary))


if __name__ == "__main__":
    main()
