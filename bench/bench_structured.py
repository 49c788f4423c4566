"""Structured outputs' cost: the same requests with and without JSON schemas, in one engine, in one run.

    python -m tools.make_checkpoint --preset qwen3-0.6b --dtype bfloat16 --out /tmp/qwen3-0.6b
    python -m bench.bench_structured --model /tmp/qwen3-0.6b --json structured_qwen3_0.6b.json
    python -m bench.bench_structured --preset qwen3-0.6b --json structured.json    # random weights on the device
    python -m bench.bench_structured --model /tmp/tiny --device cpu --num-requests 8 --scale 16   # a smoke test

The workload is nano-vllm's (bench/workload.py: 256 requests, prompts and outputs of 100-1024 tokens), run twice
in the same engine: first with no constraint, then with half of the requests (every other one) constrained by a
JSON schema. The target: output tok/s of the constrained run >= 0.85 x the unconstrained one's. Prefix caching is
off, or the second run would find its prompts cached by the first.

Fair by construction: a random model ends a constrained request as soon as its grammar is complete, so each schema
here is an array whose minItems is the request's max_tokens (every item takes at least one token): a constrained
request, like an unconstrained one (EOS ignored), writes exactly max_tokens tokens. Output tok/s counts the
tokens written. The schemas cycle through arrays of strings (the mask allows almost every token inside a string),
of bounded integers, and of small objects (keys, enums, numbers: the mask allows few tokens).

Printed last: both runs' output tok/s, the ratio, and the host's time on grammar masks per step (llguidance filling
the constrained rows' bitmasks, `engine.core.timings["masks"]`) and per step that had constrained rows, beside the
step's total; a constrained output that ended before max_tokens must be valid JSON for its schema (counted).
The host's mask time grows with the tokenizer: tools/make_checkpoint.py's real-shape presets have a ~1800-token
tokenizer (the model's vocabulary is still 151936 wide, so the bitmask, its upload and the masking are full size),
while Qwen's own has 151k tokens; read the mask time against the step's GPU time with that in mind.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import click
import jsonschema

from bench.bench_throughput import PHASES, core_timings, ms_per_step, synchronizer
from bench.workload import WORKLOAD_OPTIONS, bench_checkpoint, nano_vllm_workload
from cupaged import LLMEngine, SamplingParams, StructuredOutputsParams
from cupaged.checkpoint import open_checkpoint
from cupaged.options import with_options


def long_schema(kind: int, items: int) -> dict:
    """A JSON schema whose shortest output is `items` array items: kind 0 strings, 1 integers, 2 objects."""
    item = [{"type": "string"},
            {"type": "integer", "minimum": -9999, "maximum": 9999},
            {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                              "tag": {"enum": ["red", "green", "blue"]},
                                              "score": {"type": "number"}},
             "required": ["id", "tag"], "additionalProperties": False}][kind % 3]
    return {"type": "array", "items": item, "minItems": items}


def run_once(engine: LLMEngine, workload: list[tuple[list[int], int]], constrained: bool, label: str) -> dict:
    """Run the workload (every other request constrained when `constrained`); tokens, time and the core's timings."""
    params = {}
    for i, (prompt, n) in enumerate(workload):
        schema = long_schema(i // 2, n) if constrained and i % 2 else None
        params[str(i)] = SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, seed=i,
                                        output_kind="final_only",
                                        structured_outputs=StructuredOutputsParams(json=schema) if schema else None)
        engine.add_request(str(i), prompt, params[str(i)])
    core = engine.core
    before, masked_before = core_timings(engine), getattr(core, "num_masked_steps", 0)
    sync = synchronizer(engine.device)
    generated = {"constrained": 0, "free": 0}
    ended_early = invalid = steps = 0
    sync()
    t0 = time.perf_counter()
    with click.progressbar(length=len(workload), label=label, file=sys.stderr) as bar:
        while engine.has_unfinished_requests():
            outs = engine.step()
            steps += 1
            for out in outs:
                if not out.finished:
                    continue
                bar.update(1)
                completion, p = out.outputs[0], params[out.request_id]
                constraint = p.structured_outputs
                generated["constrained" if constraint else "free"] += len(completion.token_ids)
                if constraint and len(completion.token_ids) < p.max_tokens:
                    ended_early += 1
                    invalid += not _valid(completion.text, constraint.json)
    sync()
    elapsed = time.perf_counter() - t0
    after = core_timings(engine)
    total = sum(generated.values())
    mask_s = (after or {}).get("masks", 0.0) - (before or {}).get("masks", 0.0)
    masked_steps = getattr(core, "num_masked_steps", 0) - masked_before
    return {"run": label, "requests": len(workload), "constrained_requests": len(workload) // 2 if constrained else 0,
            "output_tokens": total, "constrained_output_tokens": generated["constrained"], "time_s": elapsed,
            "output_tokens_per_s": total / elapsed, "steps": steps, "masked_steps": masked_steps,
            "mask_ms_per_step": 1e3 * mask_s / steps, "mask_ms_per_masked_step": 1e3 * mask_s / max(masked_steps, 1),
            "constrained_ended_early": ended_early, "constrained_invalid": invalid,
            "steps_run_ahead": engine.stats.num_steps_run_ahead,
            "ms_per_step": ms_per_step(before, after, steps, elapsed)}


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def table(results: list[dict]) -> list[str]:
    free, constrained = results
    ratio = constrained["output_tokens_per_s"] / free["output_tokens_per_s"]
    lines = []
    for r in results:
        ms = r["ms_per_step"]
        phases = ", ".join(f"{k} {ms[k]:.2f}" for k in PHASES if k in ms)
        lines.append(f"{r['run']}: ms per step over {r['steps']} steps: {phases}; total {ms['total']:.2f}; "
                     f"{r['steps_run_ahead']} steps run ahead so far")
    lines.append(f"{'run':<34} {'requests':>8} {'schema':>6} {'out tok':>8} {'time s':>8} {'out tok/s':>10} "
                 f"{'mask ms/step':>12} {'mask ms/masked step':>19}")
    for r in results:
        lines.append(f"{r['run']:<34} {r['requests']:>8} {r['constrained_requests']:>6} {r['output_tokens']:>8} "
                     f"{r['time_s']:>8.2f} {r['output_tokens_per_s']:>10.1f} {r['mask_ms_per_step']:>12.3f} "
                     f"{r['mask_ms_per_masked_step']:>19.3f}")
    lines.append(f"constrained / unconstrained output tok/s: {ratio:.3f} (target >= 0.85); constrained outputs that "
                 f"ended before max_tokens: {constrained['constrained_ended_early']}, invalid: "
                 f"{constrained['constrained_invalid']}")
    return lines


