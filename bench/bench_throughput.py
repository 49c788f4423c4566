"""End-to-end offline throughput on nano-vllm's workload (bench/workload.py), against the physical floor of the
steps it ran (bench/floor.py), with transformers as the peer.

    python -m bench.bench_throughput --model CKPT [--num-requests 256] [--peers] [--json out.json]
    python -m bench.bench_throughput --preset llama-3-8b [--json out.json]     # a shape without a checkpoint

The issue's two runs on a GPU (nano-vllm's workload, 256 requests):

    python -m tools.make_checkpoint --preset qwen3-0.6b --dtype bfloat16 --out /tmp/qwen3-0.6b
    python -m bench.bench_throughput --model /tmp/qwen3-0.6b --json throughput_qwen3_0.6b.json
    python -m bench.bench_throughput --preset llama-3-8b --json throughput_llama_3_8b.json

Prints output tokens/s, total tokens/s, wall time and peak KV blocks used, and beside output tokens/s the floor's:
on the GPU the read bandwidth and bf16 matmul ceiling are measured first, in the same run (before the engine
loads), the engine core records every step (`engine.core.trace`), and the floor is output tokens over the sum of
the steps' least times; "of floor" is the floor's time over the measured time. On the CPU, or with an engine
that keeps no trace, the floor is n/a. The host's time per step in the engine's phases comes from
`engine.core.timings` (n/a when the engine keeps none).

`--preset NAME` instead of `--model`: a tools/make_checkpoint.py preset written without weights into a temporary
directory and loaded with `load_format="dummy"` (random weights made on the device), as bench_latency does.
With --peers (needs --model: transformers loads real weights), also runs the same requests (or the first
--peer-requests of them) through transformers' `generate` (static batches of 64, left-padded) and transformers'
continuous batching (`paged|sdpa`) in the same run, and prints the ratios.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
import time

import click

import numpy as np

from bench.floor import measure_ceilings, step_floor, workload_floor
from bench.workload import WORKLOAD_OPTIONS, bench_checkpoint, nano_vllm_workload
from cupaged import LLMEngine, SamplingParams
from cupaged import device as devices
from cupaged.checkpoint import open_checkpoint
from cupaged.options import with_options

logger = logging.getLogger(__name__)

# the phases of a step that the engine core times (engine.core.timings, accumulated seconds): scheduling,
# launching (the model's inputs, its kernels or graph replay, the sampling kernel; the GPU runs on
# asynchronously), processing the sampled tokens (appending, detokenizing, stop checks), of which waiting for the
# GPU to deliver them is counted again apart. The rest of a step is outputs and statistics.
PHASES = ("schedule", "launch", "process", "wait_for_tokens")


def core_timings(engine: LLMEngine) -> dict[str, float] | None:
    """A copy of the engine core's accumulated phase times, or None with an engine that keeps none."""
    timings = getattr(getattr(engine, "core", None), "timings", None)
    return dict(timings) if timings is not None else None


def start_trace(engine: LLMEngine) -> bool:
    """Ask the engine core to record every step from now on (engine.core.trace); False if it cannot."""
    core = getattr(engine, "core", None)
    if core is None or not hasattr(core, "trace"):
        logger.warning("the engine has no core.trace: the floor is n/a")
        return False
    core.trace = []
    return True


def stop_trace(engine: LLMEngine) -> list:
    """The steps recorded since start_trace; recording stops."""
    trace, engine.core.trace = engine.core.trace, None
    return trace


def gpu_breakdown(engine: LLMEngine, trace: list, ceilings: dict) -> list[dict]:
    """Where the time goes, by kind of step: GPU time (CUDA events around each step's work) against the floor of
    the same steps, for steps with prefills and for decode steps by batch size. A kind whose GPU time is near its
    floor is bound by the kernels; a run much slower than its GPU time is bound by the host."""
    import cupy

    events = engine.core.trace_events[-len(trace):]
    gpu = np.array([cupy.cuda.get_elapsed_time(a, b) / 1e3 for a, b in events])
    floors = np.array([step_floor(engine.config, q, s, n, engine.dtype.itemsize, ceilings) for q, s, n in trace])
    decode = np.array([bool((q == 1).all()) for q, _, _ in trace])
    batch = np.array([len(q) for q, _, _ in trace])
    kinds = [("with prefills", ~decode), ("decode, batch >= 192", decode & (batch >= 192)),
             ("decode, batch 64-191", decode & (batch >= 64) & (batch < 192)),
             ("decode, batch 8-63", decode & (batch >= 8) & (batch < 64)), ("decode, batch < 8", decode & (batch < 8))]
    rows = [{"kind": name, "steps": int(m.sum()), "gpu_s": float(gpu[m].sum()), "floor_s": float(floors[m].sum())}
            for name, m in kinds if m.any()]
    worst = np.argsort(floors - gpu)[:5]  # the steps that lose the most time against their floor
    rows.append({"kind": "slowest steps (step, tokens, sequences, GPU ms, floor ms)",
                 "steps": [(int(i), int(trace[i][0].sum()), len(trace[i][0]), round(1e3 * gpu[i], 2),
                            round(1e3 * floors[i], 2)) for i in worst]})
    return rows


