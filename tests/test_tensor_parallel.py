"""Tensor parallelism on the CPU (cupaged/parallel/): ranks as threads give tp = 1's logits and tokens.

Every tiny architecture at tp = 2 and 4 (GQA with fewer key/value heads than ranks included: llama3-tiny has one,
the others two) against tp = 1 through the paged cache (prefill, mixed and decode steps), float32, relative
error < 1e-5; the engine's greedy tokens with prefix caching and preemption; the communicator; every refusal.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from cupaged import LLMEngine, SamplingParams
from cupaged.checkpoint import open_checkpoint
from cupaged.layers import reference
from cupaged.models.llama import LlamaModel, expected_weights
from cupaged.parallel.comm import RankFailed, ThreadGroup
from cupaged.parallel.sharding import RankShard, TensorParallelError, check_tp, padded_vocab_size
from helpers import TINY_PRESETS, relative_error, run_to_end, teacher_forced_logits


def load(checkpoints, preset: str):
    config, _, read = open_checkpoint(checkpoints(preset))
    return config, read(expected_weights(config), "float32")


def sharded_models(config, tensors, tp: int) -> tuple[ThreadGroup, list[LlamaModel]]:
    group = ThreadGroup(tp)
    shards = [RankShard.of(config, comm) for comm in group.communicators]
    return group, [LlamaModel(s.config, s.shard_tensors(tensors, config), reference, np, shard=s) for s in shards]


def sequences(config) -> tuple[list[np.ndarray], list[int]]:
    """Three sequences whose prompts are prefilled (one in a mixed step) and whose rest is decoded."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in (21, 9, 35)], [13, 9, 20]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_sharded_logits_equal_tp1(checkpoints, preset: str, tp: int) -> None:
    config, tensors = load(checkpoints, preset)
    seqs, prompt_lens = sequences(config)
    expected = teacher_forced_logits(LlamaModel(config, tensors, reference, np), seqs, prompt_lens)
    group, models = sharded_models(config, tensors, tp)
    per_rank = group.run(lambda rank: teacher_forced_logits(models[rank], seqs, prompt_lens))
    for s, (got, want) in enumerate(zip(per_rank[0], expected)):
        assert got.shape == want.shape == (len(seqs[s]), config.vocab_size)
        assert relative_error(got, want) < 1e-5, f"{preset} tp={tp} sequence {s}"
    # the ranks sum in one order, so they agree to the bit (they must: each would sample on its own on the GPU)
    for rank in range(1, tp):
        assert all(np.array_equal(a, b) for a, b in zip(per_rank[rank], per_rank[0])), f"rank {rank}"


