"""End-to-end offline throughput on nano-vllm's workload (bench/workload.py), with transformers as the peer.

    python -m bench.bench_throughput --model CKPT [--num-requests 256] [--peers] [--json out.json]

Prints output tokens/s, total tokens/s, wall time and peak KV blocks used; with --peers, also runs the same
requests (or the first --peer-requests of them) through transformers' `generate` (static batches of 64,
left-padded) and transformers' continuous batching (`paged|sdpa`) in the same run, and prints the ratios.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from collections.abc import Iterator

import click

from bench.workload import nano_vllm_workload
from cupaged import LLMEngine, SamplingParams
from cupaged.checkpoint import open_checkpoint
from cupaged.device import HostCopy


@contextlib.contextmanager
def time_phases(engine: LLMEngine) -> Iterator[dict[str, float]]:
    """Wrap the parts of a step to add up their wall time (seconds) in the returned dict: scheduling, launching
    (the model's inputs, its kernels or graph replay, the sampling kernel; the GPU runs on asynchronously),
    processing the sampled tokens (appending, detokenizing, stop checks), of which waiting for the GPU to deliver
    them is counted again apart. The rest of a step is outputs and statistics."""
    totals = {"schedule": 0.0, "launch": 0.0, "process": 0.0, "wait_for_tokens": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - t0
        return wrapper

    engine.scheduler.schedule = timed(engine.scheduler.schedule, "schedule")
    engine._launch = timed(engine._launch, "launch")
    engine._process = timed(engine._process, "process")
    result = HostCopy.result
    HostCopy.result = timed(result, "wait_for_tokens")
    try:
        yield totals
    finally:
        HostCopy.result = result


def run_cupaged(model: str, workload: list[tuple[list[int], int]], engine_options: dict) -> dict:
    engine = LLMEngine(model, **engine_options)
    engine.add_request("warmup", workload[0][0][:32], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    for i, (prompt, n) in enumerate(workload):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, seed=i,
                                                          output_kind="final_only"))
    peak, generated, steps, preemptions = 0, 0, 0, 0
    sync = _synchronize(engine.device)
    sync()
    t0 = time.perf_counter()
    with click.progressbar(length=len(workload), label="cupaged", file=sys.stderr) as bar, \
            time_phases(engine) as phases:
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
    prompt_tokens = sum(len(p) for p, _ in workload)
    total_blocks, preemptions = engine.stats.kv_blocks_total, engine.stats.num_preemptions
    release = engine.device == "cuda"
    del engine
    gc.collect()  # the phase timers made reference cycles through the engine's parts
    if release:  # hand the KV cache back before a peer needs the card
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    result = {"engine": "cupaged", "requests": len(workload), "output_tokens": generated, "time_s": elapsed,
              "output_tokens_per_s": generated / elapsed, "total_tokens_per_s": (generated + prompt_tokens) / elapsed,
              "peak_kv_blocks": peak, "kv_blocks_total": total_blocks, "steps": steps,
              "preemptions": preemptions, "enforce_eager": bool(engine_options.get("enforce_eager")),
              "async_scheduling": engine_options.get("async_scheduling", True),
              "ms_per_step": {k: 1e3 * v / steps for k, v in phases.items()} | {"total": 1e3 * elapsed / steps}}
    click.echo(f"cupaged: {result}", err=True)
    return result


def _synchronize(device: str):
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


@click.command()
@click.option("--model", required=True, help="Checkpoint directory (tools/make_checkpoint.py --preset qwen3-0.6b).")
@click.option("--num-requests", default=256, show_default=True)
@click.option("--scale", default=1, show_default=True, help="Divide the workload's lengths (for the CPU).")
@click.option("--device", default=None, help="cpu or cuda (default: automatic).")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--max-num-seqs", default=256, show_default=True)
@click.option("--max-num-batched-tokens", default=None, type=int)
@click.option("--enforce-eager", is_flag=True, help="No CUDA graphs.")
@click.option("--sync-scheduling", is_flag=True, help="No async scheduling: read each step's tokens before the next.")
@click.option("--peers", is_flag=True, help="Also run transformers on the GPU (needs torch and transformers).")
@click.option("--peer-requests", default=None, type=int, help="Run the peers on the first N requests only.")
@click.option("--json", "json_path", default=None)
def main(model: str, num_requests: int, scale: int, device: str | None, dtype: str, max_num_seqs: int,
         max_num_batched_tokens: int | None, enforce_eager: bool, sync_scheduling: bool, peers: bool,
         peer_requests: int | None, json_path: str | None) -> None:
    vocab = open_checkpoint(model)[0].vocab_size
    workload = nano_vllm_workload(num_requests, scale, vocab=vocab)
    options = dict(device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager,
                   async_scheduling=not sync_scheduling)
    results = [run_cupaged(model, workload, options)]
    if peers:
        subset = workload[:peer_requests or len(workload)]
        if len(subset) < len(workload):  # compare like with like: cupaged on the same subset too
            results.append({**run_cupaged(model, subset, options), "engine": f"cupaged ({len(subset)} requests)"})
        results.append(run_transformers_static(model, subset))
        results.append(run_transformers_continuous(model, subset))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    base = results[-3 if peers else 0]["output_tokens_per_s"] if peers else None
    click.echo(f"{'engine':<48} {'requests':>8} {'out tok':>8} {'time s':>8} {'out tok/s':>10} {'ratio':>7}")
    for r in results:
        ratio = f"{base / r['output_tokens_per_s']:.1f}x" if base and r["engine"].startswith("transformers") else ""
        click.echo(f"{r['engine']:<48} {r['requests']:>8} {r['output_tokens']:>8} {r['time_s']:>8.2f} "
                   f"{r['output_tokens_per_s']:>10.1f} {ratio:>7}")


if __name__ == "__main__":
    main()