def ms_per_step(before: dict[str, float] | None, after: dict[str, float] | None, steps: int,
                elapsed: float) -> dict[str, float]:
    """Milliseconds per step in each phase the engine core timed during the run, and in all."""
    phases = {}
    if before is not None and after is not None:
        phases = {k: 1e3 * (after[k] - before.get(k, 0.0)) / steps for k in PHASES if k in after}
    return phases | {"total": 1e3 * elapsed / steps}


def floor_fields(engine: LLMEngine, trace: list | None, ceilings: dict | None, generated: int,
                 elapsed: float) -> dict:
    """The result's floor figures: floor tok/s and the fraction reached (None where n/a), the floor's time, the
    bytes and FLOPs it counts, and the ceilings it used."""
    fields = {"floor_tok_s": None, "fraction_of_floor": None, "floor_s": None, "floor_steps": None,
              "floor_bytes": None, "floor_flops": None, "bytes_bound_steps": None,
              "read_gb_s": None, "matmul_tflops": None} | (ceilings or {})
    if trace is None:
        return fields
    floor = workload_floor(engine.config, trace, ceilings, engine.dtype.itemsize)
    fields.update(floor_s=floor["floor_s"], floor_steps=floor["steps"], floor_bytes=floor["bytes"],
                  floor_flops=floor["flops"], bytes_bound_steps=floor["bytes_bound_steps"])
    if floor["floor_s"]:
        fields.update(floor_tok_s=generated / floor["floor_s"], fraction_of_floor=floor["floor_s"] / elapsed)
    return fields


def run_cupaged(model: str, workload: list[tuple[list[int], int]], engine_options: dict,
                ceilings: dict | None = None) -> dict:
    engine = LLMEngine(model, **engine_options)
    engine.add_request("warmup", workload[0][0][:32], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    for i, (prompt, n) in enumerate(workload):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, seed=i,
                                                          output_kind="final_only"))
    peak, generated, steps = 0, 0, 0
    sync = synchronizer(engine.device)
    tracing = start_trace(engine)
    before = core_timings(engine)
    sync()
    t0 = time.perf_counter()
    with click.progressbar(length=len(workload), label="cupaged", file=sys.stderr) as bar:
        while engine.has_unfinished_requests():
            outs = engine.step()
            steps += 1
            peak = max(peak, engine.stats.kv_blocks_used)
            for out in outs:
                if out.finished:
                    generated += len(out.outputs[0].token_ids)
                    bar.update(1)
    sync()
    elapsed = time.perf_counter() - t0
    after = core_timings(engine)
    trace = stop_trace(engine) if tracing else None
    floor = floor_fields(engine, trace, ceilings, generated, elapsed)
    if trace and ceilings and engine.device == "cuda":
        floor["gpu_breakdown"] = gpu_breakdown(engine, trace, ceilings)
        kinds, worst = floor["gpu_breakdown"][:-1], floor["gpu_breakdown"][-1]
        floor["gpu_busy_s"] = sum(k["gpu_s"] for k in kinds)
        click.echo(f"GPU busy {floor['gpu_busy_s']:.2f} s of {elapsed:.2f} s wall; floor {floor['floor_s']:.2f} s",
                   err=True)
        click.echo(f"  {worst['kind']}: {worst['steps']}", err=True)
        for k in kinds:
            click.echo(f"  {k['kind']:<22} {k['steps']:>5} steps  GPU {k['gpu_s']:6.2f} s  floor {k['floor_s']:6.2f} s"
                       f"  ({k['floor_s'] / max(k['gpu_s'], 1e-9):.2f} of the GPU time)", err=True)
    prompt_tokens = sum(len(p) for p, _ in workload)
    total_blocks, preemptions = engine.stats.kv_blocks_total, engine.stats.num_preemptions
    release = engine.device == "cuda"
    del engine, trace
    gc.collect()
    if release:  # hand the KV cache back before a peer needs the card
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    result = {"engine": "cupaged", "requests": len(workload), "output_tokens": generated, "time_s": elapsed,
              "output_tokens_per_s": generated / elapsed, "total_tokens_per_s": (generated + prompt_tokens) / elapsed,
              **floor, "peak_kv_blocks": peak, "kv_blocks_total": total_blocks, "steps": steps,
              "preemptions": preemptions, "enforce_eager": bool(engine_options.get("enforce_eager")),
              "async_scheduling": engine_options.get("async_scheduling", True),
              "load_format": engine_options.get("load_format", "auto"),
              "quantization": engine_options.get("quantization"),
              "kv_cache_dtype": engine_options.get("kv_cache_dtype", "auto"),
              "max_cached_tokens": total_blocks * engine_options.get("block_size", 16),
              "ms_per_step": ms_per_step(before, after, steps, elapsed)}
    click.echo(f"cupaged: {result}", err=True)
    return result


