"""The flash prefill kernel (cuda/flash_prefill.cu) against layers/reference.paged_attention.

Fresh random inputs on every run (the seed is printed on failure), never zeros; outputs poisoned with NaN; cache
slots that no sequence owns (spare blocks, the tails of last blocks) hold NaN, so a read past seq_len or through
a wrong block id shows. The reference runs in float32 on the same (fp16/bf16-valued) inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cupaged.kv_cache import AttentionMetadata

pytestmark = pytest.mark.gpu

TOLERANCE = {"float16": 3e-3, "bfloat16": 1e-2}


@pytest.fixture(scope="module")
def fp():
    import cupy

    from cupaged import device
    from cupaged.layers import flash_prefill

    device.set_device("cuda")
    yield flash_prefill
    cupy.get_default_memory_pool().free_all_blocks()


@pytest.fixture
def rng(request):
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    request.node.user_properties.append(("seed", seed))
    print(f"seed {seed}")
    return np.random.default_rng(seed)


class Case:
    """A batch: random K/V written into shuffled physical blocks (NaN elsewhere), random queries, metadata."""

    def __init__(self, rng, query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                 q_scale=1.0, qkv_layout=False):
        import cupy

        from cupaged.device import resolve_dtype

        self.dtype = resolve_dtype(dtype)
        self.dtype_name = dtype
        self.scale = head_dim ** -0.5
        blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
        num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
        physical = rng.permutation(num_blocks)
        tables, at = [], 0
        for n in blocks_per_seq:
            tables.append(physical[at:at + n].tolist())
            at += n
        self.meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, cupy)
        cupy.random.seed(int(rng.integers(1 << 31)))
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k_cache = cupy.full(shape, np.nan, dtype=self.dtype)
        self.v_cache = cupy.full(shape, np.nan, dtype=self.dtype)
        blk = np.concatenate([np.asarray(t, np.int64)[np.arange(s) // block_size] for t, s in zip(tables, seq_lens)])
        off = np.concatenate([np.arange(s) % block_size for s in seq_lens])
        n = len(blk)
        rand = lambda *s: cupy.random.standard_normal(s, dtype=cupy.float32)  # noqa: E731
        self.k_cache[cupy.asarray(blk), :, cupy.asarray(off)] = rand(n, num_kv_heads, head_dim).astype(self.dtype)
        self.v_cache[cupy.asarray(blk), :, cupy.asarray(off)] = rand(n, num_kv_heads, head_dim).astype(self.dtype)
        tokens = int(sum(query_lens))
        if qkv_layout:  # q as the first part of a fused [T, (Hq + 2 Hkv) D] projection: strided rows
            qkv = (rand(tokens, (num_heads + 2 * num_kv_heads) * head_dim) * q_scale).astype(self.dtype)
            self.q = qkv[:, :num_heads * head_dim].reshape(tokens, num_heads, head_dim)
            assert not self.q.flags.c_contiguous
        else:
            self.q = (rand(tokens, num_heads, head_dim) * q_scale).astype(self.dtype)

    def reference(self):
        import cupy

        from cupaged.layers import reference

        return reference.paged_attention(self.q.astype(cupy.float32), self.k_cache, self.v_cache, self.meta,
                                         self.scale)

    def run(self, fp, num_seqs=None, config=None, out_rows=None):
        import cupy

        rows = int(self.meta.query_start_loc_host[self.meta.num_prefills if num_seqs is None else num_seqs])
        out = cupy.full((out_rows or rows, *self.q.shape[1:]), np.nan, dtype=self.dtype)
        result = fp.flash_prefill_attention(self.q, self.k_cache, self.v_cache, self.meta, self.scale, out=out,
                                            num_seqs=num_seqs, config=config)
        assert result is out
        cupy.cuda.Device().synchronize()
        return out, rows

    def check(self, fp, num_seqs=None, config=None, out_rows=None, expected=None):
        out, rows = self.run(fp, num_seqs, config, out_rows)
        assert rows > 0, "no rows to check (single-token queries count as decodes: pass num_seqs)"
        expected = self.reference() if expected is None else expected
        a = out[:rows].astype(np.float32).get()
        e = expected[:rows].get()
        assert np.isfinite(a).all(), f"{np.count_nonzero(~np.isfinite(a))} output elements not written (NaN)"
        err = np.linalg.norm(a - e) / np.linalg.norm(e)
        assert err < TOLERANCE[self.dtype_name], f"relative error {err:.3g}"
        if out.shape[0] > rows:
            assert np.isnan(out[rows:].astype(np.float32).get()).all(), "rows past the prefills were written"
        return out, expected


def random_batch(rng, count, max_query, max_prefix, prefix_fraction=0.5):
    query_lens = rng.integers(2, max_query + 1, count).tolist()
    prefix = [int(rng.integers(1, max_prefix + 1)) if rng.random() < prefix_fraction else 0 for _ in query_lens]
    return query_lens, [q + p for q, p in zip(query_lens, prefix)]


@pytest.mark.parametrize("dtype, head_dim, heads, block_size", [
    ("bfloat16", 128, (32, 8), 16),
    ("float16", 128, (32, 8), 32),
    ("bfloat16", 64, (16, 1), 8),
    ("float16", 64, (8, 2), 16),
])
def test_mixed_batch(fp, rng, dtype, head_dim, heads, block_size) -> None:
    """Prefills with and without a cached prefix, lengths off every tile and block boundary; run twice: the
    same bits (a race would show as a difference)."""
    query_lens, seq_lens = random_batch(rng, 12, 700, 500)
    case = Case(rng, query_lens, seq_lens, *heads, head_dim, block_size, dtype)
    import cupy

    out, expected = case.check(fp)
    again, _ = case.run(fp)
    assert bool(cupy.array_equal(again.view(cupy.uint16), out.view(cupy.uint16))), "two runs on the same inputs differ"


def test_many_sequences_and_single_tokens(fp, rng) -> None:
    """64 sequences, 1 to 200 new tokens (single-token ones through num_seqs), prefixes up to 300."""
    query_lens = sorted(rng.integers(1, 201, 64).tolist(), reverse=True)  # prefills first, then decodes
    seq_lens = [q + (int(rng.integers(0, 301)) if rng.random() < 0.5 else 0) for q in query_lens]
    case = Case(rng, query_lens, seq_lens, 8, 2, 128, 8, "bfloat16")
    case.check(fp, num_seqs=len(query_lens))
    case.check(fp)  # prefills only


@pytest.mark.parametrize("dtype, head_dim, block_size", [("bfloat16", 64, 32), ("float16", 128, 8)])
def test_tile_and_block_edges(fp, rng, dtype, head_dim, block_size) -> None:
    """Lengths at, one under and one over the 64-key and 128-row tiles and the block size."""
    edges = [2, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257]
    prefixes = [0, 0, 1, 63, 64, 65, 0, 127, 1, 128, 129, 0, 5, 64, 0, 31]
    case = Case(rng, edges, [q + p for q, p in zip(edges, prefixes)], 4, 2, head_dim, block_size, dtype)
    case.check(fp)


@pytest.mark.parametrize("dtype, prefix", [("bfloat16", 0), ("float16", 7000)])
def test_long_sequence(fp, rng, dtype, prefix) -> None:
    """One 8k-token sequence (a full prefill, or a 1,192-token chunk after a 7,000-token cached prefix)."""
    length = 8192
    case = Case(rng, [length - prefix], [length], 4, 1, 128, 16, dtype)
    case.check(fp)


def test_sharp_softmax_and_strided_rows(fp, rng) -> None:
    """Queries scaled up (peaked attention: the running max matters); q rows strided as in a fused QKV
    projection; out with decode rows after the prefills, which stay untouched."""
    query_lens = [300, 129, 64, 1, 1]
    seq_lens = [300, 400, 100, 50, 7]
    case = Case(rng, query_lens, seq_lens, 8, 8, 128, 16, "bfloat16", q_scale=6.0, qkv_layout=True)
    case.check(fp, out_rows=case.q.shape[0])


def test_tile_configs(fp, rng) -> None:
    """Every tile configuration the bench may pick computes the same function."""
    query_lens, seq_lens = random_batch(rng, 6, 400, 300)
    case = Case(rng, query_lens, seq_lens, 8, 2, 128, 16, "bfloat16")
    expected = case.reference()
    for config in fp.CONFIGS:
        case.check(fp, config=config, expected=expected)


def test_rejects_what_it_does_not_cover(fp, rng) -> None:
    import cupy

    case = Case(rng, [5], [9], 4, 2, 64, 16, "bfloat16")
    with pytest.raises(TypeError):
        fp.flash_prefill_attention(case.q.astype(cupy.float32), case.k_cache, case.v_cache, case.meta, case.scale)
    with pytest.raises(ValueError):
        fp.flash_prefill_attention(case.q[:, :3], case.k_cache[:, :, :, :48], case.v_cache[:, :, :, :48],
                                   case.meta, case.scale)
    with pytest.raises(ValueError):
        fp.flash_prefill_attention(case.q, case.k_cache, case.v_cache, case.meta, -1.0)
    with pytest.raises(ValueError):
        fp.flash_prefill_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, config=(2, 2, 2))
