"""Greedy tokens of the FP8-KV engine against the engine with a cache in the model dtype, on a real model.

    python -m bench.fp8_kv_agreement [--model PATH] [--device cpu|cuda] [--prompts 5] [--tokens 64]

Runs the same prompts (greedy, ignore_eos) through both engines and reports, per prompt, how many tokens agree
before the first divergence and, at that position, the gap between the two best logits of the reference engine
(a near-tie when it is small: the quantization moved the choice between two almost equally likely tokens).
Default model: the default SmolLM2-135M-Instruct GGUF (already in the cupaged cache).
"""

from __future__ import annotations

import click
import numpy as np

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
           "Explain why the sky is blue in two sentences.", "List three prime numbers greater than 100:",
           "Once upon a time, in a small village,", "The theory of relativity says that"]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@click.command()
@click.option("--model", default=None, help="Checkpoint (default: the default model).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--prompts", default=5, show_default=True)
@click.option("--tokens", default=64, show_default=True)
def main(model: str | None, device: str, prompts: int, tokens: int) -> None:
    from cupaged import LLM, SamplingParams
    from cupaged.default_model import default_model_path

    path = model or str(default_model_path())
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    texts = PROMPTS[:prompts]
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(path, device=device, kv_cache_dtype=kv, num_kv_blocks=256)
        runs[kv] = [o.outputs[0].token_ids for o in llm.generate(texts, params, use_tqdm=False)]
        if kv == "auto":
            reference = llm
    agree = 0
    for i, (a, b) in enumerate(zip(runs["auto"], runs["fp8"])):
        n = first_divergence(a, b)
        agree += n == len(a)
        gap = ""
        if n < len(a):  # the reference engine's top-2 logit gap where the FP8 engine chose differently
            ids = reference.engine.tokenizer.encode(texts[i])
            out = reference.generate([ids + a[:n]], SamplingParams(temperature=0, max_tokens=1, logprobs=2),
                                     use_tqdm=False)[0].outputs[0]
            top = sorted(out.logprobs[0].top.values(), reverse=True)[:2]
            gap = f", reference top-2 logprob gap there {top[0] - top[1]:.3f}"
        click.echo(f"prompt {i}: {n}/{len(a)} tokens agree{gap}")
    click.echo(f"{agree}/{len(texts)} prompts identical over {tokens} tokens; "
               f"{np.mean([first_divergence(a, b) for a, b in zip(runs['auto'], runs['fp8'])]):.1f} tokens agree "
               "on average before the first divergence")


if __name__ == "__main__":
    main()
