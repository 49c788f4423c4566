"""Decode steps replayed from CUDA graphs against the same steps run op by op (`enforce_eager`)."""

from __future__ import annotations

import numpy as np
import pytest

from cupaged import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def release_gpu_memory():
    yield
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()


def generate(path: str, requests: list, **options) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, **{"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 512, "max_num_seqs": 48, **options})
    outs = llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def test_graphs_give_the_same_tokens_as_eager(checkpoints) -> None:
    """64 mixed requests, bf16: greedy ones, and seeded samples (the sampling kernel is batch-invariant)."""
    path = str(checkpoints("qwen3-tiny", "bfloat16"))
    rng = np.random.default_rng(21)
    requests = []
    for i in range(64):
        prompt = rng.integers(0, 1000, int(rng.integers(2, 300))).tolist()
        greedy = i % 4 != 3
        requests.append((prompt, SamplingParams(temperature=0 if greedy else 0.8, seed=None if greedy else i,
                                                max_tokens=int(rng.integers(1, 80)), ignore_eos=True)))
    graphs, llm = generate(path, requests)
    eager, eager_llm = generate(path, requests, enforce_eager=True)
    assert eager_llm.engine.runner.graphs is None
    replays = llm.engine.runner.graphs.replays
    assert len(replays) > 5, f"too few batch sizes replayed: {replays}"  # several padded sizes were exercised
    assert graphs == eager


def test_graphs_after_preemption_and_prefix_hits(checkpoints) -> None:
    """A cache too small for the batch: preempted requests come back and the graphs still match eager."""
    path = str(checkpoints("qwen3-tiny", "bfloat16"))
    rng = np.random.default_rng(4)
    system = rng.integers(0, 1000, 40).tolist()
    requests = [(system + rng.integers(0, 1000, int(rng.integers(1, 60))).tolist(),
                 SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)) for _ in range(24)]
    graphs, llm = generate(path, requests, num_kv_blocks=40)
    eager, _ = generate(path, requests, num_kv_blocks=40, enforce_eager=True)
    assert llm.engine.stats.num_preemptions > 0
    assert graphs == eager
