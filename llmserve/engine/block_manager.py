"""Hands out fixed-size KV-cache blocks to sequences on demand (PagedAttention), and shares them.

A sequence holds ``ceil(num_tokens / block_size)`` blocks in each KV-cache group, listed in order in that
group's block table; it grows one block at a time and returns every block the moment it finishes, is
preempted or is aborted, so at most one partly filled block per sequence and group is wasted.

Sharing, by reference count:

- **Prefix caching.** Every full block is named by a chained SHA-256 of (parent block's hash, its token
  ids); the chain starts from the sequence's extra keys (a cache salt, later an adapter), so sequences
  with different keys never share KV even for the same tokens. A collision would need a SHA-256
  collision, so a hit never serves wrong KV. A new sequence takes
  every cached block of its longest cached prefix and computes only the rest. Freed blocks keep their
  hash and stay reusable until a new allocation needs them; the free pool is LRU-ordered (freed
  sequences give their tail blocks first), so the least recently used cached blocks are evicted first.
- **Parallel samples.** ``fork`` gives a child the parent's blocks; the first write into a shared,
  partly filled block copies it first (copy-on-write). The copy is recorded in ``pending_copies`` and
  done by the model runner before the next forward.

KV-cache groups (vLLM's ``KVCacheGroupSpec``): ``group_windows`` gives each group's window (None: full
attention). A block id holds the K/V of one group's layers only, so a sequence has one block table per group
(``Sequence.block_tables``), all of one length and all drawn from the one pool; ``allocate`` counts them
together. A model whose attention layers all see alike has one group.

Sliding windows (vLLM's ``SlidingWindowManager``). A query at position ``p`` sees keys
``p - window < j <= p``, so once a sequence's next token to compute is at ``c``, every block of a sliding
group ending before ``c - window + 1`` is dead for every future query of it (K/V are never recomputed in
place: preemption drops the whole table). ``allocate`` hands those blocks back before growing the tables;
their entries become :data:`NULL_BLOCK` placeholders (``Sequence.num_released[g]`` of them, always a
prefix), which no backend reads since each starts its keys at the window. A sliding group's table thus holds
at most ``ceil((window - 1) / block_size) + 1`` blocks while the sequence decodes (plus those of the tokens
scheduled with it: a prefill chunk, drafts). Released blocks keep their prefix-cache hash; a prefix hit is
the longest prefix every group can serve (:meth:`BlockManager.match_prefix`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from llmserve.engine.messages import BlockMap
from llmserve.engine.sequence import Sequence

_ROOT_HASH = b"llmserve-prefix-root"
# What a block-table entry handed back out of the window holds: any valid id (the workers may read it and
# mask it out, never use it).
NULL_BLOCK = 0


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + np.asarray(token_ids, dtype=np.int64).tobytes()).digest()


def chain_root(extra_keys: bytes) -> bytes:
    """The parent hash of a sequence's first block: the root, or a hash of the root and its extra keys."""
    return hashlib.sha256(_ROOT_HASH + extra_keys).digest() if extra_keys else _ROOT_HASH


def most_blocks_held(block_size: int, group_windows: Iterable[int | None], num_prompt_tokens: int,
                     num_tokens: int, max_step_tokens: int, chunked_prefill: bool, lookahead: int = 0) -> int:
    """The most blocks a sequence of ``num_tokens`` tokens holds at once, over every KV-cache group: all of
    them in a full group; in a sliding group, those of the window of a step's first token and of the step
    (at most ``max_step_tokens``; the whole prompt in its first step without chunked prefill). ``lookahead``:
    the slots a draft model writes after a step's tokens, reserved with them in every group."""
    blocks = -(-(num_tokens + lookahead) // block_size)
    total = 0
    for window in group_windows:
        if window is None:
            total += blocks
            continue
        held = -(-(window - 1 + max_step_tokens + lookahead) // block_size) + 1
        if not chunked_prefill:
            held = max(held, -(-num_prompt_tokens // block_size))
        total += min(blocks, held)
    return total


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 group_windows: Iterable[int | None] = (None,)) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        if not group_windows:
            raise ValueError("the KV cache needs at least one group")
        for window in group_windows:
            if window is not None and window < 1:
                raise ValueError(f"a group's window must be a positive number of tokens (or None), got {window}")
        self.group_windows = list(group_windows)
        self._single_full_group = self.group_windows == [None]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))   # LRU first
        self.ref_counts = [0] * num_blocks
        # A cached block is named by (its group, its chained hash): a block id holds one group's K/V only.
        self.block_hash: list[tuple[int, bytes] | None] = [None] * num_blocks
        self.cached: dict[tuple[int, bytes], int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (vLLM's kv_cache_usage_perc); cached-but-free blocks count as free."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def block_map(self, max_cells: int) -> BlockMap:
        """Each block in use, cached-but-free or free, counted per cell of at most ``max_cells`` cells."""
        in_use = np.asarray(self.ref_counts) > 0
        cached = np.fromiter((h is not None for h in self.block_hash), bool, self.num_blocks) & ~in_use
        per_cell = -(-self.num_blocks // max_cells)
        cells = -(-self.num_blocks // per_cell)

        def per_cell_counts(mask: np.ndarray) -> list[int]:
            return np.pad(mask, (0, cells * per_cell - self.num_blocks)).reshape(cells, per_cell).sum(1).tolist()

        return BlockMap(per_cell, per_cell_counts(in_use), per_cell_counts(cached))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_dead_blocks(self, num_computed_tokens: int, group: int = 0) -> int:
        """Leading blocks of ``group`` no query from ``num_computed_tokens`` on can see (0 in a full group):
        those whose last position is before the window of the query at ``num_computed_tokens``."""
        window = self.group_windows[group]
        if window is None:
            return 0
        return max(0, num_computed_tokens - window + 1) // self.block_size

    # ------------------------------------------------------------------ prefix caching
    def match_prefix(self, seq: Sequence) -> int:
        """Give a block-less sequence the cached blocks of its longest cached prefix; returns the tokens hit.

        At least one token is left to compute, since the step that computes it produces the next logits.
        """
        if not self.enable_prefix_caching or seq.block_tables or seq.needs_every_prompt_position:
            # Prompt logprobs and mean / first-token pooling read the output at cached positions too, which
            # the cache does not keep (vLLM skips the cache for prompt logprobs too); their blocks are still
            # published for the requests after them.
            return 0
        hashes = self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        blocks = [[self.cached.get((g, h)) for h in hashes] for g in range(len(self.group_windows))]
        num_hit = self._longest_hit(blocks)
        seq.block_tables, seq.num_released = [], []
        for g, group_blocks in enumerate(blocks):
            dead = self.num_dead_blocks(num_hit * self.block_size, g)
            hit = group_blocks[dead:num_hit]
            for block in hit:
                self._take(block)
            seq.block_tables.append([NULL_BLOCK] * dead + hit)
            seq.num_released.append(dead)
        seq.num_computed_tokens = num_hit * self.block_size
        return seq.num_computed_tokens

    def _longest_hit(self, blocks: list[list[int | None]]) -> int:
        """The longest prefix, in blocks, that every group can serve from ``blocks`` (per group, each full
        block's cached copy, or None), as vLLM's ``HybridKVCacheCoordinator`` intersects them: a full group
        needs its cached blocks from the start; a sliding group only those from the window of the prefix's
        first uncomputed token on (vLLM's sliding-window hit: earlier ones may have been evicted)."""
        limit = len(blocks[0])
        sliding: list[tuple[int, list[int]]] = []   # (group, where the run of cached blocks through i starts)
        for g, group_blocks in enumerate(blocks):
            if self.group_windows[g] is None:
                limit = min(limit, next((i for i, b in enumerate(group_blocks) if b is None), limit))
                continue
            run_starts, start = [], 0
            for i, block in enumerate(group_blocks):
                start = i + 1 if block is None else start
                run_starts.append(start)
            sliding.append((g, run_starts))
        for k in range(limit, 0, -1):
            if all(run_starts[k - 1] <= self.num_dead_blocks(k * self.block_size, g) for g, run_starts in sliding):
                return k
        return 0

    def record_prefix_query(self, num_tokens: int, num_hit: int) -> None:
        """Count one admitted sequence's prompt lookup (vLLM counts tokens)."""
        self.prefix_query_tokens += num_tokens
        self.prefix_hit_tokens += num_hit

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of ``seq``'s blocks that became full with computed K/V this step."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_published_blocks:
            return
        hashes = self._block_hashes(seq, num_full)
        for g, table in enumerate(seq.block_tables):
            for i in range(max(seq.num_published_blocks, seq.num_released[g]), num_full):
                block, key = table[i], (g, hashes[i])
                if self.block_hash[block] is None and key not in self.cached:
                    self.cached[key] = block
                    self.block_hash[block] = key
        seq.num_published_blocks = num_full

    def _block_hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The chained hashes of ``seq``'s first ``count`` full blocks (computed once, kept on the sequence)."""
        hashes = seq.block_hashes
        bs = self.block_size
        tokens = seq.all_token_ids
        while len(hashes) < count:
            i = len(hashes)
            parent = hashes[-1] if hashes else chain_root(seq.extra_hash_keys)
            hashes.append(chain_hash(parent, tokens[i * bs:(i + 1) * bs]))
        return hashes[:count]

    # ------------------------------------------------------------------ allocation
    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block tables to hold ``num_tokens`` tokens, copying a shared partly filled block
        before it is written. First hands back the blocks that left a sliding group's window (always safe).
        All or nothing otherwise: False (and no other change) if too few blocks are free for every group."""
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.group_windows]
            seq.num_released = [0] * len(self.group_windows)
        first_write = seq.num_computed_tokens // self.block_size
        wanted = self.blocks_for(num_tokens)
        if self._single_full_group:   # most decode steps: the blocks are held and the one written is its own
            table = seq.block_tables[0]
            if wanted <= len(table) and (first_write >= len(table) or self.ref_counts[table[first_write]] <= 1):
                return True
        self.release_out_of_window(seq)
        copies = [first_write < len(table) and self.ref_counts[table[first_write]] > 1 for table in seq.block_tables]
        needed = sum(max(0, wanted - len(table)) + copy for table, copy in zip(seq.block_tables, copies))
        if needed > len(self.free_blocks):
            return False
        for table, copy_on_write in zip(seq.block_tables, copies):
            if copy_on_write:
                shared = table[first_write]
                table[first_write] = self._pop_free()
                self.ref_counts[shared] -= 1
                self.pending_copies.append((shared, table[first_write]))
                seq.num_sent_blocks = min(seq.num_sent_blocks, first_write)   # the workers' tables change there
            table.extend(self._pop_free() for _ in range(wanted - len(table)))
        return True

    def release_out_of_window(self, seq: Sequence) -> None:
        """Hand back ``seq``'s blocks that no query of their group can see any more; they stay in the prefix
        cache."""
        for g, table in enumerate(seq.block_tables):
            dead = min(self.num_dead_blocks(seq.num_computed_tokens, g), len(table))
            for i in range(seq.num_released[g], dead):
                self._release(table[i])
                table[i] = NULL_BLOCK
            seq.num_released[g] = max(seq.num_released[g], dead)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (whose K/V it has) until it writes its own."""
        child.block_tables = [list(table) for table in parent.block_tables]
        child.num_released = list(parent.num_released)
        for table, released in zip(child.block_tables, child.num_released):
            for block in table[released:]:
                self.ref_counts[block] += 1
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        child.num_published_blocks = parent.num_published_blocks

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq``; blocks nobody else holds go to the free pool, tail blocks first."""
        for table, released in zip(seq.block_tables, seq.num_released):
            for block in reversed(table[released:]):
                self._release(block)
        seq.block_tables = []
        seq.num_released = []
        seq.num_published_blocks = 0

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        """The least recently used free block; if it held a cached prefix block, that entry is evicted."""
        block, _ = self.free_blocks.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    # ------------------------------------------------------------------ accounting
    def waste(self, seqs: list[Sequence]) -> tuple[int, int]:
        """(slots allocated, slots holding computed tokens) over the distinct blocks of ``seqs``.

        The served engine reports it after every step, so it costs a set union per sequence plus its last
        few blocks, not a Python iteration per block: a block before ``num_computed_tokens // block_size``
        is full in its sequence, and a block shared by several sequences counts once, as full as its
        fullest holder has it."""
        bs = self.block_size
        full: set[int] = set()
        partial: dict[int, int] = {}   # block -> computed slots, where no holder seen so far has it full
        for seq in seqs:
            computed = seq.num_computed_tokens
            whole = computed // bs
            for table, released in zip(seq.block_tables, seq.num_released):
                full.update(table[released:whole])
                for i in range(max(released, whole), len(table)):
                    fill = max(0, computed - i * bs)
                    if fill > partial.get(table[i], -1):
                        partial[table[i]] = fill
        partial_only = [fill for block, fill in partial.items() if block not in full]
        return (len(full) + len(partial_only)) * bs, len(full) * bs + sum(partial_only)
