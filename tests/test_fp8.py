"""FP8 (e4m3) KV cache on the CPU: the codec (exhaustively), per-row quantization, the reference attention over
an FP8 cache against float attention within a bound derived from the quantization error, and the engine with
kv_cache_dtype="fp8" (logits and greedy tokens against the float engine, prefix caching, preemption, options)."""

from __future__ import annotations

import numpy as np
import pytest

from cupaged import LLM, LLMEngine, SamplingParams
from cupaged.checkpoint import open_checkpoint
from cupaged.fp8 import (E4M3_MAX, decode_e4m3, dequantize_rows, encode_e4m3, exponent_scale, quantize_rows,
                         scale_exponents)
from cupaged.kv_cache import AttentionMetadata, KVCache
from cupaged.layers import reference
from tests.helpers import load_model, relative_error, run_to_end, teacher_forced_logits

PRESET = "qwen3-tiny"
CODES = np.arange(256, dtype=np.uint8)


def e4m3_value(code: int) -> float:
    """A code's value from the format's definition, in Python floats (independent of the bit arithmetic)."""
    sign = -1.0 if code & 0x80 else 1.0
    exp, mant = (code >> 3) & 0xF, code & 7
    if exp == 15 and mant == 7:
        return float("nan")
    return sign * (mant / 8 * 2.0 ** -6 if exp == 0 else (1 + mant / 8) * 2.0 ** (exp - 7))


# ---------------------------------------------------------------------------------------------------- codec
def test_every_code_decodes_to_its_value() -> None:
    expected = np.array([e4m3_value(int(c)) for c in CODES], dtype=np.float32)
    got = decode_e4m3(CODES)
    assert np.array_equal(np.isnan(got), np.isnan(expected)) and np.isnan(got).sum() == 2  # 0x7f, 0xff
    assert np.array_equal(got[~np.isnan(got)], expected[~np.isnan(expected)])
    assert np.nanmax(got) == E4M3_MAX and decode_e4m3(np.array([1], np.uint8))[0] == 2.0 ** -9


def test_every_value_and_midpoint_round_trips() -> None:
    finite = CODES[~np.isnan(decode_e4m3(CODES))]
    assert np.array_equal(encode_e4m3(decode_e4m3(finite)), finite)  # -0.0 -> 0x80 included
    # consecutive non-negative codes: their midpoint goes to the even code, anything off it to the nearer one
    pos = np.arange(0, 0x7E, dtype=np.uint8)
    lo, hi = decode_e4m3(pos), decode_e4m3(pos + 1)
    mid = ((lo.astype(np.float64) + hi) / 2).astype(np.float32)  # exact: a 4-bit mantissa fits float32
    even = np.where(pos % 2 == 0, pos, pos + 1).astype(np.uint8)
    assert np.array_equal(encode_e4m3(mid), even)
    assert np.array_equal(encode_e4m3(-mid), even | 0x80)
    assert np.array_equal(encode_e4m3(np.nextafter(mid, np.float32(0))), pos)
    assert np.array_equal(encode_e4m3(np.nextafter(mid, np.float32(np.inf))), pos + 1)


def test_saturation_and_nan() -> None:
    x = np.array([448.0, 463.9, 464.0, 1e6, np.inf, -np.inf, -1e30, np.nan, -np.nan, 1e-30, -1e-30, 2.0 ** -10],
                 dtype=np.float32)
    assert encode_e4m3(x).tolist() == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x7F, 0x7F, 0, 0x80, 0]


def test_random_floats_round_to_the_nearest_code() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * np.exp2(rng.uniform(-12, 9, 20000))).astype(np.float32)
    x = x[np.abs(x) <= E4M3_MAX]
    values = decode_e4m3(CODES[~np.isnan(decode_e4m3(CODES))])
    err = np.abs(decode_e4m3(encode_e4m3(x)).astype(np.float64) - x)
    best = np.min(np.abs(values[None, :].astype(np.float64) - x[:, None]), axis=1)
    assert np.array_equal(err, best)


def test_matches_torch_float8_e4m3fn() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(50000) * np.exp2(rng.uniform(-14, 9, 50000))).astype(np.float32)
    x = np.concatenate([x[np.abs(x) < 464], decode_e4m3(CODES[CODES != 0x7F])])  # torch gives NaN past 464
    ours = encode_e4m3(x)
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    same = (ours == theirs) | (np.isnan(decode_e4m3(ours)) & np.isnan(decode_e4m3(theirs)))
    assert same.all()
    assert np.array_equal(decode_e4m3(CODES)[CODES & 0x7F != 0x7F],
                          torch.from_numpy(CODES).view(torch.float8_e4m3fn).float().numpy()[CODES & 0x7F != 0x7F])


