"""GGUF weights kept quantized on the GPU: memory, load, batch-1 decode against its limit, and throughput at 64
concurrent requests beside the bf16 engine of the same shape.

    python -m bench.bench_gguf [--preset llama-3-8b] [--model FILE.gguf] [--weights random-blocks|quantized]
                               [--tokens 128] [--json gguf.json]

Without --model it writes a random-weight Q4_K_M file of the preset's shape with tools/make_gguf.py. Its default
`--weights random-blocks` fills each quantized tensor with random blocks (random quants, fp16 scales drawn so
that a row times a unit vector has variance 1 / fan_in, as make_checkpoint's weights do) instead of quantizing
drawn values, which takes minutes for 8B in NumPy; the bytes are what the kernels read either way.

Figures, printed as a table last (and written as JSON):
- load: seconds, and the peak host RSS above the RSS before loading (sampled every 5 ms): the load streams tensor
  by tensor, so this should be near the largest tensor, not the file;
- GPU bytes the weights take (memory pool growth while the model is built) over the file's tensor bytes;
- batch-1 decode tokens/s (CUDA graphs, steps after the prefill) against the limit of reading every quantized
  byte a step reads (all tensors but the embedding table unless it is also the LM head) once per token at the
  copy bandwidth measured in the same run (bench_decode_attention.copy_bandwidth; K/V reads are small at this
  context and left out, which makes the limit stricter);
- output tokens/s of 64 concurrent requests (128-token prompts, `--tokens` each, greedy, EOS ignored), the
  quantized engine and the bf16 engine of the same config (random bf16 weights made on the GPU,
  load_format="dummy"), one after the other.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import click
import numpy as np

PROMPT = 128
CONCURRENT = 64


def random_block_bytes(fallback: Callable, rng: np.random.Generator, name: str, shape: tuple[int, ...],
                       qtype: str) -> np.ndarray:
    """Random blocks of `qtype` for a [rows, cols] tensor whose values have variance about 1 / cols (other types:
    `fallback`, make_gguf's own drawing)."""
    from cupaged import quant

    if qtype not in quant.KERNEL_FORMATS:
        return fallback(rng, name, shape, qtype)
    f = quant.FORMATS[qtype]
    rows, cols = math.prod(shape[:-1]), shape[-1]
    blocks = rng.integers(0, 256, (rows * cols // f.block_size, f.type_size), dtype=np.uint8)
    probe = blocks[:64].copy()
    for offset in f.scale_offsets:
        probe[:, offset:offset + 2] = np.ones(len(probe), np.float16).view(np.uint8).reshape(-1, 2)
    rms = float(np.sqrt(np.mean(f.dequantize_blocks(probe) ** 2)))  # of values with unit scales
    for offset in f.scale_offsets:
        scale = (rng.standard_normal(len(blocks)) / (rms * math.sqrt(cols))).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_model(path: Path, preset: str, weights: str, **overrides: object) -> Path:
    from tools import make_gguf

    if weights == "quantized":
        return make_gguf.make_gguf(path, preset, mix="q4_k_m", **overrides)
    fast = functools.partial(random_block_bytes, make_gguf._tensor_bytes)
    with mock.patch.object(make_gguf, "_tensor_bytes", fast):
        return make_gguf.make_gguf(path, preset, mix="q4_k_m", **overrides)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure_load(path: Path) -> dict:
    """Build the model alone on the GPU: seconds, peak host RSS growth, GPU bytes of the weights."""
    import cupy

    from cupaged.checkpoint import open_checkpoint
    from cupaged.layers import cuda_ops
    from cupaged.models.llama import LlamaModel, expected_weights

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    before_gpu, before_rss, peak, done = pool.used_bytes(), _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    config, _, read = open_checkpoint(path)
    tensors = read(expected_weights(config), "bfloat16", dequantize=False)
    model = LlamaModel(config, tensors, cuda_ops, cupy, max_positions=1)
    cupy.cuda.Device().synchronize()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    gpu = pool.used_bytes() - before_gpu
    del model, tensors
    gc.collect()
    pool.free_all_blocks()
    return {"load_s": seconds, "peak_rss_growth_gb": (max(peak[0], _rss()) - before_rss) / 1e9,
            "weights_gpu_gb": gpu / 1e9}


def tensor_bytes(path: Path) -> dict:
    """Bytes of every tensor in the file, of the largest, and of those a decode step reads (all but an untied
    embedding table)."""
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(sizes.values())
    return {"tensor_bytes": total, "largest_tensor_bytes": max(sizes.values()),
            "read_per_token_bytes": total - (sizes["token_embd.weight"] if "output.weight" in sizes else 0)}


def _engine(path: Path, **options):
    from cupaged import LLMEngine

    return LLMEngine(str(path), device="cuda", dtype="bfloat16", max_num_seqs=CONCURRENT, max_model_len=1024,
                     max_num_batched_tokens=2048, num_kv_blocks=CONCURRENT * 24, **options)


def _run(engine, prompts: list[list[int]], tokens: int) -> float:
    """Seconds to finish `prompts`, `tokens` each."""
    import cupy

    from cupaged import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def measure_engine(path: Path, tokens: int, batch1: bool, **options) -> dict:
    import cupy

    engine = _engine(path, **options)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, PROMPT).tolist() for _ in range(CONCURRENT)]
    _run(engine, prompts[:2], 4)  # warm-up
    out = {}
    if batch1:
        # tokens/s of steps after the prefill: (tokens + 1 tokens) - (1 token), one request
        out["batch1_tok_s"] = tokens / (_run(engine, prompts[:1], tokens + 1) - _run(engine, prompts[1:2], 1))
    out["concurrent_tok_s"] = CONCURRENT * tokens / _run(engine, prompts, tokens)
    del engine
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    return out


@click.command()
@click.option("--preset", default="llama-3-8b", show_default=True)
@click.option("--model", "model", default=None, help="A .gguf file instead of a random one of --preset.")
@click.option("--weights", type=click.Choice(["random-blocks", "quantized"]), default="random-blocks",
              show_default=True)
@click.option("--tokens", default=128, show_default=True, help="Tokens generated per request.")
@click.option("--json", "json_path", default=None)
def main(preset: str, model: str | None, weights: str, tokens: int, json_path: str | None) -> None:
    from bench.bench_decode_attention import copy_bandwidth
    from cupaged import device

    device.set_device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = Path(model) if model else write_model(Path(tmp) / f"{preset}-q4_k_m.gguf", preset, weights)
        made_s = time.perf_counter() - t0
        sizes = tensor_bytes(path)
        click.echo(f"file: {sizes} in {made_s:.1f} s", err=True)  # as measured: a run cut short keeps them
        load = measure_load(path)
        click.echo(f"load: {load}", err=True)
        copy_gbs = copy_bandwidth(10)["copy_gb_s"]
        limit = copy_gbs * 1e9 / sizes["read_per_token_bytes"]
        quantized = measure_engine(path, tokens, batch1=True)
        click.echo(f"quantized engine: {quantized}, batch-1 limit {limit:.0f} tok/s", err=True)
        bf16 = measure_engine(path, tokens, batch1=False, load_format="dummy")
    row = {"model": str(model or f"random {preset} Q4_K_M ({weights})"), "file_made_s": made_s,
           **{k.replace("bytes", "gb"): v / 1e9 for k, v in sizes.items()}, **load,
           "weights_over_file": load["weights_gpu_gb"] * 1e9 / sizes["tensor_bytes"], "copy_gb_s": copy_gbs,
           "batch1_limit_tok_s": limit, "batch1_tok_s": quantized["batch1_tok_s"],
           "batch1_of_limit": quantized["batch1_tok_s"] / limit, "concurrent": CONCURRENT,
           "concurrent_tok_s_quantized": quantized["concurrent_tok_s"],
           "concurrent_tok_s_bf16": bf16["concurrent_tok_s"]}
    if json_path:
        Path(json_path).write_text(json.dumps(row, indent=2))
    for key, value in row.items():
        click.echo(f"{key:<28} {value:.3f}" if isinstance(value, float) else f"{key:<28} {value}")


if __name__ == "__main__":
    main()
