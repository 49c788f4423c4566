"""Shared KV blocks never leak one sequence's tokens into another's.

A fake cache stores, in each slot, what real K/V depends on: the token written there and every token before it
(a hash of the prefix). Random programs of appends, forks, frees and
prefix-cache hits run against the block manager; after every operation each live sequence must read back
exactly its own tokens through its block table.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.sequence import Sequence
from cupaged.sampling_params import SamplingParams

ops = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free"]), st.integers(0, 10**6)),
               min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(program=ops, block_size=st.sampled_from([2, 4, 8]), caching=st.booleans())
def test_copy_on_write_and_prefix_cache_keep_sequences_apart(program, block_size, caching) -> None:
    blocks = BlockManager(num_blocks=48, block_size=block_size, enable_prefix_caching=caching)
    cache = np.full(48 * block_size, -1, dtype=np.int64)  # slot -> identity of the prefix ending there

    def kv(seq: Sequence, pos: int) -> int:
        return hash(tuple(seq.token_ids[:pos + 1]))

    live: list[Sequence] = []

    def compute(seq: Sequence, upto: int) -> bool:
        """Write seq's tokens num_computed..upto into the cache, copying shared blocks first."""
        if blocks.blocks_missing(seq, upto) > blocks.num_free:
            return False
        for src, dst in blocks.allocate(seq, upto):
            cache[dst * block_size:(dst + 1) * block_size] = cache[src * block_size:(src + 1) * block_size]
        for pos in range(seq.num_computed_tokens, upto):
            slot = seq.block_table[pos // block_size] * block_size + pos % block_size
            cache[slot] = kv(seq, pos)
        seq.num_computed_tokens = upto
        blocks.register_full_blocks(seq)
        return True

    for op, r in program:
        rnd = np.random.default_rng(r)
        if op == "new" or not live:
            # prompts from a small alphabet share prefixes often, so the prefix cache gets hits
            seq = Sequence("r", rnd.integers(0, 3, int(rnd.integers(1, 20))).tolist(), SamplingParams())
            blocks.take_cached_prefix(seq, blocks.cached_prefix(seq))
            if compute(seq, seq.num_tokens):
                live.append(seq)
            else:
                blocks.free(seq)
        elif op == "append":
            seq = live[r % len(live)]
            seq.token_ids.append(int(rnd.integers(0, 3)))
            if not compute(seq, seq.num_tokens):
                seq.token_ids.pop()
        elif op == "fork":
            parent = live[r % len(live)]
            child = parent.fork(len(live))
            blocks.fork(parent, child)
            live.append(child)
        else:
            blocks.free(live.pop(r % len(live)))
        owners: dict[int, int] = {}
        for seq in live:
            slots = [seq.block_table[p // block_size] * block_size + p % block_size for p in range(seq.num_tokens)]
            assert cache[slots].tolist() == [kv(seq, p) for p in range(seq.num_tokens)], \
                "a sequence reads K/V it did not write"
            for b in seq.block_table:
                owners[b] = owners.get(b, 0) + 1
        assert all(blocks.ref_counts[b] == n for b, n in owners.items())
        assert blocks.num_free + len(owners) == blocks.num_blocks


def test_prefix_cache_hit_and_lru_eviction() -> None:
    blocks = BlockManager(num_blocks=4, block_size=2)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    blocks.allocate(a, 5)
    a.num_computed_tokens = 5
    blocks.register_full_blocks(a)
    blocks.free(a)  # its blocks stay cached
    b = Sequence("b", [1, 2, 3, 4, 9], SamplingParams())
    hit = blocks.cached_prefix(b)
    assert len(hit) == 2  # [1,2] and [3,4]; never the block holding the last token
    c = Sequence("c", [7, 7, 7, 7, 7, 7, 7, 7], SamplingParams())
    blocks.allocate(c, 8)  # takes all four blocks: the cached ones are evicted
    assert blocks.cached_prefix(b) == []