def test_a_rank_with_the_wrong_kv_head_is_caught(checkpoints) -> None:
    """The comparison above has teeth: rank 1 of 4 given rank 2's key/value head (llama-tiny: 2 heads, each on two
    ranks) changes the logits far beyond the tolerance."""
    config, tensors = load(checkpoints, "llama-tiny")
    seqs, prompt_lens = sequences(config)
    expected = teacher_forced_logits(LlamaModel(config, tensors, reference, np), seqs, prompt_lens)
    group, models = sharded_models(config, tensors, 4)
    kv = slice(config.num_heads // 4 * config.head_dim, None)  # a rank's fused q|k|v: past its one q head, k and v
    for wrong, right in zip(models[1].layers, models[2].layers):
        wrong.w_qkv.weight[kv] = right.w_qkv.weight[kv]  # [out, in]: output rows
    got = group.run(lambda rank: teacher_forced_logits(models[rank], seqs, prompt_lens))[0]
    assert max(relative_error(g, e) for g, e in zip(got, expected)) > 1e-3


def test_kv_heads_are_split_or_replicated_with_their_query_heads(checkpoints) -> None:
    config, tensors = load(checkpoints, "llama-tiny")  # 4 query heads, 2 key/value heads, head_dim 64
    d, k_name = config.head_dim, "model.layers.0.self_attn.k_proj.weight"
    for tp, kv_head_of_rank in [(2, [0, 1]), (4, [0, 0, 1, 1])]:
        for comm in ThreadGroup(tp).communicators:
            shard = RankShard.of(config, comm)
            assert (shard.config.num_heads, shard.config.num_kv_heads) == (4 // tp, 1)
            head = kv_head_of_rank[comm.rank]
            np.testing.assert_array_equal(shard.shard_tensors(tensors, config)[k_name],
                                          tensors[k_name][head * d:(head + 1) * d])


def test_vocabulary_is_padded_to_a_multiple_of_tp(checkpoints) -> None:
    config, tensors = load(checkpoints, "llama-tiny")  # vocabulary 1031, a prime
    assert padded_vocab_size(1031, 4) == 1032 and padded_vocab_size(1024, 4) == 1024
    comms = ThreadGroup(4).communicators
    last = RankShard.of(config, comms[3])
    embed = last.shard_tensors(tensors, config)["model.embed_tokens.weight"]
    assert last.vocab_start == 3 * 258 and embed.shape == (258, config.hidden_size)
    np.testing.assert_array_equal(embed[:-1], tensors["model.embed_tokens.weight"][774:])
    assert not embed[-1].any()


def test_a_tensor_without_a_split_is_refused(checkpoints) -> None:
    config, tensors = load(checkpoints, "qwen3-tiny")
    shard = RankShard.of(config, ThreadGroup(2).communicators[0])
    with pytest.raises(TensorParallelError, match="model.layers.0.mlp.gate_proj.scales"):
        shard.shard_tensors({**tensors, "model.layers.0.mlp.gate_proj.scales": np.ones(4)}, config)


# -- the engine ------------------------------------------------------------------------------------------------
def greedy_tokens(path, tp: int, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], LLMEngine]:
    # 14 blocks of 16 slots cannot hold all prompts at once (preemption); prompts share 32-token prefixes
    engine = LLMEngine(str(path), device="cpu", num_kv_blocks=14, max_num_batched_tokens=64, max_num_seqs=8,
                       tensor_parallel_size=tp)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    done = run_to_end(engine)
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks
    return [done[str(i)].outputs[0].token_ids for i in range(len(prompts))], engine


@pytest.mark.parametrize("preset, tp", [("qwen2-tiny", 2), ("llama3-tiny", 4)])
def test_engine_greedy_tokens_equal_tp1_with_prefix_caching_and_preemption(checkpoints, preset: str,
                                                                            tp: int) -> None:
    rng = np.random.default_rng(3)
    shared = [rng.integers(10, 1000, 32).tolist() for _ in range(2)]
    prompts = [shared[i % 2] + rng.integers(10, 1000, int(rng.integers(2, 30))).tolist() for i in range(8)]
    path = checkpoints(preset)
    want, _ = greedy_tokens(path, 1, prompts, 16)
    got, engine = greedy_tokens(path, tp, prompts, 16)
    stats, config = engine.stats, engine.config
    assert [rank.cache.k.shape[2] for rank in engine.core.runner.ranks] == [max(config.num_kv_heads // tp, 1)] * tp
    assert stats.num_preemptions > 0, "the cache was meant to be too small: preemption must happen"
    assert stats.num_cached_tokens > 0, "the shared prefixes were meant to hit the prefix cache"
    assert got == want


def test_a_rank_failing_mid_step_fails_its_requests_and_the_engine_goes_on(checkpoints, monkeypatch) -> None:
    engine = LLMEngine(str(checkpoints("qwen3-tiny")), device="cpu", num_kv_blocks=32, max_num_seqs=2,
                       async_scheduling=False, tensor_parallel_size=2)
    for i in range(4):  # two run, two wait
        engine.add_request(str(i), [5 + i, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    rank1 = engine.core.runner.ranks[1].model
    real, calls = rank1.attention_outputs, []

    def failing_third(*args, **kwargs):  # rank 0 is then waiting in the all-reduce after o-proj
        calls.append(1)
        if len(calls) == 5:  # the third step, second layer
            raise RuntimeError("rank 1 failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(rank1, "attention_outputs", failing_third)
    done = run_to_end(engine)
    failed = {i for i, out in done.items() if out.outputs[0].finish_reason == "error"}
    assert failed == {"0", "1"} and all("rank 1 failed" in done[i].error for i in failed)
    assert all(len(done[i].outputs[0].token_ids) == 6 for i in ("2", "3"))
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks


def test_cli_option(checkpoints) -> None:
    from cupaged.cli import main

    args = ["run", "--model", str(checkpoints("qwen3-tiny")), "--device", "cpu", "--prompt", "hello world",
            "--max-tokens", "6", "--ignore-eos", "--num-kv-blocks", "16"]
    one, two = (CliRunner().invoke(main, args + ["--tensor-parallel-size", tp]) for tp in ("1", "2"))
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert one.stdout.strip() and one.stdout == two.stdout  # the generated text (the figures go to stderr)
    bad = CliRunner().invoke(main, args + ["--tensor-parallel-size", "3"])
    assert bad.exit_code != 0 and "num_attention_heads" in bad.output


# -- refusals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, tp, num_gpus, message", [
    ({}, 0, None, "tensor_parallel_size must be an integer >= 1, got 0"),
    ({}, "2", None, "tensor_parallel_size must be an integer >= 1, got '2'"),
    ({}, True, None, "tensor_parallel_size must be an integer >= 1, got True"),
    ({}, 3, None, "does not divide the 4 attention heads \\(num_attention_heads\\)"),
    ({"num_heads": 12, "num_kv_heads": 6}, 4, None, "does not divide the 6 key/value heads \\(num_key_value_heads\\)"),
    ({"num_heads": 24, "num_kv_heads": 3}, 4, None, "not a multiple of the 3 key/value heads"),
    ({"intermediate_size": 330}, 4, None, "does not divide the MLP's intermediate_size 330"),
    ({}, 2, 1, "tensor_parallel_size=2 needs 2 GPUs, one per rank, but 1 is visible"),
    ({}, 4, 2, "needs 4 GPUs, one per rank, but 2 are visible"),
    ({}, 2, 8, "on the GPU needs NCCL and one worker process per GPU"),
])
def test_check_tp_refuses_naming_the_shape(checkpoints, shape: dict, tp: object, num_gpus: int | None,
                                           message: str) -> None:
    config = replace(open_checkpoint(checkpoints("qwen3-tiny"))[0], **shape)  # 4 heads, 2 kv heads, 256 rows
    with pytest.raises(TensorParallelError, match=message):
        check_tp(config, tp, num_gpus)


def test_check_tp_accepts_what_divides(checkpoints) -> None:
    config = open_checkpoint(checkpoints("qwen3-tiny"))[0]
    for tp in (1, 2, 4):
        check_tp(config, tp, None)
    check_tp(config, 1, 0)  # one rank needs no second GPU
    check_tp(replace(config, vocab_size=1031), 4, None)  # the vocabulary is padded, not refused


def test_engine_refuses_a_bad_size_before_loading(checkpoints) -> None:
    with pytest.raises(TensorParallelError, match="tensor_parallel_size=3 does not divide the 4 attention heads"):
        LLMEngine(str(checkpoints("qwen3-tiny")), device="cpu", num_kv_blocks=8, tensor_parallel_size=3)


# -- the communicator ------------------------------------------------------------------------------------------
def test_all_reduce_and_all_gather_agree_on_every_rank() -> None:
    group = ThreadGroup(3)
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(3)]
    work = [p.copy() for p in parts]

    def step(rank: int) -> tuple[np.ndarray, np.ndarray]:
        comm = group.communicators[rank]
        gathered = comm.all_gather(parts[rank], axis=1)
        return comm.all_reduce(work[rank]), gathered

    results = group.run(step)
    expected = (parts[0] + parts[1]) + parts[2]
    for rank, (reduced, gathered) in enumerate(results):
        assert reduced is work[rank]  # in place
        np.testing.assert_array_equal(reduced, expected)  # the same order of summation: bit-identical
        np.testing.assert_array_equal(gathered, np.concatenate(parts, axis=1))


def test_half_precision_partial_sums_are_rounded_once() -> None:
    """1 + 2^-11 + 2^-11 in float16 one add at a time is 1 (each add ties to even); rounded once it is 1 + 2^-10,
    as tp = 1's GEMM, which sums in float32, would give."""
    group = ThreadGroup(3)
    parts = [np.full(4, 1.0, np.float16)] + [np.full(4, 2.0 ** -11, np.float16)] * 2
    reduced = group.run(lambda rank: group.communicators[rank].all_reduce(parts[rank].copy()))
    assert reduced[0].dtype == np.float16
    np.testing.assert_array_equal(reduced[0], np.full(4, 1 + 2.0 ** -10, np.float16))
    assert all(np.array_equal(r, reduced[0]) for r in reduced)


def test_a_failing_rank_raises_its_error_and_the_group_goes_on() -> None:
    group = ThreadGroup(2)
    seen: list[BaseException] = []

    def step(rank: int) -> None:
        if rank == 1:
            raise ValueError("rank 1 broke")
        try:
            group.communicators[0].all_reduce(np.ones(3, np.float32))  # waits for rank 1, which never comes
        except RankFailed as exc:
            seen.append(exc)
            raise

    raised: list[BaseException] = []

    def run() -> None:
        try:
            group.run(step)
        except BaseException as exc:
            raised.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "rank 0 waited forever for the failed rank 1"
    assert [str(e) for e in raised] == ["rank 1 broke"] and len(seen) == 1
    totals = group.run(lambda rank: group.communicators[rank].all_reduce(np.full(2, rank + 1.0, np.float32)))
    assert [t.tolist() for t in totals] == [[3.0, 3.0]] * 2
