"""The physical floor of an end-to-end run: no step can take less than the time to read what it must read, nor
less than the time to do its FLOPs, at ceilings measured on the same device in the same run.

    ceilings = measure_ceilings()                       # GPU: before the engine loads
    engine.core.trace = []                              # the engine core appends one tuple per step
    ... run the workload ...
    floor = workload_floor(engine.config, engine.core.trace, ceilings, engine.dtype.itemsize)
    floor_tok_s = output_tokens / floor["floor_s"];  fraction_of_floor = floor["floor_s"] / elapsed

A step is `(query_lens, seq_lens, num_sampled)`: the new tokens of each sequence in the step, each sequence's
context length after the step (cached + new, as `AttentionMetadata.seq_lens`), and how many rows were sampled
(the LM head runs on those rows only; a prefill chunk that does not end its prompt samples none).

For one step, time >= max(bytes / read bandwidth, FLOPs / matmul ceiling), with
- bytes: every weight tensor once (matrices, norms and biases; the LM head once; the embedding table only when
  it is tied, i.e. read as the LM head: otherwise only the gathered rows are read, which we neglect), plus for
  each sequence the K/V it reads (seq_len tokens) and the K/V it writes (query_len tokens), 2 x layers x kv_heads
  x head_dim x itemsize bytes per token. Activations are not counted.
- FLOPs: 2 x (parameters of the layers' matrices) x new tokens, 2 x hidden x vocab x sampled rows (LM head), and
  attention: per layer and sequence 4 x num_heads x head_dim x (keys seen summed over its query tokens; causal,
  query j of q sees s - q + j + 1 keys, so q (s - q) + q (q + 1) / 2 in all).

It is the floor of the steps the engine chose to run: more, smaller steps (each reads the weights again) or
recomputation after a preemption raise it; the schedule itself is not judged here.

Read bandwidth: the rate of a device-to-device copy kernel (bench_decode_attention.copy_bandwidth), counting the
bytes read + written. A step streams bytes through the SMs, and a copy's achieved rate over all the bytes it
moves is the fair figure for a kernel that streams bytes; a pure read stream can run ~10% faster on an H200
(RESULTS.md: decode attention reads at 4.4-4.6 TB/s where a copy kernel runs at ~3.9-4.2), so a fraction of the
floor a little above 1 is possible in bandwidth-bound runs. Matmul ceiling: an 8192^3 bf16 GEMM through the
engine's own cuBLAS handle (layers/cublas.py), i.e. what the engine's GEMMs can reach at best.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from cupaged.config import ModelConfig
from cupaged.models.llama import expected_weights

logger = logging.getLogger(__name__)

GEMM_SIZE = 8192

# (query_lens int32 [B], seq_lens int32 [B], rows sampled): one engine step
Step = tuple[np.ndarray, np.ndarray, int]


def measure_ceilings(repeats: int = 10) -> dict:
    """Read bandwidth (GB/s) and bf16 matmul ceiling (TFLOP/s) of the current GPU. Call it before the engine
    loads: it frees CuPy's pool afterwards, so the engine's memory profiling sees the card as it was."""
    import cupy

    from bench.bench_decode_attention import copy_bandwidth

    copy = copy_bandwidth(repeats)
    # the faster of the copy kernel and cudaMemcpyAsync (the kernel on an H200): the stricter floor
    ceilings = {"read_gb_s": copy["copy_gb_s"], "matmul_tflops": matmul_tflops(repeats)}
    cupy.get_default_memory_pool().free_all_blocks()
    logger.info("ceilings: read %.0f GB/s (copy, read + written), bf16 matmul %.0f TFLOP/s",
                ceilings["read_gb_s"], ceilings["matmul_tflops"])
    return ceilings


def matmul_tflops(repeats: int = 10, n: int = GEMM_SIZE) -> float:
    """TFLOP/s of an n x n x n bf16 GEMM (fp32 accumulation) through cupaged's cuBLAS handle: median of
    `repeats` CUDA-event timings after warm-up. Random normal inputs (zeros would flatter the clocks)."""
    import cupy

    from cupaged.device import resolve_dtype
    from cupaged.layers import cublas

    bf16 = resolve_dtype("bfloat16")
    rng = cupy.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=cupy.float32).astype(bf16)
    b = rng.standard_normal((n, n), dtype=cupy.float32).astype(bf16)
    out = cupy.empty((n, n), dtype=bf16)
    blas = cublas.handle()
    for _ in range(3):  # cuBLAS picks its kernel, clocks ramp up
        blas.matmul(a, b, out)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        # a GEMM in flight before `start`: the timed one is queued while it runs, so no launch gap is timed
        blas.matmul(a, b, out)
        start.record()
        blas.matmul(a, b, out)
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    ms = float(np.median(times))
    del a, b, out
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def model_terms(config: ModelConfig, itemsize: int) -> dict:
    """The per-model constants of the floor: weight bytes one step reads, parameters of the layers' matrices,
    K/V bytes per token (all layers, K and V), attention FLOPs per key seen, LM-head FLOPs per sampled row."""
    shapes = expected_weights(config)
    weights = sum(math.prod(s) for s in shapes.values())
    if not config.tie_word_embeddings:  # only gathered from; the LM head is its own tensor, counted above
        weights -= math.prod(shapes["model.embed_tokens.weight"])
    matrices = sum(math.prod(s) for name, s in shapes.items() if name.startswith("model.layers.") and len(s) == 2)
    c = config
    return {"weight_bytes": weights * itemsize,
            "layer_matrix_params": matrices,
            "kv_bytes_per_token": 2 * c.num_layers * c.num_kv_heads * c.head_dim * itemsize,
            "attention_flops_per_key": 4 * c.num_layers * c.num_heads * c.head_dim,
            "lm_head_flops_per_row": 2 * c.hidden_size * c.vocab_size}


def step_floor(config: ModelConfig, query_lens: np.ndarray, seq_lens: np.ndarray, num_sampled: int,
               itemsize: int, ceilings: dict) -> float:
    """Seconds one step takes at least (see the module docstring)."""
    return workload_floor(config, [(query_lens, seq_lens, num_sampled)], ceilings, itemsize)["floor_s"]


def workload_floor(config: ModelConfig, trace: Sequence[Step], ceilings: dict | None, itemsize: int) -> dict:
    """The floor of a whole run: {"floor_s", "steps", "bytes", "flops", "bytes_bound_steps"} summed over the
    trace's steps. Without ceilings (the CPU) the bytes and FLOPs are still counted and floor_s is None.

    Vectorised over every sequence of every step at once (a run has thousands of steps): per-sequence terms are
    summed into their step with bincount, and the max of the two times is taken per step."""
    terms = model_terms(config, itemsize)
    steps = len(trace)
    if steps == 0:
        return {"floor_s": 0.0 if ceilings else None, "steps": 0, "bytes": 0, "flops": 0, "bytes_bound_steps": 0}
    counts = np.array([len(q) for q, _, _ in trace], dtype=np.int64)
    if (counts != np.array([len(s) for _, s, _ in trace])).any():
        raise ValueError("every step needs as many query_lens as seq_lens")
    q = np.concatenate([np.asarray(q, dtype=np.int64) for q, _, _ in trace])
    s = np.concatenate([np.asarray(s, dtype=np.int64) for _, s, _ in trace])
    if (q < 1).any() or (s < q).any():
        raise ValueError("every sequence needs 1 <= query_len <= seq_len")
    sampled = np.array([n for _, _, n in trace], dtype=np.float64)
    step_of = np.repeat(np.arange(steps), counts)
    keys_seen = q * (s - q) + q * (q + 1) // 2
    ran = counts > 0  # a step without sequences ran no forward
    nbytes = (ran * float(terms["weight_bytes"])
              + terms["kv_bytes_per_token"] * np.bincount(step_of, weights=s + q, minlength=steps))
    flops = (2.0 * terms["layer_matrix_params"] * np.bincount(step_of, weights=q, minlength=steps)
             + terms["lm_head_flops_per_row"] * sampled
             + terms["attention_flops_per_key"] * np.bincount(step_of, weights=keys_seen, minlength=steps))
    out = {"floor_s": None, "steps": steps, "bytes": float(nbytes.sum()), "flops": float(flops.sum()),
           "bytes_bound_steps": None}
    if ceilings:
        read_s = nbytes / (ceilings["read_gb_s"] * 1e9)
        math_s = flops / (ceilings["matmul_tflops"] * 1e12)
        out["floor_s"] = float(np.maximum(read_s, math_s).sum())
        out["bytes_bound_steps"] = int(((read_s >= math_s) & ran).sum())
    return out
