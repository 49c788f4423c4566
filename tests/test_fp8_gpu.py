"""The FP8 (e4m3) KV cache on the GPU: the conversions against the NumPy codec, the cache-write kernel bit-exact
against fp8.quantize_rows, decode and prefill attention over FP8 caches against the reference, block copies, and
the engine (graphs against eager, FP8 logits against bf16, twice the cached tokens).

Fresh random inputs on every run (never zeros), with per-row magnitudes spread over many binades so that the
per-row scales differ; outputs are poisoned (NaN) before the kernels run; cache slots no sequence owns hold NaN
codes (0x7f) and the scale byte 0xff (an infinite scale), so a read past a sequence's end shows up as NaN.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupaged.fp8 import E4M3_NAN, decode_e4m3, encode_e4m3, quantize_rows
from cupaged.kv_cache import AttentionMetadata
from helpers import shuffled_block_tables

pytestmark = pytest.mark.gpu

DTYPES = ["float16", "bfloat16"]
# relative L2 error against the reference, which attends in float32 over the same dequantized K/V: the kernels
# round P (and fp16 q) to 16 bits as the bf16 kernels do; bf16 P is the larger error
TOLERANCE = {"float16": 1e-2, "bfloat16": 1e-2}


@pytest.fixture(autouse=True)
def release_gpu_memory():
    yield
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()


def spread_rows(rng, shape, low: float, high: float) -> np.ndarray:
    """Standard normals times a per-row power of two drawn from [2^low, 2^high] (rows: the last axis)."""
    return (rng.standard_normal(shape) * np.exp2(rng.uniform(low, high, shape[:-1]))[..., None]).astype(np.float32)


def to_dtype(x: np.ndarray, dtype: str):
    import cupy

    from cupaged.device import resolve_dtype

    return cupy.asarray(x).astype(resolve_dtype(dtype))


def close(actual, expected, dtype) -> None:
    a = actual.astype(np.float32).get()
    e = expected.astype(np.float32).get() if hasattr(expected, "get") else expected.astype(np.float32)
    assert np.isfinite(e).all(), "the reference itself is not finite"
    assert np.isfinite(a).all(), f"{np.sum(~np.isfinite(a))} output elements NaN (unwritten, or a stale slot read)"
    err = np.linalg.norm(a - e) / np.linalg.norm(e)
    assert err < TOLERANCE[dtype], err


# ---------------------------------------------------------------------------------------------------- codec
_CODEC = r"""
extern "C" __global__ void encode(const float* x, unsigned short* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (2 * i + 1 < n) out[i] = cupaged::float2_to_e4m3x2(x[2 * i], x[2 * i + 1]);
}
extern "C" __global__ void decode(const unsigned short* codes, unsigned* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = cupaged::e4m3x2_to_half2(codes[i]);
}
"""


def test_cuda_conversions_match_the_numpy_codec(ops) -> None:
    """PTX cvt.rn.satfinite.e4m3x2.f32 (= __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)) against
    encode_e4m3 on random floats of every binade, every code's value and the midpoints between codes, saturation,
    infinities and NaN; cvt.rn.f16x2.e4m3x2 against decode_e4m3 on all 256 codes."""
    import cupy

    from cupaged.kernels import cuda_dir, device_arch, include_options, read_source

    module = cupy.RawModule(code=read_source(cuda_dir() / "common.cuh") + _CODEC,
                            options=("--std=c++17", f"-arch=sm_{device_arch()}") + include_options())
    rng = np.random.default_rng()
    values = decode_e4m3(np.arange(256, dtype=np.uint8))
    finite = np.sort(values[np.isfinite(values)])
    mids = (finite[:-1] + finite[1:]) / 2
    x = np.concatenate([(rng.standard_normal(100000) * np.exp2(rng.uniform(-14, 10, 100000))),
                        finite, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
                        [1e6, -1e6, np.inf, -np.inf, np.nan, 464.0, 1e-30]]).astype(np.float32)
    x = x[: len(x) // 2 * 2]
    out = cupy.full(len(x) // 2, 0xABCD, dtype=cupy.uint16)
    module.get_function("encode")((len(x) // 256 + 1,), (128,), (cupy.asarray(x), out, np.int32(len(x))))
    assert np.array_equal(out.get().view(np.uint8), encode_e4m3(x))
    pairs = np.arange(256, dtype=np.uint8).repeat(2)  # code c in both bytes
    halves = cupy.full(256, 0xFFFFFFFF, dtype=cupy.uint32)
    module.get_function("decode")((2,), (128,), (cupy.asarray(pairs.view(np.uint16)), halves, np.int32(256)))
    got = halves.get().view(np.float16).astype(np.float32)
    want = decode_e4m3(np.arange(256, dtype=np.uint8)).repeat(2)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


# ---------------------------------------------------------------------------------------------------- cache
def fp8_cache(layers: int, blocks: int, kv_heads: int, block_size: int, head_dim: int):
    """Poisoned FP8 caches: NaN codes, infinite scales (0xff)."""
    import cupy

    shape = (layers, blocks, kv_heads, block_size, head_dim)
    codes = [cupy.full(shape, E4M3_NAN, dtype=cupy.uint8) for _ in range(2)]
    scales = [cupy.full(shape[:-1], 0xFF, dtype=cupy.uint8) for _ in range(2)]
    return codes, scales


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_write_kv_fp8_is_bit_exact_and_touches_only_its_slots(ops, dtype, block_size, head_dim) -> None:
    import cupy

    rng = np.random.default_rng()
    kv_heads, tokens, blocks = 4, 37, 40
    (k_cache, v_cache), (k_scale, v_scale) = fp8_cache(1, blocks, kv_heads, block_size, head_dim)
    slots = rng.permutation(blocks * block_size)[:tokens].astype(np.int32)
    slots[5] = slots[30] = -1  # padding: not written
    qkv = to_dtype(spread_rows(rng, (tokens, 3, kv_heads, head_dim), -20, 12).reshape(tokens, -1), dtype)
    k = qkv[:, kv_heads * head_dim:2 * kv_heads * head_dim].reshape(tokens, kv_heads, head_dim)  # strided views
    v = qkv[:, 2 * kv_heads * head_dim:].reshape(tokens, kv_heads, head_dim)
    k[3, 1, :] = 0  # an all-zero row: the smallest scale, zero codes
    ops.write_kv(k, v, k_cache[0], v_cache[0], cupy.asarray(slots), kv_scales=(k_scale[0], v_scale[0]))
    for x, codes, scales in ((k, k_cache[0], k_scale[0]), (v, v_cache[0], v_scale[0])):
        want_codes, want_scales = quantize_rows(x.astype(np.float32).get())
        got_codes, got_scales = codes.get(), scales.get()
        written = np.zeros((blocks, block_size), bool)
        for t, s in enumerate(slots):
            if s < 0:
                continue
            written[s // block_size, s % block_size] = True
            assert np.array_equal(got_codes[s // block_size, :, s % block_size], want_codes[t]), t
            assert np.array_equal(got_scales[s // block_size, :, s % block_size], want_scales[t]), t
        assert np.all(got_codes.transpose(0, 2, 1, 3)[~written] == E4M3_NAN)
        assert np.all(got_scales.transpose(0, 2, 1)[~written] == 0xFF)


@pytest.mark.parametrize("kv_heads, block_size", [(2, 16), (1, 8)])  # scale blocks of 32 and 8 bytes
def test_copy_blocks_copies_codes_and_scales(ops, kv_heads, block_size) -> None:
    import cupy

    from cupaged.layers import reference

    rng = np.random.default_rng()
    shape = (3, 20, kv_heads, block_size, 64)
    k, v = (cupy.asarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(2))
    ks, vs = (cupy.asarray(rng.integers(1, 140, shape[:-1], dtype=np.uint8)) for _ in range(2))
    src, dst = cupy.asarray(np.array([1, 1, 7], np.int32)), cupy.asarray(np.array([4, 9, 12], np.int32))
    want = [a.copy() for a in (k, v, ks, vs)]
    reference.copy_blocks(want[0], want[1], src, dst, kv_scales=(want[2], want[3]))
    ops.copy_blocks(k, v, src, dst, kv_scales=(ks, vs))
    for got, expected in zip((k, v, ks, vs), want):
        assert cupy.array_equal(got, expected)


# ---------------------------------------------------------------------------------------------------- attention
def fp8_batch(rng, query_lens, seq_lens, kv_heads, head_dim, block_size, spare_blocks=3):
    """An FP8 cache holding random K/V of each sequence (quantized by the NumPy reference, so the kernels are
    tested apart from the write kernel), stale slots poisoned, and the step's metadata (shuffled blocks)."""
    import cupy

    num_blocks = sum(-(-s // block_size) for s in seq_lens) + spare_blocks
    tables = shuffled_block_tables(rng, seq_lens, block_size, num_blocks)
    (k_cache, v_cache), (k_scale, v_scale) = fp8_cache(1, num_blocks, kv_heads, block_size, head_dim)
    host = [a[0].get() for a in (k_cache, v_cache, k_scale, v_scale)]
    for s, table in zip(seq_lens, tables):
        pos = np.arange(s)
        blocks, offsets = np.asarray(table)[pos // block_size], pos % block_size
        # K within a few binades (scores stay O(10)); V over many, down to 2^-24 and up to 2^10
        for i, (low, high) in enumerate(((-2, 2), (-24, 10))):
            codes, exps = quantize_rows(spread_rows(rng, (s, kv_heads, head_dim), low, high))
            host[i][blocks, :, offsets] = codes
            host[2 + i][blocks, :, offsets] = exps
    for dev, h in zip((k_cache, v_cache, k_scale, v_scale), host):
        dev[0] = cupy.asarray(h)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, cupy)
    return k_cache[0], v_cache[0], (k_scale[0], v_scale[0]), meta


def check_attention(ops, dtype, heads, kv_heads, head_dim, block_size, query_lens, seq_lens, **decode_options):
    import cupy

    from cupaged.layers import reference

    rng = np.random.default_rng()
    k, v, scales, meta = fp8_batch(rng, query_lens, seq_lens, kv_heads, head_dim, block_size)
    q = to_dtype(rng.standard_normal((sum(query_lens), heads, head_dim)).astype(np.float32) * 2, dtype)
    want = reference.paged_attention(q, k, v, meta, head_dim ** -0.5, kv_scales=scales)
    out = cupy.full(q.shape, np.nan, dtype=q.dtype)
    if decode_options:
        ops.paged_decode_attention(out, q, k, v, meta.block_tables, meta.seq_lens, max(seq_lens), head_dim ** -0.5,
                                   kv_scales=scales, **decode_options)
    else:
        ops.paged_attention(q, k, v, meta, head_dim ** -0.5, out=out, kv_scales=scales)
    close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (4, 1, 64), (16, 16, 128), (8, 2, 256),
                                                       (32, 1, 128), (12, 4, 64), (14, 2, 128)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_attention_over_fp8(ops, dtype, heads, kv_heads, head_dim, block_size) -> None:
    seq_lens = [1, 17, block_size * 3, 1000, 3003][: 5 if head_dim < 256 else 4]
    check_attention(ops, dtype, heads, kv_heads, head_dim, block_size, [1] * len(seq_lens), seq_lens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partition, grid_splits", [(64, None), (128, None), (1024, None), (128, 3)])
def test_decode_partitions_over_fp8(ops, dtype, partition, grid_splits) -> None:
    """Split-k partials and the reduce kernel, and CTAs looping over partitions (a captured graph's grid)."""
    check_attention(ops, dtype, 16, 4, 128, 16, [1] * 4, [70, 640, 2049, 5000], partition=partition,
                    grid_splits=grid_splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, heads, kv_heads", [(128, 8, 2), (64, 12, 4), (128, 4, 4)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_prefill_and_decode_over_fp8(ops, dtype, head_dim, heads, kv_heads, block_size) -> None:
    """Prompts of different lengths, a chunked-prefill continuation over a cached prefix, and decodes: the flash
    prefill kernel dequantizes its tiles, the decode kernel its registers."""
    query_lens, seq_lens = [40, 7, 131, 300, 1, 1, 1], [40, 300, 131, 500, 5, 64, 129]
    check_attention(ops, dtype, heads, kv_heads, head_dim, block_size, query_lens, seq_lens)


def test_fp8_refuses_what_no_kernel_takes(ops) -> None:
    import cupy

    from cupaged.device import resolve_dtype

    k = cupy.zeros((4, 2, 16, 96), dtype=cupy.uint8)
    scales = (cupy.zeros((4, 2, 16), dtype=cupy.uint8),) * 2
    x = cupy.zeros((3, 2, 96), dtype=resolve_dtype("bfloat16"))
    with pytest.raises(ValueError, match="FP8"):
        ops.write_kv(x, x, k, k, cupy.zeros(3, dtype=cupy.int32), kv_scales=scales)
    with pytest.raises(ValueError, match="kv_scales"):
        ops.write_kv(x[:, :, :64], x[:, :, :64], k[..., :64].copy(), k[..., :64].copy(),
                     cupy.zeros(3, dtype=cupy.int32), kv_scales=(scales[0][:2], scales[1]))


# ---------------------------------------------------------------------------------------------------- engine
def test_fp8_engine_graphs_give_the_same_tokens_as_eager(checkpoints) -> None:
    """Decode graphs, piecewise graphs for mixed steps, chunked prefill and prefix hits, with FP8 KV."""
    from cupaged import LLM, SamplingParams

    path = str(checkpoints("qwen3-tiny", "bfloat16"))
    rng = np.random.default_rng(21)
    system = rng.integers(0, 1000, 48).tolist()
    prompts = [system + rng.integers(0, 1000, int(rng.integers(2, 200))).tolist() for _ in range(32)]
    params = [SamplingParams(temperature=0 if i % 4 else 0.8, seed=i, max_tokens=int(rng.integers(1, 60)),
                             ignore_eos=True) for i in range(32)]

    def run(**options):
        llm = LLM(path, device="cuda", dtype="bfloat16", num_kv_blocks=512, max_num_seqs=32, kv_cache_dtype="fp8",
                  max_num_batched_tokens=256, **options)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm

    graphs, llm = run()
    eager, _ = run(enforce_eager=True)
    assert llm.engine.core.runner.cache.fp8 and llm.engine.core.runner.graphs.replays
    assert llm.engine.stats.num_cached_tokens > 0
    assert graphs == eager


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny", "mistral-tiny"])
def test_fp8_logits_against_bf16(preset, checkpoints) -> None:
    """Bound stated before measuring: each cached K/V value moves by at most 2^-4 of itself (half an e4m3 ulp;
    bf16's half ulp is 2^-9), so attention outputs move by a few per cent of V's scale and, through two layers
    and the LM head, the logits by at most 15% of the largest logit (the bound the CPU test holds for float32).
    A greedy choice may flip only at a near-tie (float top-2 gap within twice the largest logit change), at no
    more than 20% of the positions."""
    import cupy

    from cupaged import device
    from cupaged.layers import cuda_ops
    from tests.helpers import load_model, relative_error, teacher_forced_logits

    device.set_device("cuda")
    model = load_model(checkpoints(preset, "bfloat16"), "bfloat16", cuda_ops, cupy)
    rng = np.random.default_rng(12)
    seqs = [rng.integers(0, 1000, n) for n in (5, 19, 40, 77, 300)]
    prompt_lens = [max(1, len(s) // 2) for s in seqs]
    exact = teacher_forced_logits(model, seqs, prompt_lens)
    got = teacher_forced_logits(model, seqs, prompt_lens, kv_cache_dtype="fp8")
    for x, y in zip(exact, got):
        assert np.isfinite(y).all() and not np.array_equal(x, y)
        err = relative_error(y, x)
        flips = x.argmax(-1) != y.argmax(-1)
        top2 = np.sort(x, axis=-1)[:, -2:]
        print(f"{preset}: logits error {err:.4f} of the largest, argmax flips {flips.mean():.3f}")
        assert err <= 0.15
        assert np.all(top2[flips, 1] - top2[flips, 0] <= 2 * np.abs(y - x).max())
        assert flips.mean() <= 0.2


def test_fp8_cache_holds_twice_the_tokens(checkpoints) -> None:
    """The same memory budget gives (head_dim + 1) / (2 head_dim) of the bytes per block, so ~2x the blocks."""
    from cupaged.engine.core import EngineCore

    path = str(checkpoints("qwen3-tiny", "bfloat16"))
    tokens = {}
    for kv in ("auto", "fp8"):
        core = EngineCore(path, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.05, enforce_eager=True,
                          max_num_seqs=8, kv_cache_dtype=kv)
        info = core.info()
        tokens[kv] = info.num_kv_blocks * info.block_size
        print(f"kv_cache_dtype={kv}: {info.num_kv_blocks} blocks, {tokens[kv]} tokens at most")
        del core
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    assert tokens["fp8"] >= 1.9 * tokens["auto"]
