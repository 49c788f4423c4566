"""The fused q|k|v kernel (cuda/qkv_rotary_cache.cu: bias, q/k norms, rotary, the K/V write) on the GPU.

Against the reference composition (layers/reference.qkv_rotary_cache) on fresh random inputs, q poisoned by the
memory pool and the caches full of random values and NaN blocks: written rows must match, every other cache
byte must be untouched. Against the separate CUDA kernels it replaces: the same bits. And the engine's greedy
tokens with and without it.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupaged import LLM, SamplingParams
from cupaged.fp8 import dequantize_rows
from test_kernels_gpu import close, llama3_cos_sin, rand

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_memory_pool")]

DTYPES = ["float32", "float16", "bfloat16"]
# (query heads, KV heads, head_dim): GQA ratios 1, 2, 3, 4, 7 and every head_dim the kernel takes
SHAPES = [(16, 8, 128), (32, 8, 128), (4, 1, 64), (8, 8, 256), (14, 2, 64), (6, 2, 32)]
FP8_TOLERANCE = 2e-2  # dequantized rows: a bf16 ulp of difference before quantizing may move a code one step
MAX_POS = 4096


@pytest.fixture(autouse=True)
def release_gpu_memory():
    yield
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()


class Case:
    """Random inputs of one call, and caches of random values with NaN blocks (codes and scales for FP8)."""

    def __init__(self, dtype: str, heads: int, kv_heads: int, head_dim: int, tokens: int, bias: bool, norm: bool,
                 fp8: bool, block_size: int = 16):
        import cupy

        rng = np.random.default_rng()
        self.heads, self.kv_heads, self.head_dim, self.block_size = heads, kv_heads, head_dim, block_size
        width = (heads + 2 * kv_heads) * head_dim
        self.qkv = rand((tokens, width), dtype, rng)
        self.bias = rand((width,), dtype, rng, scale=0.5) if bias else None
        self.q_norm = rand((head_dim,), dtype, rng) if norm else None
        self.k_norm = rand((head_dim,), dtype, rng) if norm else None
        self.cos_sin = llama3_cos_sin(head_dim, MAX_POS)
        self.positions = cupy.asarray(rng.integers(0, MAX_POS, tokens).astype(np.int32))
        blocks = 2 * -(-tokens // block_size) + 3
        slots = rng.permutation(blocks * block_size)[:tokens].astype(np.int32)
        if tokens > 2:
            slots[1] = slots[tokens - 2] = -1  # padding rows: not written
        self.slots = slots
        shape = (blocks, kv_heads, block_size, head_dim)
        if fp8:
            self.caches = [cupy.asarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(2)]
            self.scales = tuple(cupy.asarray(rng.integers(100, 140, shape[:3], dtype=np.uint8)) for _ in range(2))
        else:
            self.caches = [rand(shape, dtype, rng) for _ in range(2)]
            for cache in self.caches:
                cache[rng.integers(0, blocks)] = np.nan
            self.scales = None

    def run(self, ops, caches, scales):
        import cupy

        return ops.qkv_rotary_cache(self.qkv, self.heads, self.kv_heads, self.positions, self.cos_sin, caches[0],
                                    caches[1], cupy.asarray(self.slots), bias=self.bias, q_norm=self.q_norm,
                                    k_norm=self.k_norm, eps=1e-6, kv_scales=scales)

    def copies(self):
        return [c.copy() for c in self.caches], None if self.scales is None else tuple(s.copy() for s in self.scales)

    def written(self) -> tuple[np.ndarray, np.ndarray]:
        kept = self.slots[self.slots >= 0]
        return kept // self.block_size, kept % self.block_size


def bits(a) -> np.ndarray:
    a = np.ascontiguousarray(a.get())
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(f"u{a.dtype.itemsize}")


def run_both(case: Case, ops):
    """(q, caches, scales) of the kernel and of the reference, each on copies of the case's caches."""
    from cupaged.layers import reference

    got_caches, got_scales = case.copies()
    want_caches, want_scales = case.copies()
    got_q = case.run(ops, got_caches, got_scales)
    want_q = case.run(reference, want_caches, want_scales)
    return (got_q, got_caches, got_scales), (want_q, want_caches, want_scales)


def assert_untouched_outside_slots(case: Case, caches, scales) -> None:
    blocks, offsets = case.written()
    keep = np.ones(case.caches[0].shape[0:1] + case.caches[0].shape[2:3], bool)  # [blocks, block_size]
    keep[blocks, offsets] = False
    for before, after in zip(case.caches + list(case.scales or ()), list(caches) + list(scales or ())):
        b, a = bits(before), bits(after)
        assert np.array_equal(b.transpose(0, 2, 1, *range(3, b.ndim))[keep],
                              a.transpose(0, 2, 1, *range(3, a.ndim))[keep]), "a slot outside slot_mapping changed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", SHAPES)
