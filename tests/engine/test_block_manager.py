"""The paged KV-cache block allocator.

Specified: a sequence holds exactly ``ceil(tokens / block_size)`` blocks and grows one block per
``block_size`` tokens; ``allocate`` is all or nothing (a refused request takes no block); ``free``
returns every block of a sequence and empties its table; ``usage`` reports the fraction in use and
``block_map`` each block's state (in use, cached-but-free, free) per cell; and,
under any interleaving of allocations and frees, no block is lost, none is in two block tables, and
no reference count is negative.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.engine.block_manager import BlockManager
from llmserve.engine.sequence import Sequence
from llmserve.sampling_params import SamplingParams

_ids = iter(range(10**9))


def make_seq(num_prompt_tokens: int = 1) -> Sequence:
    seq_id = next(_ids)
    return Sequence(seq_id, f"r{seq_id}", 0, list(range(num_prompt_tokens)), SamplingParams(), 16, None, None)


def assert_invariants(bm: BlockManager, seqs: list[Sequence]) -> None:
    """Over the blocks the sequences hold (every group's table less the entries released out of a sliding
    window)."""
    tables = [b for s in seqs for table, released in zip(s.block_tables, s.num_released) for b in table[released:]]
    assert len(tables) == len(set(tables)), "a block is in two block tables (or twice in one)"
    assert not set(tables) & set(bm.free_blocks), "a block is both free and in a table"
    assert len(set(bm.free_blocks)) == bm.num_free_blocks, "a block is on the free list twice"
    assert bm.num_free_blocks + len(tables) == bm.num_blocks, "a block was lost or invented"
    assert all(rc >= 0 for rc in bm.ref_counts)
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == (1 if block in tables else 0)
    assert bm.usage == pytest.approx(len(tables) / bm.num_blocks)


def test_needs_at_least_one_block():
    with pytest.raises(ValueError):
        BlockManager(0, 16)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_grows_one_block_per_block_size_tokens(block_size):
    bm = BlockManager(64, block_size)
    seq = make_seq()
    for num_tokens in range(1, 4 * block_size + 1):
        assert bm.allocate(seq, num_tokens)
        assert len(seq.block_table) == -(-num_tokens // block_size)
        assert bm.num_free_blocks == 64 - len(seq.block_table)
    assert len(set(seq.block_table)) == len(seq.block_table) == 4


def test_allocate_is_idempotent_and_never_shrinks():
    bm = BlockManager(8, 4)
    seq = make_seq()
    assert bm.allocate(seq, 9)
    table = list(seq.block_table)
    assert bm.allocate(seq, 9) and seq.block_table == table
    assert bm.allocate(seq, 3) and seq.block_table == table   # fewer tokens: nothing returned
    assert bm.num_free_blocks == 5


def test_allocate_is_all_or_nothing():
    bm = BlockManager(4, 4)
    a, b = make_seq(), make_seq()
    assert bm.allocate(a, 8)                 # 2 blocks
    assert not bm.allocate(b, 12)            # needs 3, only 2 free
    assert b.block_table == [] and bm.num_free_blocks == 2
    assert bm.allocate(b, 5)                 # exactly what is free
    assert not bm.allocate(a, 9)             # a needs one more, none free
    assert len(a.block_table) == 2
    assert_invariants(bm, [a, b])


def test_whole_cache_in_one_sequence():
    bm = BlockManager(3, 2)
    seq = make_seq()
    assert not bm.allocate(seq, 7)
    assert bm.allocate(seq, 6)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0


def test_free_returns_every_block():
    bm = BlockManager(10, 4)
    a, b = make_seq(), make_seq()
    bm.allocate(a, 13)
    bm.allocate(b, 4)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 9
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    assert sorted(bm.free_blocks) == list(range(10))
    assert bm.ref_counts == [0] * 10


def test_free_twice_and_free_of_empty_are_harmless():
    bm = BlockManager(4, 4)
    seq = make_seq()
    bm.free(seq)
    bm.allocate(seq, 8)
    bm.free(seq)
    bm.free(seq)
    assert bm.num_free_blocks == 4 and all(rc == 0 for rc in bm.ref_counts)


def test_shared_block_is_freed_by_its_last_holder():
    """Reference counting, for sharing (prefix caching, parallel samples): a block held twice stays in
    use until both holders free it, and no count goes below zero."""
    bm = BlockManager(4, 4)
    a, b = make_seq(), make_seq()
    bm.allocate(a, 8)
    shared = a.block_table[0]
    b.block_tables, b.num_released = [[shared]], [0]
    bm.ref_counts[shared] += 1
    bm.free(a)
    assert shared not in bm.free_blocks and bm.ref_counts[shared] == 1
    assert bm.num_free_blocks == 3
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.ref_counts == [0] * 4


def test_free_pool_is_least_recently_used_first():
    """Freed blocks go to the back of the free pool (a freed sequence's tail block first), so blocks that
    may hold a cached prefix are reused last."""
    bm = BlockManager(8, 1)
    a = make_seq()
    bm.allocate(a, 3)
    freed = list(a.block_table)
    bm.free(a)
    b = make_seq()
    bm.allocate(b, 5)
    assert b.block_table == [3, 4, 5, 6, 7]   # never-used blocks first
    c = make_seq()
    bm.allocate(c, 3)
    assert c.block_table == list(reversed(freed))   # then a's blocks, its tail block first


def test_block_map_counts_blocks_in_use_cached_and_free_per_cell():
    """The dashboard's map: a block is in use while held, cached-but-free once freed with its hash, free
    otherwise; with more blocks than cells, each cell counts its run of consecutive blocks."""
    bm = BlockManager(10, 4)
    a, b = make_seq(8), make_seq()
    bm.allocate(a, 8)   # blocks 0, 1
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    bm.free(a)          # 0, 1 free but cached
    bm.allocate(b, 12)  # blocks 2, 3, 4 (never-used blocks first)
    exact = bm.block_map(max_cells=16)
    assert exact.blocks_per_cell == 1
    assert exact.in_use == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    assert exact.cached == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    grouped = bm.block_map(max_cells=4)   # 10 blocks in cells of 3: [0-2], [3-5], [6-8], [9]
    assert grouped.blocks_per_cell == 3
    assert grouped.in_use == [1, 2, 0, 0] and grouped.cached == [2, 0, 0, 0]


# One op: (sequence slot, number of tokens) grows that slot's sequence to that many tokens;
# (slot, None) frees it.
_ops = st.lists(st.tuples(st.integers(0, 5), st.one_of(st.none(), st.integers(1, 40))), max_size=60)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 16), block_size=st.sampled_from([1, 2, 4, 16]), ops=_ops)
def test_random_allocate_free_keeps_invariants(num_blocks, block_size, ops):
    bm = BlockManager(num_blocks, block_size)
    seqs = [make_seq() for _ in range(6)]
    for slot, num_tokens in ops:
        seq = seqs[slot]
        if num_tokens is None:
            bm.free(seq)
            assert seq.block_table == []
        else:
            before = list(seq.block_table)
            free_before = bm.num_free_blocks
            wanted = -(-num_tokens // block_size)
            ok = bm.allocate(seq, num_tokens)
            assert ok == (wanted - len(before) <= free_before)
            if ok:
                assert seq.block_table[:len(before)] == before
                assert len(seq.block_table) == max(wanted, len(before))
            else:
                assert seq.block_table == before and bm.num_free_blocks == free_before
        assert_invariants(bm, seqs)
    for seq in seqs:
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks
    assert_invariants(bm, seqs)


def test_waste_counts_each_shared_block_once_as_full_as_its_fullest_holder():
    """Slots allocated and slots holding computed tokens, as counted slot by slot: a block shared by two
    sequences (a cached prefix, a fork's prompt) counts once, a block past a sequence's computed tokens
    (allocated ahead) counts as empty, and blocks released out of a sliding window do not count."""
    bm = BlockManager(64, 4)
    a, b, c = make_seq(), make_seq(), make_seq()
    a.block_tables, a.num_released, a.num_computed_tokens = [[0, 1, 2, 3]], [0], 10    # 2 full, 2 of 4, 0 of 4
    b.block_tables, b.num_released, b.num_computed_tokens = [[0, 1, 2, 9]], [0], 12    # shares 0, 1 and 2 (full here)
    c.block_tables, c.num_released, c.num_computed_tokens = [[5, 6, 7, 8]], [2], 13    # 5, 6 released; 7 full, 8: 1
    per_block: dict[int, int] = {}
    for seq in (a, b, c):
        table, released = seq.block_tables[0], seq.num_released[0]
        for i, block in enumerate(table):
            if i >= released:
                slots = sum(i * 4 + j < seq.num_computed_tokens for j in range(4))
                per_block[block] = max(per_block.get(block, 0), slots)
    assert per_block == {0: 4, 1: 4, 2: 4, 3: 0, 9: 0, 7: 4, 8: 1}
    assert bm.waste([a, b, c]) == (len(per_block) * 4, sum(per_block.values()))
    assert bm.waste([a]) == (16, 10)
    assert bm.waste([]) == (0, 0)