@click.command()
@with_options(WORKLOAD_OPTIONS)
@click.option("--json", "json_path", default=None)
def main(model: str | None, preset: str | None, num_requests: int, scale: int, device: str | None, dtype: str,
         max_num_seqs: int, quantization: str | None, kv_cache_dtype: str, enforce_eager: bool, sync_scheduling: bool,
         json_path: str | None) -> None:
    """Output tok/s of nano-vllm's workload without and with JSON schemas on half of the requests."""
    if num_requests < 2:
        raise click.UsageError("--num-requests must be at least 2: half of them are constrained")
    # no prefix caching: the second run's prompts are the first's, and would skip their prefills
    options = dict(device=device, dtype=dtype, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
                   async_scheduling=not sync_scheduling, enable_prefix_caching=False, quantization=quantization,
                   kv_cache_dtype=kv_cache_dtype)
    with contextlib.ExitStack() as stack:
        model = bench_checkpoint(stack, model, preset, options)
        workload = nano_vllm_workload(num_requests, scale, vocab=open_checkpoint(model)[0].vocab_size)
        engine = LLMEngine(model, **options)
        # warm up both paths (the structured-output tokenizer is built on the first schema), then the two runs
        run_once(engine, [(p[:32], 8) for p, _ in workload[:2]], True, "warm-up")
        results = [run_once(engine, workload, False, "no constraints"),
                   run_once(engine, workload, True, "half with a JSON schema")]
    for r in results:
        r["model"] = preset or model
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    for line in table(results):
        click.echo(line)


if __name__ == "__main__":
    main()
