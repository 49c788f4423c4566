"""The pool of physical KV blocks: a free list, reference counts, and the prefix cache.

A sequence grows its block table one block at a time as its tokens need slots, and returns its blocks when it
finishes or is preempted. Blocks are shared by reference count:
- Prefix caching: once a block is full, it is registered under a hash of its tokens and of every token before
  it. A new sequence whose prompt starts with the same tokens takes those blocks instead of computing them.
  A freed block keeps its contents and stays findable until it is reused; reuse takes the least recently
  freed block first (LRU eviction).
- Forking (parallel sampling, beam search): a child shares all of its parent's blocks. Full blocks are never
  written again, so only the last, partly filled block can be written by two owners: `copy_on_write` gives
  the writer its own copy first.
"""

from __future__ import annotations

from collections import OrderedDict

from cupaged.engine.sequence import Sequence


class OutOfBlocks(RuntimeError):
    """Asked for more KV blocks than are free (the scheduler checks first; this is a bug guard)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}     # content hash -> block holding it

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks seq needs to hold num_tokens tokens (counting a copy-on-write copy)."""
        missing = max(0, self.blocks_for(num_tokens) - len(seq.block_table))
        return missing + (1 if self._shared_tail(seq, num_tokens) is not None else 0)

    def _take(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:  # evict its cached contents
            if self.cached.get(old) == block:
                del self.cached[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Grow seq's block table to hold num_tokens tokens.

        Returns the (source, destination) block copies that must run before seq writes (copy-on-write).
        """
        if self.blocks_missing(seq, num_tokens) > len(self.free_blocks):
            raise OutOfBlocks(f"{seq} needs {self.blocks_missing(seq, num_tokens)} blocks, {self.num_free} free")
        copies = []
        tail = self._shared_tail(seq, num_tokens)
        if tail is not None:
            old = seq.block_table[tail]
            new = self._take()
            self.ref_counts[old] -= 1
            seq.block_table[tail] = new
            copies.append((old, new))
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._take())
        return copies

    def _shared_tail(self, seq: Sequence, num_tokens: int) -> int | None:
        """Index of the block seq's next token is written into, if another sequence also owns it."""
        index = seq.num_computed_tokens // self.block_size
        if num_tokens > seq.num_computed_tokens and index < len(seq.block_table):
            if self.ref_counts[seq.block_table[index]] > 1:
                return index
        return None

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks, last block first (so a prompt's tail is evicted before its head)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.block_hashes = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let child share every block of parent."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        for block in child.block_table:
            self.ref_counts[block] += 1

    # -- prefix caching ---------------------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int, start: int = 0, parent: int | None = None) -> list[int]:
        """Chained hashes of seq's full blocks start..num_blocks-1: each covers its tokens and all before."""
        out, bs = [], self.block_size
        for i in range(start, num_blocks):
            parent = hash((parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
            out.append(parent)
        return out

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of seq (never its last token, whose logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take_cached_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Give a sequence with no blocks the cached prefix found by cached_prefix."""
        for block in blocks:
            self.free_blocks.pop(block, None)
            self.ref_counts[block] += 1
        seq.block_table = list(blocks)
        seq.block_hashes = [self.block_hash[b] for b in blocks]
        seq.num_computed_tokens = len(blocks) * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make seq's newly filled and computed blocks findable by later sequences."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= len(seq.block_hashes):
            return
        start = len(seq.block_hashes)
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i, h in enumerate(self._hashes(seq, full, start, parent), start):
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and self.block_hash[block] is None:
                self.cached[h] = block
                self.block_hash[block] = h
