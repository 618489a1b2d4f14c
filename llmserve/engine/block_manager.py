"""Hands out fixed-size KV-cache blocks to sequences on demand (PagedAttention).

A sequence holds ``ceil(num_tokens / block_size)`` blocks, listed in order in its block table; it grows
one block at a time and returns every block the moment it finishes, is preempted or is aborted, so
at most one partly filled block per sequence is ever wasted. Reference counts are kept so blocks can
later be shared (prefix caching, parallel samples).
"""

from __future__ import annotations

from collections import deque

from llmserve.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (vLLM's kv_cache_usage_perc)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens. All or nothing: False if too few blocks are free."""
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > len(self.free_blocks):
            return False
        for _ in range(needed):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq`` (last first, so the next sequence reuses cache-warm blocks)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_blocks.appendleft(block)
        seq.block_table = []