# ---------------------------------------------------------------------------------------------------- scales
def test_scale_is_the_smallest_power_of_two_that_fits() -> None:
    rng = np.random.default_rng(2)
    amax = np.abs(rng.standard_normal(5000) * np.exp2(rng.uniform(-30, 20, 5000))).astype(np.float32)
    amax = np.concatenate([amax, np.float32([448.0, 449.0, 1.0, 0.875, 896.0])])
    e = scale_exponents(amax)
    scale = exponent_scale(e).astype(np.float64)
    assert np.all(amax <= E4M3_MAX * scale) and np.all(amax > E4M3_MAX * scale / 2)
    assert exponent_scale(scale_exponents(np.float32([448.0, 449.0])).astype(np.uint8)).tolist() == [1.0, 2.0]
    assert scale_exponents(np.float32([0.0]))[0] == 1  # empty rows: the smallest scale, codes 0


@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 3e3])
def test_rows_quantize_within_half_an_ulp(magnitude: float) -> None:
    """Each value is off by at most half an e4m3 ulp of itself (2^-4 relative) or, below the normal range, half
    the smallest step, 2^-10 x the row's scale; nothing saturates, whatever the magnitude."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 128)) * magnitude).astype(np.float32)
    x[0, 0] = 40 * magnitude  # an outlier in one row
    codes, e = quantize_rows(x)
    back = dequantize_rows(codes, e)
    scale = exponent_scale(e)[:, None]
    assert np.all(np.abs(back - x) <= np.maximum(np.abs(x) * 2.0 ** -4, scale * 2.0 ** -10))
    assert np.all(np.abs(codes.astype(np.int32) & 0x7F) <= 0x7E)


# ---------------------------------------------------------------------------------------------------- attention
def attention_bound(q: np.ndarray, k: np.ndarray, v: np.ndarray, kq: np.ndarray, vq: np.ndarray,
                    scale: float) -> float:
    """A proven bound on |attention(q, kq, vq) - attention(q, k, v)| per output element, from the inputs alone:
    every score moves by at most d = scale * max_t |q| |kq_t - k_t| (Cauchy-Schwarz), so the softmax weights change
    by at most exp(2 d) - 1 in l1, which moves the output by (exp(2 d) - 1) max|v|; V's error adds max|vq - v|."""
    d = scale * np.linalg.norm(q, axis=-1).max() * np.linalg.norm(kq - k, axis=-1).max()
    return float((np.exp(2 * d) - 1) * np.abs(v).max() + np.abs(vq - v).max())


