"""Piecewise steps (engine/piecewise_graphs.py) run eagerly on NumPy: padding a mixed step to a fixed token count and
cutting the forward at attention change nothing, in the logits or in the KV cache."""

from __future__ import annotations

import numpy as np

from cupaged.engine.piecewise_graphs import PiecewiseSteps, token_sizes
from cupaged.kv_cache import AttentionMetadata, KVCache
from cupaged.layers import reference
from tests.helpers import load_model


def test_token_sizes_pad_by_at_most_half_above_256() -> None:
    sizes = token_sizes(8192)
    assert sizes[:5] == [16, 32, 64, 128, 256] and sizes[-1] == 8192 and sizes == sorted(set(sizes))
    assert all(b <= 1.5 * a for a, b in zip(sizes[4:], sizes[5:]))
    assert token_sizes(100)[-1] == 100 and token_sizes(16) == [16]


def test_pieces_give_the_forward_s_logits_and_cache(checkpoints) -> None:
    model = load_model(checkpoints("qwen3-tiny"), "float32", reference, np)
    rng = np.random.default_rng(5)
    # two prefills (one after a cached prefix of 16 tokens) then three decodes; blocks shuffled
    query_lens, seq_lens = [21, 9, 1, 1, 1], [21, 25, 7, 30, 17]
    physical = rng.permutation(40).tolist()
    tables, first = [], 0
    for n in seq_lens:
        tables.append(physical[first:first + -(-n // 16)])
        first += len(tables[-1])
    caches = []
    for _ in range(2):
        cache = KVCache(model.config, 40, 16, np.float32, np)
        cache.k[...] = rng.standard_normal(cache.k.shape) if not caches else caches[0].k
        cache.v[...] = rng.standard_normal(cache.v.shape) if not caches else caches[0].v
        caches.append(cache)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, 16, np)
    ids = rng.integers(0, model.config.vocab_size, sum(query_lens)).astype(np.int32)
    sample_rows = (np.cumsum(query_lens) - 1).tolist()

    expected = model.logits(model.forward(ids, meta, caches[0])[sample_rows])
    pieces = PiecewiseSteps(model, caches[1], max_tokens=64, max_seqs=8, xp=np, capture=False)
    assert pieces.padded(len(ids)) == 64  # 33 tokens: 31 padding rows
    got = pieces.run(ids, meta, sample_rows, [], None)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(caches[1].k, caches[0].k)  # the padding rows wrote nothing
    np.testing.assert_array_equal(caches[1].v, caches[0].v)


def test_pending_tokens_are_patched_in(checkpoints) -> None:
    """A decode whose input token is still on the device (async scheduling) reads it from there."""
    model = load_model(checkpoints("qwen3-tiny"), "float32", reference, np)
    cache = KVCache(model.config, 8, 16, np.float32, np)
    cache.k[...] = 0.5
    cache.v[...] = 0.25
    meta = AttentionMetadata.build([3, 1], [3, 5], [[0], [1]], 16, np)
    pieces = PiecewiseSteps(model, cache, max_tokens=32, max_seqs=4, xp=np, capture=False)
    patched = pieces.run(np.array([4, 5, 6, -1], np.int32), meta, [2, 3], [(3, 1)], np.array([0, 77], np.int32))
    plain = model.logits(model.forward(np.array([4, 5, 6, 77], np.int32), meta, cache)[[2, 3]])
    np.testing.assert_allclose(patched, plain, rtol=1e-5, atol=1e-5)
