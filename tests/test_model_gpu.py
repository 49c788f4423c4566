"""The model and the engine on the GPU, against transformers computed live on the same GPU.

Needs a CUDA device (marker `gpu`); the transformers comparisons also need torch and transformers.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TINY_PRESETS, load_model, relative_error, teacher_forced_logits

from cupaged import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def release_gpu_memory():
    """Engines and torch share the card in this process: give back what each test cached."""
    yield
    import sys

    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


def norm_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_logits_match_transformers_on_gpu(preset: str, dtype: str, checkpoints) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import cupy

    from cupaged import device
    from cupaged.layers import cuda_ops
    from tools.make_reference_logits import reference_logits

    device.set_device("cuda")
    path = checkpoints(preset, dtype)  # a bf16 checkpoint for bf16, as real models ship: no weight rounding
    rng = np.random.default_rng(11)
    sequences = [rng.integers(0, 1000, n) for n in (5, 19, 40, 77)]
    exact = reference_logits(path, [s.tolist() for s in sequences], dtype="float32", device="cuda")
    model = load_model(path, dtype, cuda_ops, cupy)
    actual = teacher_forced_logits(model, sequences, [max(1, len(s) // 2) for s in sequences])
    if dtype == "float32":
        for a, e in zip(actual, exact):
            assert np.isfinite(a).all() and relative_error(a, e) < 1e-4
        return
    # bf16: within 1e-2 of transformers' float32 logits on the same (bf16) checkpoint, and at least as close to
    # them as transformers' own bf16 run is (which rounds at other points: rotary and softmax in bf16)
    theirs = reference_logits(path, [s.tolist() for s in sequences], dtype="bfloat16", device="cuda")
    ours_err = norm_relative_error(np.concatenate(actual), np.concatenate(exact))
    their_err = norm_relative_error(np.concatenate(theirs), np.concatenate(exact))
    print(f"{preset} bf16: cupaged {ours_err:.4f}, transformers {their_err:.4f} (relative to float32)")
    assert np.isfinite(np.concatenate(actual)).all()
    assert ours_err < 1e-2 and ours_err <= their_err


def test_gpu_engine_greedy_equals_cpu_engine(checkpoints) -> None:
    path = str(checkpoints("llama-tiny"))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 1000, int(rng.integers(2, 90))).tolist() for _ in range(16)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cpu = LLM(path, device="cpu", num_kv_blocks=128).generate(prompts, params, use_tqdm=False)
    gpu = LLM(path, device="cuda", dtype="float32", num_kv_blocks=128).generate(prompts, params, use_tqdm=False)
    for c, g in zip(cpu, gpu):
        assert c.outputs[0].token_ids == g.outputs[0].token_ids


def test_gpu_engine_bf16_greedy_matches_transformers(checkpoints) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tools.make_reference_logits import reference_greedy

    path = checkpoints("qwen3-tiny")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 1000, int(rng.integers(4, 60))).tolist() for _ in range(16)]
    from tools.make_reference_logits import reference_logits

    expected = reference_greedy(path, prompts, max_new_tokens=32, dtype="bfloat16", device="cuda")
    outs = LLM(str(path), device="cuda", dtype="bfloat16", num_kv_blocks=256).generate(
        prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    equal = 0
    for prompt, out, ref in zip(prompts, outs, expected):
        ours = out.outputs[0].token_ids
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
        if same == len(ref):
            equal += 1
            continue
        # Two bf16 programs that round at different points may only part ways at a near tie: the float32
        # logits there must have the two tokens within bf16 noise of each other.
        logits = reference_logits(path, [prompt + ref[:same]], dtype="float32", device="cuda")[0][-1]
        gap = abs(logits[ours[same]] - logits[ref[same]])
        print(f"bf16 greedy: {same} tokens equal, then a tie within {gap:.4f} (logit std {logits.std():.3f})")
        assert gap < 0.02 * np.abs(logits).max()
    # random weights give flat distributions, where near-ties are common (~2% of tokens here): about half the
    # prompts get through 32 tokens without one
    print(f"bf16 greedy: {equal} of {len(prompts)} prompts equal to transformers' for all 32 tokens")
    assert equal >= 3


def test_cli_run_on_cuda(checkpoints) -> None:
    from click.testing import CliRunner

    from cupaged.cli import main

    result = CliRunner().invoke(main, ["run", "--model", str(checkpoints("qwen3-tiny")), "--device", "cuda",
                                       "--prompt", "hello", "--max-tokens", "16", "--ignore-eos",
                                       "--gpu-memory-utilization", "0.5"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output


def run_all(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> list[list[list[int]]]:
    outs = llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_gpu_prefix_caching_and_parallel_sampling(checkpoints) -> None:
    """Shared blocks on the GPU: prefix-cache hits and copy-on-write (the block-copy kernel) change nothing."""
    path = str(checkpoints("qwen3-tiny"))
    rng = np.random.default_rng(2)
    system = rng.integers(0, 1000, 50).tolist()
    # a low temperature: K/V found in the cache was computed in another batch than it would be without the cache,
    # so the logits differ in the last float32 bits, and a flat distribution would let a draw that lands within
    # 1e-6 of a CDF boundary change token; the forks and copy-on-write are exercised all the same
    requests = [(system + rng.integers(0, 1000, int(rng.integers(1, 20))).tolist(),
                 SamplingParams(n=3, temperature=0.2, seed=i, max_tokens=12, ignore_eos=True)) for i in range(6)]
    # three sequences at a time: one request runs while the next waits, and then finds its prefix cached
    cached = LLM(path, device="cuda", dtype="float32", num_kv_blocks=64, max_num_seqs=3)
    plain = LLM(path, device="cuda", dtype="float32", num_kv_blocks=64, max_num_seqs=3,
                enable_prefix_caching=False)
    assert run_all(cached, requests) == run_all(plain, requests)
    assert cached.engine.stats.num_cached_tokens > 0


def test_gpu_beam_search_equals_transformers_fixture(checkpoints) -> None:
    from helpers import FIXTURES

    fixture = np.load(FIXTURES / "beam_search" / "qwen3-tiny-w3.npz")
    llm = LLM(str(checkpoints("qwen3-tiny")), device="cuda", dtype="float32", num_kv_blocks=128)
    params = SamplingParams(beam_width=3, max_tokens=int(fixture["max_new_tokens"]),
                            length_penalty=float(fixture["length_penalty"]),
                            early_stopping=bool(fixture["early_stopping"]),
                            stop_token_ids=fixture["stop_token_ids"].tolist())
    outs = run_all(llm, [(fixture[f"prompt_{i}"].tolist(), params) for i in range(10)])
    assert [o[0] for o in outs] == [fixture[f"output_{i}"].tolist() for i in range(10)]


def test_gpu_chunked_prefill_gives_the_same_greedy_output(checkpoints) -> None:
    """The flash prefill kernel over a cached prefix (chunked prefill) against whole-prompt prefill, bf16."""
    path = str(checkpoints("qwen3-tiny", "bfloat16"))
    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (400, 77, 250)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    whole = run_all(LLM(path, device="cuda", num_kv_blocks=256, enable_prefix_caching=False),
                    [(p, params) for p in prompts])
    chunked = run_all(LLM(path, device="cuda", num_kv_blocks=256, max_num_batched_tokens=64,
                          enable_prefix_caching=False), [(p, params) for p in prompts])
    assert chunked == whole