def test_reference_attention_over_an_fp8_cache_is_within_the_bound() -> None:
    rng = np.random.default_rng(4)
    heads, kv_heads, dim, bs, lens = 4, 2, 64, 8, [37, 5, 64]
    blocks = sum(-(-n // bs) for n in lens) + 2
    tables, first = [], 1
    for n in lens:
        tables.append(list(range(first, first + -(-n // bs))))
        first += len(tables[-1])
    k = [rng.standard_normal((n, kv_heads, dim)).astype(np.float32) * 0.3 for n in lens]
    v = [rng.standard_normal((n, kv_heads, dim)).astype(np.float32) for n in lens]
    q = rng.standard_normal((len(lens), heads, dim)).astype(np.float32)
    shape = (blocks, kv_heads, bs, dim)
    k_f, v_f = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)  # poisoned: unwritten slots
    k_8, v_8 = np.full(shape, 0x7F, np.uint8), np.full(shape, 0x7F, np.uint8)         # show up as NaN
    scales = (np.zeros((blocks, kv_heads, bs), np.uint8), np.zeros((blocks, kv_heads, bs), np.uint8))
    write = AttentionMetadata.build(lens, lens, tables, bs, np)
    reference.write_kv(np.concatenate(k), np.concatenate(v), k_f, v_f, write.slot_mapping)
    reference.write_kv(np.concatenate(k), np.concatenate(v), k_8, v_8, write.slot_mapping, kv_scales=scales)
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, bs, np)
    scale = dim ** -0.5
    exact = reference.paged_attention(q, k_f, v_f, meta, scale)
    got = reference.paged_attention(q, k_8, v_8, meta, scale, kv_scales=scales)
    for b in range(len(lens)):
        kq, vq = (dequantize_rows(*quantize_rows(x[b])) for x in (k, v))
        for h in range(heads):
            g = h // (heads // kv_heads)
            bound = attention_bound(q[b, h], k[b][:, g], v[b][:, g], kq[:, g], vq[:, g], scale)
            err = np.abs(got[b, h] - exact[b, h]).max()
            assert err <= bound, (b, h, err, bound)
            assert err > 0  # the cache really holds quantized values


# ---------------------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints(PRESET)


def test_cache_takes_half_the_bytes_and_holds_codes(path) -> None:
    config = open_checkpoint(path)[0]
    wide = KVCache.bytes_per_block(config, 16, np.float16)
    narrow = KVCache.bytes_per_block(config, 16, np.float16, "fp8")
    assert narrow * 2 * config.head_dim == wide * (config.head_dim + 1)  # a value a byte, plus a scale a row
    cache = KVCache(config, 3, 16, np.float32, np, "fp8_e4m3")
    assert cache.k.dtype == np.uint8 and cache.k_scale.shape == cache.k.shape[:-1] and cache.fp8
    assert KVCache(config, 3, 16, np.float32, np).scales(0) is None


def test_unknown_kv_cache_dtype_is_refused_by_name(path) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLMEngine(str(path), device="cpu", num_kv_blocks=16, kv_cache_dtype="int8")


def test_model_logits_with_fp8_kv_against_float(path) -> None:
    """Bound stated before measuring: each K/V value moves by at most 2^-4 of itself (half an e4m3 ulp), so each
    attention output moves by a few per cent of V's scale; through two layers' residual adds and the LM head that
    stays under 15% of the largest logit. Greedy choice may flip only where the float engine's top two logits are
    closer than twice the largest logit change (a near-tie), and most positions (>= 80%) keep their argmax."""
    model = load_model(path, "float32", reference, np)
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, model.config.vocab_size, n) for n in (40, 23, 57)]
    prompt_lens = [20, 10, 30]
    exact = teacher_forced_logits(model, seqs, prompt_lens)
    got = teacher_forced_logits(model, seqs, prompt_lens, kv_cache_dtype="fp8")
    for x, y in zip(exact, got):
        assert relative_error(y, x) <= 0.15
        assert not np.array_equal(x, y)
        flips = x.argmax(-1) != y.argmax(-1)
        top2 = np.sort(x, axis=-1)[:, -2:]
        assert np.all(top2[flips, 1] - top2[flips, 0] <= 2 * np.abs(y - x).max())
        assert flips.mean() <= 0.2


def test_engine_with_fp8_kv_prefix_caching_and_preemption(path) -> None:
    """The FP8 engine under preemption (24 blocks for 10 requests) and with prefix-cache hits gives the tokens the
    same FP8 engine gives one request at a time with a roomy cache and no prefix caching: quantization is per row, so a row's codes
    do not depend on the batch, the chunking or the block it lands in."""
    rng = np.random.default_rng(6)
    shared = rng.integers(0, 900, 40).tolist()
    prompts = [shared + rng.integers(0, 900, int(rng.integers(3, 30))).tolist() for _ in range(10)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = LLM(str(path), device="cpu", num_kv_blocks=64, kv_cache_dtype="fp8", enable_prefix_caching=False)
    expected = [alone.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    engine = LLMEngine(str(path), device="cpu", num_kv_blocks=24, max_num_batched_tokens=64, max_num_seqs=12,
                       kv_cache_dtype="fp8")
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = run_to_end(engine)
    assert engine.stats.num_preemptions > 0
    assert engine.stats.num_cached_tokens > 0
    assert [done[str(i)].outputs[0].token_ids for i in range(len(prompts))] == expected
    assert engine.core.info().kv_cache_dtype == "fp8_e4m3"


def test_fp8_engine_forks_share_blocks_copy_on_write(path) -> None:
    """n=3 samples fork a shared last block: copy-on-write copies codes and scales; seeded samples reproduce."""
    params = SamplingParams(temperature=1.0, n=3, max_tokens=12, seed=3, ignore_eos=True)
    llm = LLM(str(path), device="cpu", num_kv_blocks=64, kv_cache_dtype="fp8")
    prompt = list(range(5, 26))
    first = [o.token_ids for o in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    again = [o.token_ids for o in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    assert first == again and len(first) == 3
