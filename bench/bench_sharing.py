"""KV memory saved by sharing blocks, as the PagedAttention paper measures it (its section 6.3).

- Parallel sampling (n = 2, 4, 6) and beam search (width 2, 4, 6) on requests of mixed prompt lengths:
  blocks held with sharing (physical blocks in use) against without (each sequence's own block table),
  averaged over the engine's steps. The paper reports 6-10% saved for parallel sampling and 38-55% for
  beam search on Alpaca-like prompts.
- Prefix caching on requests that share a system prompt: prefill tokens computed with and without it.

    python -m bench.bench_sharing --json sharing.json
"""

from __future__ import annotations

import json
import sys
import tempfile

import click
import numpy as np

from cupaged import LLMEngine, SamplingParams


def blocks_saved(model: str, device: str, prompts: list[list[int]], params: SamplingParams) -> float:
    """Mean over steps of 1 - shared blocks / unshared blocks."""
    engine = LLMEngine(model, device=device, enable_prefix_caching=False, max_num_seqs=256)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    used = unshared = 0
    while engine.has_unfinished_requests():
        engine.step()
        used += engine.stats.kv_blocks_used
        unshared += engine.stats.kv_blocks_unshared
    return 1 - used / unshared


@click.command()
@click.option("--model", default=None, help="Checkpoint (default: a random qwen3-tiny made by tools/).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--num-requests", default=16, show_default=True)
@click.option("--output-len", default=64, show_default=True, help="Tokens generated per sequence.")
@click.option("--json", "json_path", default=None)
def main(model: str | None, device: str, num_requests: int, output_len: int, json_path: str | None) -> None:
    if model is None:
        from tools.make_checkpoint import make_checkpoint

        model = str(make_checkpoint(tempfile.mkdtemp(), "qwen3-tiny", max_position_embeddings=4096))
    rng = np.random.default_rng(0)
    # Alpaca-like: short instructions, 20 to 120 tokens
    prompts = [rng.integers(0, 1000, int(rng.integers(20, 120))).tolist() for _ in range(num_requests)]
    rows = []
    cases = [("parallel sampling", f"n={n}", SamplingParams(n=n, temperature=1.0, max_tokens=output_len,
                                                           ignore_eos=True)) for n in (2, 4, 6)]
    cases += [("beam search", f"width={w}", SamplingParams(beam_width=w, max_tokens=output_len, ignore_eos=True))
              for w in (2, 4, 6)]
    with click.progressbar(cases, label="sharing", file=sys.stderr) as bar:
        for kind, setting, params in bar:
            rows.append({"kind": kind, "setting": setting, "kv_saved": blocks_saved(model, device, prompts, params)})
    system = rng.integers(0, 1000, 400).tolist()
    shared = [system + rng.integers(0, 1000, int(rng.integers(10, 60))).tolist() for _ in range(num_requests)]
    computed = {}
    for caching in (False, True):
        engine = LLMEngine(model, device=device, enable_prefix_caching=caching, max_num_seqs=4)
        for i, prompt in enumerate(shared):
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        computed[caching] = engine.stats.num_computed_tokens
    prefix = {"prompt_tokens": sum(map(len, shared)), "computed_without_cache": computed[False],
              "computed_with_cache": computed[True], "saved": 1 - computed[True] / computed[False]}
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"sharing": rows, "prefix_caching": prefix}, f, indent=2)
    click.echo(f"{'case':<20} {'setting':<9} {'KV blocks saved':>15}")
    for r in rows:
        click.echo(f"{r['kind']:<20} {r['setting']:<9} {r['kv_saved']:>15.1%}")
    click.echo(f"prefix caching, {num_requests} requests sharing a 400-token system prompt: prefill tokens "
               f"{prefix['computed_without_cache']} -> {prefix['computed_with_cache']} ({prefix['saved']:.1%} saved)")


if __name__ == "__main__":
    main()
