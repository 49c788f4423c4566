"""The `cupaged` command line: `cupaged run`, `cupaged chat`, `cupaged serve` (cupaged/serve/)."""

from __future__ import annotations

import itertools
import sys
import time
from typing import TYPE_CHECKING

import click

from cupaged.options import (ENGINE_OPTIONS, SAMPLING_OPTIONS, engine_kwargs, model_path, sampling_params,
                             setup_logging, with_options)

if TYPE_CHECKING:
    from cupaged.engine.llm_engine import LLMEngine

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


from cupaged.serve.app import serve  # noqa: E402

main.add_command(serve)


if __name__ == "__main__":
    main()
