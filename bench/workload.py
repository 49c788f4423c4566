"""The benchmark workload of nano-vllm's bench.py (../shared/DEVICE_NOTES.md), optionally scaled down.

256 requests, prompt and output lengths uniform in [100, 1024], random.seed(0), token ids randint(0, 10000),
EOS ignored. `scale` divides the lengths (for the CPU), `num_requests` trims the list.
"""

from __future__ import annotations

import contextlib
import random
import tempfile

import click

from tools.make_checkpoint import PRESETS, make_checkpoint

# The command-line options of the benches that run this workload through an engine (cupaged.options.with_options).
WORKLOAD_OPTIONS = [
    click.option("--model", default=None, help="Checkpoint directory (tools/make_checkpoint.py --preset qwen3-0.6b)."),
    click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
                 help="Instead of --model: this tools/make_checkpoint.py shape with random weights "
                      "(load_format=dummy)."),
    click.option("--num-requests", default=256, show_default=True),
    click.option("--scale", default=1, show_default=True, help="Divide the workload's lengths (for the CPU)."),
    click.option("--device", default=None, help="cpu or cuda (default: automatic)."),
    click.option("--dtype", default="auto", show_default=True),
    click.option("--max-num-seqs", default=256, show_default=True),
    click.option("--quantization", type=click.Choice(["fp8"]), default=None, help="FP8 weights (engine option)."),
    click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
                 help="The KV cache's dtype (engine option)."),
    click.option("--enforce-eager", is_flag=True, help="No CUDA graphs."),
    click.option("--sync-scheduling", is_flag=True,
                 help="No async scheduling: read each step's tokens before the next."),
]


def bench_checkpoint(stack: contextlib.ExitStack, model: str | None, preset: str | None, options: dict) -> str:
    """The checkpoint a bench runs: --model, or for --preset a config-only checkpoint in a temporary directory (kept
    until `stack` closes) whose random weights the engine makes on the device (options gets load_format="dummy")."""
    if (model is None) == (preset is None):
        raise click.UsageError("give either --model or --preset")
    if model is not None:
        return model
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="cupaged-bench-"))
    options["load_format"] = "dummy"
    return str(make_checkpoint(f"{tmp}/{preset}", preset, dtype="bfloat16", weights=False))


def nano_vllm_workload(num_requests: int = 256, scale: int = 1, vocab: int = 10000,
                       seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request."""
    random.seed(seed)
    lo, hi = 100 // scale, 1024 // scale
    top = 10000 if vocab > 10000 else vocab - 1  # nano-vllm draws randint(0, 10000), both ends included
    prompts = [[random.randint(0, top) for _ in range(random.randint(lo, hi))]
               for _ in range(num_requests)]
    outputs = [random.randint(lo, hi) for _ in range(num_requests)]
    return list(zip(prompts, outputs))