def synchronizer(device: str):
    """A function that waits for the device's queued work (nothing to wait for on the CPU)."""
    if device == "cuda":
        import cupy

        return cupy.cuda.Device().synchronize
    return lambda: None


def run_transformers_static(model: str, workload: list[tuple[list[int], int]], batch_size: int = 64) -> dict:
    """transformers `generate` in static batches, left-padded; each batch runs to its longest output."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    torch.cuda.synchronize()
    t0, generated = time.perf_counter(), 0
    with click.progressbar(range(0, len(workload), batch_size), label="transformers generate",
                           file=sys.stderr) as starts:
        for start in starts:
            generated += _static_batch(hf, workload[start:start + batch_size])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"engine": "transformers generate (static batches of 64)", "requests": len(workload),
            "output_tokens": generated, "time_s": elapsed, "output_tokens_per_s": generated / elapsed}


def _static_batch(hf, batch: list[tuple[list[int], int]]) -> int:
    """One left-padded batch run to its longest output; returns the tokens its requests asked for."""
    import torch

    width = max(len(p) for p, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (p, _) in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    longest = max(n for _, n in batch)
    with torch.no_grad():
        hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=longest, min_new_tokens=longest,
                    do_sample=True, temperature=0.6, pad_token_id=0)
    return sum(n for _, n in batch)  # tokens the requests asked for; padding steps are not counted


def run_transformers_continuous(model: str, workload: list[tuple[list[int], int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16,
                                              attn_implementation="paged|sdpa").cuda().eval()
    config = GenerationConfig(max_new_tokens=max(n for _, n in workload), do_sample=True, temperature=0.6,
                              eos_token_id=-1, pad_token_id=0)
    manager = hf.init_continuous_batching(generation_config=config)
    manager.start()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(workload):
        manager.add_request(prompt, request_id=str(i), max_new_tokens=n)
    generated = 0
    with click.progressbar(length=len(workload), label="transformers continuous", file=sys.stderr) as bar:
        for _ in range(len(workload)):
            result = manager.get_result(timeout=600)
            generated += len(result.generated_tokens)
            bar.update(1)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    manager.stop(block=True)
    return {"engine": "transformers continuous batching (paged|sdpa)", "requests": len(workload),
            "output_tokens": generated, "time_s": elapsed, "output_tokens_per_s": generated / elapsed}


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report_lines(results: list[dict]) -> list[str]:
    """The ceilings, and each cupaged run's floor and phases, printed above the table."""
    first = results[0]
    if first["read_gb_s"] is None:
        lines = ["ceilings n/a (not on a GPU): floor n/a"]
    else:
        lines = [f"ceilings (measured in this run): read {first['read_gb_s']:.0f} GB/s (copy kernel, bytes read + "
                 f"written), bf16 matmul {first['matmul_tflops']:.0f} TFLOP/s (8192^3 GEMM, cuBLAS)"]
    for r in results:
        if not r["engine"].startswith("cupaged"):
            continue
        if r["floor_steps"] is None:
            lines.append(f"{r['engine']}: floor n/a (the engine keeps no engine.core.trace)")
        else:
            lines.append(f"{r['engine']}: floor over {r['floor_steps']} steps: {r['floor_bytes'] / 1e9:.1f} GB read, "
                         f"{r['floor_flops'] / 1e12:.1f} TFLOP, {_fmt(r['bytes_bound_steps'], 'd')} steps "
                         f"bytes-bound, {_fmt(r['floor_s'], '.2f')} s")
        ms = r["ms_per_step"]
        phases = ", ".join(f"{k} {ms[k]:.2f}" for k in PHASES if k in ms) or "phases n/a (no engine.core.timings)"
        lines.append(f"{r['engine']}: ms per step over {r['steps']} steps: {phases}; total {ms['total']:.2f}")
        lines.append(f"{r['engine']}: KV cache ({r['kv_cache_dtype']}) holds {r['max_cached_tokens']:,} tokens "
                     f"({r['kv_blocks_total']:,} blocks); weights {r['quantization'] or 'as the checkpoint'}")
        if r["quantization"] or r["kv_cache_dtype"] != "auto":  # bench/floor.py counts the model dtype's bytes
            lines.append(f"{r['engine']}: the floor above is the model dtype's: FP8 weights or K/V read fewer bytes")
    return lines