@pytest.mark.parametrize("bias, norm", [(False, False), (False, True), (True, False), (True, True)])
def test_matches_the_reference_composition(ops, dtype, heads, kv_heads, head_dim, bias, norm) -> None:
    tokens = [1, 7, 37][(heads + head_dim) % 3]
    case = Case(dtype, heads, kv_heads, head_dim, tokens, bias, norm, fp8=False)
    assert ops._fused_qkv_supported(case.qkv, head_dim, case.bias, case.q_norm, case.k_norm)
    (q, caches, _), (want_q, want_caches, _) = run_both(case, ops)
    assert q.shape == (tokens, heads, head_dim) and q.flags.c_contiguous
    close(q, want_q, dtype)
    blocks, offsets = case.written()
    for got, want in zip(caches, want_caches):
        close(got[blocks, :, offsets], want[blocks, :, offsets], dtype)
    assert_untouched_outside_slots(case, caches, None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim, block_size", [(64, 8), (128, 16), (256, 2)])
@pytest.mark.parametrize("bias, norm", [(False, False), (False, True), (True, False)])
def test_fp8_cache_matches_the_reference_composition(ops, dtype, head_dim, block_size, bias, norm) -> None:
    case = Case(dtype, 8, 2, head_dim, 21, bias, norm, fp8=True, block_size=block_size)
    (q, caches, scales), (want_q, want_caches, want_scales) = run_both(case, ops)
    close(q, want_q, dtype)
    blocks, offsets = case.written()
    for got, got_s, want, want_s in zip(caches, scales, want_caches, want_scales):
        a = dequantize_rows(got[blocks, :, offsets].get(), got_s[blocks, :, offsets].get())
        e = dequantize_rows(want[blocks, :, offsets].get(), want_s[blocks, :, offsets].get())
        assert np.isfinite(a).all()
        assert np.linalg.norm(a - e) / np.linalg.norm(e) < FP8_TOLERANCE
    assert_untouched_outside_slots(case, caches, scales)


@pytest.mark.parametrize("dtype, fp8", [("float32", False), ("float16", False), ("bfloat16", False),
                                        ("float16", True), ("bfloat16", True)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 8, 128), (4, 1, 64), (6, 2, 32), (8, 8, 256)])
@pytest.mark.parametrize("norm", [False, True])
def test_same_bits_as_the_separate_kernels(ops, monkeypatch, dtype, fp8, heads, kv_heads, head_dim, norm) -> None:
    """Without a bias (whose add the separate path leaves to CuPy) the kernel rounds where the separate kernels
    store and sums squares in norm.cu's order: the same bits, for head_dim <= 32 x 16-byte vectors."""
    if dtype == "float32" and head_dim > 128 or fp8 and head_dim == 32:
        pytest.skip("outside the bit-exact range (float32) or the FP8 kernels' head sizes")
    case = Case(dtype, heads, kv_heads, head_dim, 13, False, norm, fp8)
    fused_caches, fused_scales = case.copies()
    fused_q = case.run(ops, fused_caches, fused_scales)
    monkeypatch.setattr(ops, "FUSED_QKV", False)
    separate_caches, separate_scales = case.copies()
    separate_q = case.run(ops, separate_caches, separate_scales)
    assert np.array_equal(bits(fused_q), bits(separate_q))
    for a, b in zip(fused_caches + list(fused_scales or ()), separate_caches + list(separate_scales or ())):
        assert np.array_equal(bits(a), bits(b))


def test_shapes_outside_the_kernel_run_through_the_separate_ops(ops) -> None:
    """head_dim 12 is no whole number of 16-byte vectors: the composition of the separate ops runs instead."""
    case = Case("float32", 2, 2, 12, 9, True, True, fp8=False)
    assert not ops._fused_qkv_supported(case.qkv, 12, case.bias, case.q_norm, case.k_norm)
    (q, caches, _), (want_q, want_caches, _) = run_both(case, ops)
    close(q, want_q, "float32")
    blocks, offsets = case.written()
    for got, want in zip(caches, want_caches):
        close(got[blocks, :, offsets], want[blocks, :, offsets], "float32")


@pytest.mark.parametrize("preset, kv_cache_dtype", [("qwen3-tiny", "auto"), ("llama3-tiny", "auto"),
                                                    ("qwen3-tiny", "fp8")])
def test_engine_greedy_tokens_equal_the_separate_kernels(ops, monkeypatch, checkpoints, preset,
                                                         kv_cache_dtype) -> None:
    """bf16 engine, CUDA graphs (decode and piecewise), prefills and decodes: the same greedy tokens with the fused
    kernel as with the separate ones, and the fused one did run."""
    from cupaged import kernels

    path = str(checkpoints(preset, "bfloat16"))
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 1000, int(rng.integers(2, 90))).tolist() for _ in range(12)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    sources: set[str] = set()

    def spy(filename: str, name: str, options: tuple[str, ...] = ()):
        sources.add(filename)
        return kernels.kernel(filename, name, options)

    monkeypatch.setattr(ops, "kernel", spy)

    def generate() -> list[list[int]]:
        llm = LLM(path, device="cuda", dtype="bfloat16", num_kv_blocks=256, max_num_seqs=8,
                  kv_cache_dtype=kv_cache_dtype)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    fused = generate()
    assert "qkv_rotary_cache.cu" in sources and "rotary.cu" not in sources
    monkeypatch.setattr(ops, "FUSED_QKV", False)
    sources.clear()
    separate = generate()
    assert "rotary.cu" in sources and "qkv_rotary_cache.cu" not in sources
    assert fused == separate
