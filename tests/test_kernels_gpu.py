"""Every CUDA kernel against its reference in layers/reference.py, on fresh random inputs, outputs poisoned.

The reference runs on the same CuPy inputs in float32 (its own internals) and is compared by relative L2 error:
float32 1e-5, float16 2e-3, bfloat16 1e-2. Memory the pool hands out is NaN-filled first, and cache slots no
sequence owns (past each sequence's end, in partially filled last blocks, and unused blocks) hold NaN, so an
unwritten output or a read past the end shows up as NaN.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupaged.kv_cache import AttentionMetadata
from helpers import shuffled_block_tables

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_memory_pool")]

DTYPES = ["float32", "float16", "bfloat16"]
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def rand(shape, dtype, rng, scale=1.0):
    import cupy

    from cupaged.device import resolve_dtype

    return cupy.asarray((rng.standard_normal(shape) * scale).astype(np.float32)).astype(resolve_dtype(dtype))


def close(actual, expected, dtype) -> None:
    a = actual.astype(np.float32).get() if hasattr(actual, "get") else actual
    e = expected.astype(np.float32).get() if hasattr(expected, "get") else expected
    assert a.shape == e.shape, (a.shape, e.shape)
    assert np.isfinite(e).all(), "the reference itself is not finite"
    assert np.isfinite(a).all(), f"{np.sum(~np.isfinite(a))} output elements not written (still NaN)"
    err = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)
    assert err < TOLERANCE[dtype], err


def reference_ops():
    from cupaged.layers import reference

    return reference


# ------------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 64), (37, 1024), (5, 4096), (300, 128), (3, 5120)])
def test_rms_norm(ops, dtype, rows, width) -> None:
    rng = np.random.default_rng()
    x, w = rand((rows, width), dtype, rng), rand((width,), dtype, rng)
    close(ops.rms_norm(x, w, 1e-6), reference_ops().rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rms_norm_float32_weight(ops, dtype) -> None:
    rng = np.random.default_rng()
    x, w = rand((9, 2048), dtype, rng), rand((2048,), "float32", rng)
    close(ops.rms_norm(x, w, 1e-5), reference_ops().rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_head_views(ops, dtype) -> None:
    """q/k normalisation (Qwen3) runs on [T, H, D] views cut out of the fused qkv projection."""
    rng = np.random.default_rng()
    qkv = rand((13, 6 * 128), dtype, rng)
    before = qkv.copy()
    q = qkv[:, :4 * 128].reshape(13, 4, 128)
    k = qkv[:, 4 * 128:5 * 128].reshape(13, 1, 128)
    w = rand((128,), dtype, rng)
    close(ops.rms_norm(q, w, 1e-6), reference_ops().rms_norm(q, w, 1e-6), dtype)
    close(ops.rms_norm(k, w, 1e-6), reference_ops().rms_norm(k, w, 1e-6), dtype)
    assert (qkv == before).all(), "rms_norm wrote into its input"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_dtype", ["float32", "same"])
@pytest.mark.parametrize("rows, width", [(1, 1024), (33, 2048), (7, 4096), (2, 64)])
def test_add_rms_norm(ops, dtype, residual_dtype, rows, width) -> None:
    rng = np.random.default_rng()
    x, w = rand((rows, width), dtype, rng), rand((width,), dtype, rng)
    r = rand((rows, width), dtype if residual_dtype == "same" else residual_dtype, rng)
    want_out, want_res = reference_ops().add_rms_norm(x, r.copy(), w, 1e-5)
    out, res = ops.add_rms_norm(x, r, w, 1e-5)
    assert out.dtype == want_out.dtype and res.dtype == want_res.dtype
    close(out, want_out, dtype)
    close(res, want_res, residual_dtype if residual_dtype == "float32" else dtype)


# ------------------------------------------------------------------------------------------------- rotary
def llama3_cos_sin(head_dim: int, max_pos: int):
    import cupy

    from cupaged.config import ModelConfig, rope_cos_sin

    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 64,
                                 "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                 "head_dim": head_dim, "rope_theta": 500000.0,
                                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    return cupy.asarray(rope_cos_sin(cfg, max_pos))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (4, 1, 64), (8, 8, 256), (2, 2, 12)])
def test_rotary_on_fused_qkv_views(ops, dtype, heads, kv_heads, head_dim) -> None:
    import cupy

    rng = np.random.default_rng()
    tokens = 19
    qkv = rand((tokens, (heads + 2 * kv_heads) * head_dim), dtype, rng)
    q = qkv[:, :heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].copy()
    cos_sin = llama3_cos_sin(head_dim, 4096)
    positions = cupy.asarray(rng.integers(0, 4096, tokens).astype(np.int32))
    want_q, want_k = reference_ops().apply_rotary(q.copy(), k.copy(), positions, cos_sin)
    got_q, got_k = ops.apply_rotary(q, k, positions, cos_sin)
    close(got_q, want_q, dtype)
    close(got_k, want_k, dtype)
    assert (qkv[:, (heads + kv_heads) * head_dim:] == v_before).all(), "rotary touched v"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_rotary_contiguous_single_token(ops, dtype) -> None:
    import cupy

    rng = np.random.default_rng()
    q, k = rand((1, 16, 64), dtype, rng), rand((1, 4, 64), dtype, rng)
    cos_sin = llama3_cos_sin(64, 128)
    positions = cupy.asarray(np.array([127], np.int32))
    want_q, want_k = reference_ops().apply_rotary(q.copy(), k.copy(), positions, cos_sin)
    got_q, got_k = ops.apply_rotary(q, k, positions, cos_sin)
    close(got_q, want_q, dtype)
    close(got_k, want_k, dtype)


# ------------------------------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, inter", [(1, 3072), (57, 256), (9, 14336), (3, 20)])
def test_silu_and_mul(ops, dtype, tokens, inter) -> None:
    x = rand((tokens, 2 * inter), dtype, np.random.default_rng(), scale=3.0)
    close(ops.silu_and_mul(x), reference_ops().silu_and_mul(x), dtype)


# ------------------------------------------------------------------------------------------------- KV cache
def make_cache(dtype, layers, blocks, kv_heads, block_size, head_dim, rng):
    return rand((layers, blocks, kv_heads, block_size, head_dim), dtype, rng), \
        rand((layers, blocks, kv_heads, block_size, head_dim), dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_write_kv_touches_only_its_slots(ops, dtype, block_size, head_dim) -> None:
    import cupy

    rng = np.random.default_rng()
    kv_heads = 4
    k_cache, v_cache = make_cache(dtype, 1, 40, kv_heads, block_size, head_dim, rng)
    tokens = 37
    slots = rng.permutation(40 * block_size)[:tokens].astype(np.int32)
    slots[5] = slots[30] = -1  # padding: not written
    qkv = rand((tokens, 3 * kv_heads * head_dim), dtype, rng)  # k, v are strided views of a fused projection
    k = qkv[:, kv_heads * head_dim:2 * kv_heads * head_dim].reshape(tokens, kv_heads, head_dim)
    v = qkv[:, 2 * kv_heads * head_dim:].reshape(tokens, kv_heads, head_dim)
    want_k, want_v = k_cache[0].copy(), v_cache[0].copy()
    reference_ops().write_kv(k, v, want_k, want_v, cupy.asarray(slots))
    ops.write_kv(k, v, k_cache[0], v_cache[0], cupy.asarray(slots))
    assert cupy.array_equal(k_cache[0], want_k) and cupy.array_equal(v_cache[0], want_v)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_copy_blocks(ops, dtype) -> None:
    import cupy

    rng = np.random.default_rng()
    k_cache, v_cache = make_cache(dtype, 3, 20, 2, 16, 64, rng)
    src, dst = cupy.asarray(np.array([1, 1, 7], np.int32)), cupy.asarray(np.array([4, 9, 12], np.int32))
    want_k, want_v = k_cache.copy(), v_cache.copy()
    reference_ops().copy_blocks(want_k, want_v, src, dst)
    ops.copy_blocks(k_cache, v_cache, src, dst)
    assert cupy.array_equal(k_cache, want_k) and cupy.array_equal(v_cache, want_v)


# ------------------------------------------------------------------------------------------------- attention
def random_batch(rng, query_lens, seq_lens, block_size, num_blocks, k_cache=None, v_cache=None):
    """Metadata with a shuffled block table; cache slots no sequence owns are set to NaN."""
    import cupy

    tables = shuffled_block_tables(rng, seq_lens, block_size, num_blocks)
    for cache in (k_cache, v_cache):
        if cache is None:
            continue
        owned = np.zeros((num_blocks, block_size), bool)
        for s, table in zip(seq_lens, tables):
            for i in range(s):
                owned[table[i // block_size], i % block_size] = True
        stale = cupy.asarray(~owned)[:, None, :, None]
        cache[...] = cupy.where(stale, cupy.asarray(np.nan, dtype=cache.dtype), cache)
    return AttentionMetadata.build(query_lens, seq_lens, tables, block_size, cupy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (4, 1, 64), (16, 16, 128), (8, 2, 256),
                                                       (32, 1, 128), (12, 4, 64), (14, 2, 128)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_paged_decode_attention(ops, dtype, heads, kv_heads, head_dim, block_size) -> None:
    rng = np.random.default_rng()
    seq_lens = [1, 17, block_size * 3, 1000, 5003][: 5 if head_dim < 256 else 4]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 5
    k_cache, v_cache = make_cache(dtype, 1, num_blocks, kv_heads, block_size, head_dim, rng)
    meta = random_batch(rng, [1] * len(seq_lens), seq_lens, block_size, num_blocks, k_cache[0], v_cache[0])
    q = rand((len(seq_lens), heads, head_dim), dtype, rng, scale=2.0)
    want = reference_ops().paged_attention(q, k_cache[0], v_cache[0], meta, head_dim ** -0.5)
    got = ops.paged_attention(q, k_cache[0], v_cache[0], meta, head_dim ** -0.5)
    close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("partition", [64, 128, 1024])
def test_decode_partitions_and_reduce(ops, dtype, head_dim, partition) -> None:
    """Every partition size through the split-k path: the partials and the reduce kernel."""
    import cupy

    if dtype == "float32" and head_dim == 256:
        pytest.skip("float32 with head_dim 256 uses the reference math")
    rng = np.random.default_rng()
    seq_lens = [3, 64, 65, 300, 2111, 129]
    block_size = 16
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 2
    k_cache, v_cache = make_cache(dtype, 1, num_blocks, 2, block_size, head_dim, rng)
    meta = random_batch(rng, [1] * len(seq_lens), seq_lens, block_size, num_blocks, k_cache[0], v_cache[0])
    q = rand((len(seq_lens), 8, head_dim), dtype, rng, scale=2.0)
    want = reference_ops().paged_attention(q, k_cache[0], v_cache[0], meta, 0.3)
    if dtype == "float32":
        partition = min(partition, 1024)  # CUDA-core kernel: scores of 4 heads x partition in shared memory
    out = cupy.full(q.shape, np.nan, dtype=q.dtype)
    ops.paged_decode_attention(out, q, k_cache[0], v_cache[0], meta.block_tables, meta.seq_lens,
                               max(seq_lens), 0.3, partition=partition)
    close(out, want, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_decode_splits_repeat_bit_identical(ops, dtype) -> None:
    """Split-k calls leave nothing behind: a second call over other sequences (looping CTAs too) combines right,
    and a repeat of the first, after it, is bit-identical (the partials are combined in partition order)."""
    import cupy

    seed = np.random.SeedSequence().entropy  # fresh inputs, the same for the first and the third call
    outs = []
    for seq_lens, grid_splits in (([700, 64, 2000], None), ([1500, 129, 900, 3], 2), ([700, 64, 2000], None)):
        num_blocks = sum(-(-s // 16) for s in seq_lens) + 2
        rng = np.random.default_rng(seed if len(outs) != 1 else None)
        k_cache, v_cache = make_cache(dtype, 1, num_blocks, 2, 16, 128, rng)
        meta = random_batch(rng, [1] * len(seq_lens), seq_lens, 16, num_blocks, k_cache[0], v_cache[0])
        q = rand((len(seq_lens), 8, 128), dtype, rng, scale=2.0)
        want = reference_ops().paged_attention(q, k_cache[0], v_cache[0], meta, 0.2)
        out = cupy.full(q.shape, np.nan, dtype=q.dtype)
        ops.paged_decode_attention(out, q, k_cache[0], v_cache[0], meta.block_tables, meta.seq_lens,
                                   max(seq_lens), 0.2, partition=128, grid_splits=grid_splits)
        close(out, want, dtype)
        outs.append(out)
    assert cupy.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_long_context_small_batch_splits(ops, dtype) -> None:
    """One sequence of 32k tokens: many partitions per sequence, combined by the reduce kernel."""
    rng = np.random.default_rng()
    seq_lens = [32768, 777]
    num_blocks = sum(-(-s // 16) for s in seq_lens)
    k_cache, v_cache = make_cache(dtype, 1, num_blocks, 8, 16, 128, rng)
    meta = random_batch(rng, [1, 1], seq_lens, 16, num_blocks)
    q = rand((2, 32, 128), dtype, rng, scale=3.0)  # peaked softmax: the max-rescaling has to be right
    want = reference_ops().paged_attention(q, k_cache[0], v_cache[0], meta, 128 ** -0.5)
    close(ops.paged_attention(q, k_cache[0], v_cache[0], meta, 128 ** -0.5), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_of_strided_q(ops, dtype) -> None:
    """q as the model passes it: a [T, H, D] view of the fused qkv projection."""
    rng = np.random.default_rng()
    seq_lens = [70, 2, 513]
    num_blocks = sum(-(-s // 16) for s in seq_lens) + 1
    k_cache, v_cache = make_cache(dtype, 1, num_blocks, 4, 16, 64, rng)
    meta = random_batch(rng, [1] * 3, seq_lens, 16, num_blocks, k_cache[0], v_cache[0])
    qkv = rand((3, 24 * 64), dtype, rng)
    q = qkv[:, :16 * 64].reshape(3, 16, 64)
    want = reference_ops().paged_attention(q, k_cache[0], v_cache[0], meta, 0.125)
    close(ops.paged_attention(q, k_cache[0], v_cache[0], meta, 0.125), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_mixed_prefill_and_decode_batch(ops, dtype, block_size) -> None:
    """Prompts of different lengths (a chunked-prefill continuation among them) flattened with decodes."""
    rng = np.random.default_rng()
    query_lens, seq_lens = [40, 7, 131, 1, 1, 1], [40, 300, 131, 5, 64, 129]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    k_cache, v_cache = make_cache(dtype, 1, num_blocks, 2, block_size, 128, rng)
    meta = random_batch(rng, query_lens, seq_lens, block_size, num_blocks, k_cache[0], v_cache[0])
    q = rand((sum(query_lens), 8, 128), dtype, rng)
    want = reference_ops().paged_attention(q, k_cache[0], v_cache[0], meta, 0.1)
    close(ops.paged_attention(q, k_cache[0], v_cache[0], meta, 0.1), want, dtype)


def test_decode_rejects_mismatched_inputs(ops) -> None:
    rng = np.random.default_rng()
    k_cache, v_cache = make_cache("bfloat16", 1, 4, 2, 16, 64, rng)
    meta = random_batch(rng, [1], [10], 16, 4)
    with pytest.raises(ValueError, match="cache is bfloat16"):
        ops.paged_attention(rand((1, 4, 64), "float16", rng), k_cache[0], v_cache[0], meta, 0.1)
    with pytest.raises(ValueError, match="multiple of 2"):
        ops.paged_attention(rand((1, 3, 64), "bfloat16", rng), k_cache[0], v_cache[0], meta, 0.1)


# ------------------------------------------------------------------------------------------------- GEMM
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n", [(1, 1024, 4096), (37, 1024, 3072), (256, 3072, 1024), (5, 64, 32000)])
@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_matmul_through_our_cublas_handle(ops, dtype, m, k, n, out_dtype) -> None:
    rng = np.random.default_rng()
    wide = rand((m, k + 24), dtype, rng)
    x = wide[:, 8:8 + k]  # rows strided, as a slice of a fused projection is
    w = rand((k, n), dtype, rng, scale=k ** -0.5)
    got = ops.matmul(x, w, out_dtype and np.float32)
    assert got.dtype == (np.float32 if out_dtype else x.dtype)
    want = x.astype(np.float32) @ w.astype(np.float32)
    close(got, want, "float32" if dtype == "float32" else dtype)


def test_matmul_captured_in_a_cuda_graph(ops) -> None:
    """Our cuBLAS handle inside a stream capture (CuPy's matmul refuses), replayed on new inputs."""
    import cupy

    from cupaged.layers import cublas

    rng = np.random.default_rng()
    x, w = rand((64, 512), "bfloat16", rng), rand((512, 256), "bfloat16", rng, scale=512 ** -0.5)
    out = cupy.empty((64, 256), dtype=cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        ops.matmul(x, w, out=out)
        cublas.handle().bind(stream.ptr)
        stream.begin_capture()
        ops.matmul(x, w, out=out)
        graph = stream.end_capture()
    x[...] = rand((64, 512), "bfloat16", rng)
    w[...] = rand((512, 256), "bfloat16", rng, scale=512 ** -0.5)
    out.fill(np.nan)
    graph.launch()
    close(out, x.astype(np.float32) @ w.astype(np.float32), "bfloat16")


def test_lasting_buffers_never_come_from_the_current_allocator(ops) -> None:
    """The cuBLAS workspace, the decode workspace and partition buffers are made on first use, which may be inside
    a CUDA-graph capture's private memory pool; that pool lends its freed memory to the next graph's intermediates
    and goes away with its engine, so they come from the default pool whatever allocator is current."""
    import cupy

    from cupaged.layers import cublas

    cublas._handle.cache_clear()
    ops._workspaces.clear()
    default = cupy.get_default_memory_pool()
    pool = cupy.cuda.MemoryPool()
    before = default.used_bytes()
    with cupy.cuda.using_allocator(pool.malloc):
        handle, workspace = cublas.handle(), ops._workspace(1 << 22)
        partition = ops._device_int(4096 + 64, shared=False)
    assert pool.used_bytes() == 0
    assert default.used_bytes() - before >= handle.workspace.nbytes + workspace.nbytes + partition.nbytes
    assert int(partition.get()[0]) == 4096 + 64
    test_matmul_captured_in_a_cuda_graph(ops)  # GEMMs through the handle made there


# ------------------------------------------------------------------------------------------------- decode plans
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_grid_smaller_than_the_partitions(ops, dtype) -> None:
    """CTAs loop over partitions when the grid has fewer than a context needs (as in a captured graph)."""
    import cupy

    rng = np.random.default_rng()
    seq_lens = [3, 700, 2111, 129, 4000]
    num_blocks = sum(-(-s // 16) for s in seq_lens) + 2
    k_cache, v_cache = make_cache(dtype, 1, num_blocks, 2, 16, 128, rng)
    meta = random_batch(rng, [1] * len(seq_lens), seq_lens, 16, num_blocks, k_cache[0], v_cache[0])
    q = rand((len(seq_lens), 8, 128), dtype, rng, scale=2.0)
    want = reference_ops().paged_attention(q, k_cache[0], v_cache[0], meta, 0.3)
    out = cupy.empty_like(q)
    ops.paged_decode_attention(out, q, k_cache[0], v_cache[0], meta.block_tables, meta.seq_lens, max(seq_lens), 0.3,
                               partition=128, grid_splits=3)
    close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_replayed_from_one_graph(ops, dtype) -> None:
    """One capture with a graph plan serves steps of other lengths: set_partition, refill inputs, replay."""
    import cupy

    rng = np.random.default_rng()
    batch, heads, kv_heads, head_dim, bs, width = 4, 16, 8, 128, 16, 600
    k_cache, v_cache = make_cache(dtype, 1, 1300, kv_heads, bs, head_dim, rng)
    plan = ops.decode_plan(batch, heads, kv_heads, head_dim, bs, k_cache.dtype, 1, capacity_len=bs * width)
    q = cupy.empty((batch, heads, head_dim), dtype=k_cache.dtype)
    out = cupy.empty_like(q)
    tables = cupy.zeros((batch, width), dtype=cupy.int32)
    lens = cupy.ones(batch, dtype=cupy.int32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        ops.run_decode(out, q, k_cache[0], v_cache[0], tables, lens, plan, 0.1)
        stream.begin_capture()
        ops.run_decode(out, q, k_cache[0], v_cache[0], tables, lens, plan, 0.1)
        graph = stream.end_capture()
        stream.synchronize()
    for seq_lens in ([5, 17, 300, 1], [8000, 64, 4097, 1000], [9600, 9599, 1, 2]):
        # new contents in the caches the graph was captured with (NaN where this step's sequences own nothing)
        k_cache[...] = rand(k_cache.shape, dtype, rng)
        v_cache[...] = rand(v_cache.shape, dtype, rng)
        meta = random_batch(rng, [1] * batch, seq_lens, bs, 1300, k_cache[0], v_cache[0])
        q[...] = rand(q.shape, dtype, rng, scale=2.0)
        want = reference_ops().paged_attention(q, k_cache[0], v_cache[0], meta, 0.1)
        tables[:, :meta.block_tables.shape[1]] = meta.block_tables
        lens[...] = meta.seq_lens
        ops.set_partition(plan, max(seq_lens))
        out.fill(np.nan)
        graph.launch()
        cupy.cuda.Device().synchronize()
        close(out, want, dtype)


# ------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("vocab", [151936, 1000, 37])
def test_sample_rows_is_the_inverse_cdf(ops, vocab) -> None:
    """Greedy rows are the argmax; sampled rows are the token whose CDF interval (float64, from the reference's
    weights) holds u * total, up to float32 rounding of the running sums."""
    rng = np.random.default_rng()
    batch = 48
    logits = rand((batch, vocab), "float32", rng, scale=3.0)
    logits[3, 5 % vocab] = logits[3].max()  # a tie: the first index wins, as numpy's argmax
    temperature = rng.uniform(0.3, 1.5, batch).astype(np.float32)
    temperature[:8] = 0
    min_p = rng.choice([0.0, 0.02, 0.3], batch).astype(np.float32)
    uniform = rng.random(batch)
    uniform[8] = 0.999999
    got = ops.sample_rows(logits, temperature, min_p, uniform).get()
    again = ops.sample_rows(logits, temperature, min_p, uniform).get()
    assert (got == again).all(), "not deterministic"
    host = logits.get().astype(np.float64)
    assert (got[:8] == host[:8].argmax(axis=-1)).all()
    for b in range(8, batch):
        w = np.exp((host[b] - host[b].max()) / temperature[b])
        w[w < min_p[b]] = 0
        cdf = np.cumsum(w)
        target, slack = uniform[b] * cdf[-1], 1e-5 * cdf[-1]
        token = got[b]
        assert 0 <= token < vocab and w[token] > 0, (b, token)
        below = cdf[token - 1] if token else 0.0
        assert below - slack <= target <= cdf[token] + slack, (b, token, below, target, cdf[token])
