"""The pool of physical KV blocks: a free list and a reference count per block.

A sequence grows its block table one block at a time as its tokens need slots, and returns its blocks when it
finishes or is preempted. Reference counts let blocks be shared between sequences (prefix caching,
copy-on-write): a block goes back to the free list only when its last owner lets go.
"""

from __future__ import annotations

from collections import deque

from cupaged.engine.sequence import Sequence


class OutOfBlocks(RuntimeError):
    """Asked for more KV blocks than are free (the scheduler checks first; this is a bug guard)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

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
        """How many more blocks seq needs to hold num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold num_tokens tokens."""
        missing = self.blocks_missing(seq, num_tokens)
        if missing > len(self.free_blocks):
            raise OutOfBlocks(f"{seq} needs {missing} blocks, {len(self.free_blocks)} free")
        for _ in range(missing):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks (last block first, so recently used blocks are reused last)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []
