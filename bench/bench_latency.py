"""Batch-1 decode latency: tokens/s of one request against the limit that reading every weight once per token
at the measured copy bandwidth allows.

    python -m bench.bench_latency [--shapes qwen3-0.6b,llama-3-8b] [--tokens 256] [--quantization fp8]
                                  [--no-eager] [--json latency.json]

Each shape is a preset of tools/make_checkpoint.py written without weights; the engine makes random bf16 weights
on the GPU (`load_format="dummy"`). One request, a 128-token prompt, greedy, EOS ignored; the time of every step
after the first (the prefill) is measured, with the CUDA graphs and (unless --no-eager) with `enforce_eager`.
Bytes per token = every weight the step reads (the embedding table counts only when it is also the LM head) + the K/V read; the limit
is the device-to-device copy bandwidth (bytes read + written, the same as bench_decode_attention) over them.
With `--quantization fp8` the linear layers are quantized to FP8 at load (1 byte a weight in the limit).
"""

from __future__ import annotations

import gc
import json
import math
import sys
import tempfile
import time

import click
import numpy as np

from bench.bench_decode_attention import copy_bandwidth
from cupaged import LLMEngine, SamplingParams
from cupaged.kv_cache import KVCache
from cupaged.layers.fp8_linear import LINEAR_SUFFIXES
from cupaged.models.llama import expected_weights
from tools.make_checkpoint import make_checkpoint

PROMPT = 128


def weight_bytes(config, quantization: str | None = None) -> int:
    """Bytes of the weights one decode step reads (bf16; FP8 linear layers 1 byte a weight)."""
    shapes = expected_weights(config)
    if not config.tie_word_embeddings:  # the embedding table is only gathered from
        del shapes["model.embed_tokens.weight"]
    return sum(math.prod(s) * (1 if quantization and name.endswith(LINEAR_SUFFIXES) else 2)
               for name, s in shapes.items())


def decode_rate(path: str, tokens: int, enforce_eager: bool, quantization: str | None = None) -> tuple[float, object]:
    """Decode tokens/s of one request (steps after the prefill), and the engine's config."""
    import cupy

    engine = LLMEngine(path, device="cuda", dtype="bfloat16", load_format="dummy", max_num_seqs=1,
                       gpu_memory_utilization=0.45, enforce_eager=enforce_eager, quantization=quantization)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, PROMPT).tolist()
    engine.add_request("warmup", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("timed", prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    engine.step()  # the prefill
    cupy.cuda.Device().synchronize()
    t0, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()  # returns after the sampled token reached the host: every step is synchronous
        steps += 1
    rate = steps / (time.perf_counter() - t0)
    config = engine.config
    del engine
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    return rate, config


@click.command()
@click.option("--shapes", default="qwen3-0.6b,llama-3-8b", show_default=True)
@click.option("--tokens", default=256, show_default=True, help="Tokens generated per measurement.")
@click.option("--quantization", type=click.Choice(["fp8"]), default=None, help="Linear layers in FP8.")
@click.option("--eager/--no-eager", default=True, show_default=True, help="Also measure without CUDA graphs.")
@click.option("--json", "json_path", default=None)
def main(shapes: str, tokens: int, quantization: str | None, eager: bool, json_path: str | None) -> None:
    from cupaged import device

    device.set_device("cuda")
    copy_gbs = copy_bandwidth(10)["copy_gb_s"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, \
            click.progressbar(shapes.split(","), label="batch-1 decode", file=sys.stderr) as bar:
        for preset in bar:
            path = str(make_checkpoint(f"{tmp}/{preset}", preset, dtype="bfloat16", weights=False))
            graphs, config = decode_rate(path, tokens, False, quantization)
            eager_rate = decode_rate(path, tokens, True, quantization)[0] if eager else None
            context = PROMPT + tokens // 2  # the average context over the measured steps
            kv = KVCache.bytes_per_block(config, 1, np.dtype(np.uint16)) * context
            nbytes = weight_bytes(config, quantization) + kv
            limit = copy_gbs * 1e9 / nbytes
            rows.append({"shape": preset, "quantization": quantization,
                         "weight_gb": weight_bytes(config, quantization) / 1e9, "kv_gb": kv / 1e9,
                         "limit_tok_s": limit, "graphs_tok_s": graphs, "eager_tok_s": eager_rate,
                         "fraction_of_limit": graphs / limit, "copy_gb_s": copy_gbs})
            click.echo(f"{preset}: {graphs:.0f} tok/s with graphs, limit {limit:.0f}")  # shown if a later one is cut
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
    click.echo(f"copy bandwidth {copy_gbs:.0f} GB/s (read + written)")
    click.echo(f"{'shape':<12} {'weights GB':>10} {'limit tok/s':>11} {'graphs tok/s':>12} {'eager tok/s':>11} "
               f"{'of limit':>8}")
    for r in rows:
        click.echo(f"{r['shape']:<12} {r['weight_gb']:>10.2f} {r['limit_tok_s']:>11.0f} {r['graphs_tok_s']:>12.0f} "
                   f"{r['eager_tok_s'] or float('nan'):>11.0f} {r['fraction_of_limit']:>8.2f}")


if __name__ == "__main__":
    main()