def table(results: list[dict], peers: bool) -> list[str]:
    """The short table printed last: one row per engine, the floor's columns for cupaged's rows."""
    base = results[-3]["output_tokens_per_s"] if peers else None
    lines = [f"{'engine':<48} {'requests':>8} {'out tok':>8} {'time s':>8} {'out tok/s':>10} {'floor tok/s':>11} "
             f"{'of floor':>8} {'ratio':>7}"]
    for r in results:
        ratio = f"{base / r['output_tokens_per_s']:.1f}x" if base and r["engine"].startswith("transformers") else ""
        lines.append(f"{r['engine']:<48} {r['requests']:>8} {r['output_tokens']:>8} {r['time_s']:>8.2f} "
                     f"{r['output_tokens_per_s']:>10.1f} {_fmt(r.get('floor_tok_s'), '.1f'):>11} "
                     f"{_fmt(r.get('fraction_of_floor'), '.2f'):>8} {ratio:>7}")
    return lines


@click.command()
@with_options(WORKLOAD_OPTIONS)
@click.option("--max-num-batched-tokens", default=None, type=int)
@click.option("--peers", is_flag=True, help="Also run transformers on the GPU (needs torch, transformers, --model).")
@click.option("--peer-requests", default=None, type=int, help="Run the peers on the first N requests only.")
@click.option("--json", "json_path", default=None)
def main(model: str | None, preset: str | None, num_requests: int, scale: int, device: str | None, dtype: str,
         max_num_seqs: int, max_num_batched_tokens: int | None, quantization: str | None, kv_cache_dtype: str,
         enforce_eager: bool, sync_scheduling: bool, peers: bool, peer_requests: int | None,
         json_path: str | None) -> None:
    """Offline throughput of cupaged on nano-vllm's workload, beside the physical floor of the steps it ran."""
    if peers and preset:
        raise click.UsageError("--peers needs --model: transformers loads a checkpoint's weights, and a --preset "
                               "has none (cupaged makes random ones on the device)")
    options = dict(device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager,
                   async_scheduling=not sync_scheduling, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    # the ceilings first, on an idle card: before any engine holds its memory
    ceilings = measure_ceilings() if devices.set_device(device) == "cuda" else None
    with contextlib.ExitStack() as stack:
        model = bench_checkpoint(stack, model, preset, options)
        vocab = open_checkpoint(model)[0].vocab_size
        workload = nano_vllm_workload(num_requests, scale, vocab=vocab)
        results = [{"model": preset or model} | run_cupaged(model, workload, options, ceilings)]
        if peers:
            subset = workload[:peer_requests or len(workload)]
            if len(subset) < len(workload):  # compare like with like: cupaged on the same subset too
                results.append({**run_cupaged(model, subset, options, ceilings),
                                "engine": f"cupaged ({len(subset)} requests)"})
            results.append(run_transformers_static(model, subset))
            results.append(run_transformers_continuous(model, subset))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    for line in report_lines(results) + table(results, peers):
        click.echo(line)


if __name__ == "__main__":
    main()
