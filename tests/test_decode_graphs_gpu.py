"""Decode steps replayed from CUDA graphs against the same steps run op by op (`enforce_eager`)."""

from __future__ import annotations

import numpy as np
import pytest

from cupaged import LLM, SamplingParams
from helpers import preempted_requests

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
    assert eager_llm.engine.core.runner.graphs is None
    replays = llm.engine.core.runner.graphs.replays
    assert len(replays) > 5, f"too few batch sizes replayed: {replays}"  # several padded sizes were exercised
    assert llm.engine.core.runner.pieces.replays > 0 and eager_llm.engine.core.runner.pieces.replays == 0
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


def test_async_scheduling_gives_the_same_tokens(checkpoints) -> None:
    """Steps launched before the previous step's tokens reach the host take those tokens from the device: the same
    tokens as the synchronous engine, with stop tokens found a step late, the top-k path and preemption. The two
    engines do not always preempt the same requests (helpers.preempted_requests says why those may differ in bf16):
    the requests neither preempted are compared."""
    path = str(checkpoints("qwen3-tiny", "bfloat16"))
    rng = np.random.default_rng(8)
    stops = list(range(0, 1000, 9))
    requests = []
    for i in range(64):
        prompt = rng.integers(0, 1000, int(rng.integers(2, 200))).tolist()
        requests.append((prompt, SamplingParams(temperature=[0, 0.8, 1.0][i % 3], top_k=50 if i % 3 == 2 else 0,
                                                seed=i, max_tokens=int(rng.integers(1, 80)), stop_token_ids=stops)))
    with preempted_requests() as preempted:
        ahead, llm = generate(path, requests, num_kv_blocks=120)
        sync, sync_llm = generate(path, requests, num_kv_blocks=120, async_scheduling=False)
    assert llm.engine.stats.num_steps_run_ahead > 20 and sync_llm.engine.stats.num_steps_run_ahead == 0
    assert llm.engine.stats.num_preemptions > 0
    assert sum(len(t) < r[1].max_tokens for t, r in zip(sync, requests)) > 5  # stopped early
    compared = [i for i in range(len(requests)) if f"offline-{i}" not in preempted]  # LLM's ids, one per prompt
    assert len(compared) >= 48
    assert [ahead[i] for i in compared] == [sync[i] for i in compared]
    # and without preemption, every request
    ahead, _ = generate(path, requests)
    sync, _ = generate(path, requests, async_scheduling=False)
    assert ahead == sync


def test_replays_leave_the_other_graphs_plans_intact(checkpoints) -> None:
    """The graphs captured after the largest one are given its freed intermediates' memory, which its replays
    still write: what a graph keeps between replays (the partition its decode plan reads) must not be there."""
    from types import SimpleNamespace

    llm = LLM(str(checkpoints("qwen3-tiny", "bfloat16")), device="cuda", dtype="bfloat16", num_kv_blocks=64,
              max_num_seqs=48)
    runner = llm.engine.core.runner
    graphs = runner.graphs.graphs
    assert len(graphs) > 5
    for size in sorted(graphs, reverse=True):
        seqs = [SimpleNamespace(num_computed_tokens=20, token_ids=[3] * 21, block_table=[1, 2]) for _ in range(size)]
        _, max_seq_len = runner.decode_inputs.fill(seqs, size)
        runner.graphs.replay(size, max_seq_len)
        found = {s: int(plan.partition_buf.get()[0]) for s, (_, plan) in graphs.items()}
        assert found == {s: plan.partition for s, (_, plan) in graphs.items()}, f"after the replay of {size}"
