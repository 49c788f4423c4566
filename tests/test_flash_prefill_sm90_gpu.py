"""The Hopper prefill kernel (cuda/flash_prefill_sm90.cu, wgmma) against layers/reference.paged_attention.

The cases of test_flash_prefill_gpu.py's `Case` (fresh random inputs, NaN in every cache slot no sequence owns,
NaN-poisoned outputs), with $CUPAGED_PREFILL_KERNEL set so flash_prefill_attention takes the sm90 kernel, once
per variant (sm90, sm90-overlap); each test first checks that it really does (skipped on a device other than
compute capability 9.0).
"""

from __future__ import annotations

import pytest

from tests import test_flash_prefill_gpu as fa2_tests

Case, random_batch = fa2_tests.Case, fa2_tests.random_batch
rng = fa2_tests.rng  # the fixture: a fresh seed per test, printed

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_memory_pool")]


@pytest.fixture(params=["sm90", "sm90-overlap"])
def fp(request, monkeypatch):
    import cupy

    from cupaged import device
    from cupaged.layers import flash_prefill

    device.set_device("cuda")
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the sm90 kernel runs on compute capability 9.0 only")
    monkeypatch.setenv(flash_prefill.ENV_KERNEL, request.param)
    monkeypatch.delenv(flash_prefill.ENV_CONFIG, raising=False)
    for dtype in ("float16", "bfloat16"):
        assert flash_prefill.kernel_for(dtype, 128) == request.param
    yield flash_prefill
    cupy.get_default_memory_pool().free_all_blocks()


@pytest.mark.parametrize("length", [1, 17, 64, 127, 128, 129, 500, 2048])
@pytest.mark.parametrize("dtype, heads, block_size", [
    ("bfloat16", (32, 8), 16),  # Llama-3-8B heads: GQA 4
    ("float16", (16, 8), 32),   # Qwen3-0.6B heads: GQA 2
])
def test_prompt_lengths(fp, rng, length, dtype, heads, block_size) -> None:
    """A whole prompt, no cached prefix. num_seqs=1: a one-token prompt counts as a decode in the metadata, and
    by default the kernel covers the prefills only (none: nothing would be computed or checked)."""
    case = Case(rng, [length], [length], *heads, 128, block_size, dtype)
    case.check(fp, num_seqs=1)


@pytest.mark.parametrize("dtype, heads, block_size", [("bfloat16", (32, 8), 16), ("float16", (16, 8), 8)])
def test_chunked_prefill_over_paged_prefix(fp, rng, dtype, heads, block_size) -> None:
    """Query rows that start mid-sequence (chunked prefill): prefixes on and off the 128-key tile and the block;
    the single-token query last (the metadata wants decodes after the prefills), taken in through num_seqs."""
    query_lens = [17, 128, 500, 300, 64, 129, 1]
    prefixes = [1000, 127, 129, 3000, 128, 1, 5]
    case = Case(rng, query_lens, [q + p for q, p in zip(query_lens, prefixes)], *heads, 128, block_size, dtype)
    case.check(fp, num_seqs=len(query_lens))


@pytest.mark.parametrize("dtype, block_size", [("bfloat16", 16), ("float16", 8)])
def test_tile_and_warpgroup_edges(fp, rng, dtype, block_size) -> None:
    """Query lengths and prefixes at, one under and one over the 64-row warpgroup half, the 128-row query tile and
    the 128-key tile: a warpgroup with no rows, a partial one, a key tile that ends past seq_len, a causal diagonal
    that starts mid-tile."""
    edges = [2, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257]
    prefixes = [0, 1, 63, 64, 65, 127, 128, 129, 0, 5, 191, 64, 31]
    case = Case(rng, edges, [q + p for q, p in zip(edges, prefixes)], 4, 2, 128, block_size, dtype)
    case.check(fp)


@pytest.mark.parametrize("dtype, heads", [("bfloat16", (32, 8)), ("float16", (16, 8))])
def test_mixed_batch_deterministic(fp, rng, dtype, heads) -> None:
    """A random batch with and without prefixes, run twice: the same bits (a race would show as a difference)."""
    import cupy

    query_lens, seq_lens = random_batch(rng, 12, 700, 500)
    case = Case(rng, query_lens, seq_lens, *heads, 128, 16, dtype)
    out, _ = case.check(fp)
    again, _ = case.run(fp)
    assert bool(cupy.array_equal(again.view(cupy.uint16), out.view(cupy.uint16))), "two runs on the same inputs differ"


@pytest.mark.parametrize("dtype, prefix", [("bfloat16", 0), ("float16", 7000)])
def test_long_sequence(fp, rng, dtype, prefix) -> None:
    """One 8k-token sequence: a full prefill, or a 1,192-token chunk after a 7,000-token cached prefix."""
    case = Case(rng, [8192 - prefix], [8192], 4, 1, 128, 16, dtype)
    case.check(fp)


def test_sharp_softmax_strided_rows_and_decodes(fp, rng) -> None:
    """Peaked attention (the running max matters), q rows strided as in a fused QKV projection, decode rows after
    the prefills (left untouched unless num_seqs takes them in)."""
    query_lens = [300, 129, 64, 1, 1]
    seq_lens = [300, 400, 100, 50, 7]
    case = Case(rng, query_lens, seq_lens, 8, 8, 128, 16, "bfloat16", q_scale=6.0, qkv_layout=True)
    case.check(fp, out_rows=case.q.shape[0])
    case.check(fp, num_seqs=len(query_lens))
