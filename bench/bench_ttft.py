"""Time to first token of one long prompt, with the flash prefill kernel and with the reference prefill math.

    python -m bench.bench_ttft --model /tmp/qwen3-0.6b --prompt-len 4096

Each mode: a fresh engine, one warm-up request, then the median of --repeat requests of `--prompt-len` random
tokens generating one token each (wall time from add_request to the first output).
"""

from __future__ import annotations

import json
import time

import click
import numpy as np

from cupaged import LLMEngine, SamplingParams


def ttft_ms(engine: LLMEngine, prompt: list[int]) -> float:
    import cupy

    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    engine.add_request(f"r{t0}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return (time.perf_counter() - t0) * 1000


@click.command()
@click.option("--model", required=True)
@click.option("--prompt-len", default=4096, show_default=True)
@click.option("--repeat", default=5, show_default=True)
@click.option("--json", "json_path", default=None)
def main(model: str, prompt_len: int, repeat: int, json_path: str | None) -> None:
    from cupaged.layers import cuda_ops

    results = {}
    for flash in (False, True):
        cuda_ops.FLASH_PREFILL = flash
        engine = LLMEngine(model, device="cuda", max_model_len=prompt_len + 16, enable_prefix_caching=False)
        vocab = engine.config.vocab_size
        rng = np.random.default_rng(0)
        ttft_ms(engine, rng.integers(0, vocab, prompt_len).tolist())  # warm-up: kernels compiled, pool filled
        times = [ttft_ms(engine, rng.integers(0, vocab, prompt_len).tolist()) for _ in range(repeat)]
        results["flash" if flash else "reference"] = float(np.median(times))
        del engine
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"prompt_len": prompt_len, "ttft_ms": results}, f, indent=2)
    click.echo(f"TTFT for a {prompt_len}-token prompt: reference prefill {results['reference']:.1f} ms, "
               f"flash prefill {results['flash']:.1f} ms ({results['reference'] / results['flash']:.1f}x)")


if __name__ == "__main__":
    main()
