"""Models that mix full and sliding-window attention layers: one block table per KV-cache group, one pool.

Specified: a sequence has a table per group, all of one length, drawn from one pool and counted together (all
or nothing); a sliding group hands back the blocks that left its window while a full group keeps every block;
a prefix hit is the longest prefix every group can serve (a full group: its cached blocks from the start; a
sliding group: those from the window of the first uncomputed token on). Gemma 2 (alternating), Gemma 3
(5 local : 1 global), Cohere2 (3 : 1) and Qwen2 with ``max_window_layers`` then run with their sliding
layers' blocks freed, and their greedy output equals transformers' under chunked prefill, preemption and
prefix-cache hits, also split into pipeline stages (which form the groups of the whole model).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve import LLM, SamplingParams
from llmserve.engine.block_manager import NULL_BLOCK, BlockManager, most_blocks_held
from llmserve.engine.sequence import Sequence
from tests.engine.test_block_manager import assert_invariants, make_seq
from tests.engine.test_hf_equivalence import assert_matches_hf, llm_block_bytes
from tests.engine.test_sliding_window_blocks import decode_bound, run
from tests.models.hf_logits import LONG_PROMPT, with_config

BS = 4


def live(seq: Sequence, group: int) -> list[int]:
    return seq.block_tables[group][seq.num_released[group]:]


# ---------------------------------------------------------------------------------------------- block manager
def test_groups_draw_from_one_pool_all_or_nothing():
    bm = BlockManager(7, BS, enable_prefix_caching=False, group_windows=[None, 8])
    seq = make_seq(12)
    assert bm.allocate(seq, 12)   # 3 blocks in each group
    assert [len(t) for t in seq.block_tables] == [3, 3] and bm.num_free_blocks == 1
    assert not set(seq.block_tables[0]) & set(seq.block_tables[1])
    before = [list(t) for t in seq.block_tables]
    assert not bm.allocate(seq, 13)   # one more block in each group: 2 needed, 1 free
    assert seq.block_tables == before and bm.num_free_blocks == 1
    bm.free(seq)
    assert bm.num_free_blocks == 7 and seq.block_tables == []


def test_the_sliding_group_releases_while_the_full_group_keeps_every_block():
    bm = BlockManager(64, BS, enable_prefix_caching=False, group_windows=[6, None])
    seq = make_seq(1)
    for upto in range(1, 60):
        run(bm, seq, upto)
        # released when the table last grew, before the last token was computed
        assert len(live(seq, 0)) <= decode_bound(6) and seq.num_released[0] == bm.num_dead_blocks(upto - 1, 0)
        assert len(live(seq, 1)) == -(-upto // BS) and seq.num_released[1] == 0
        assert_invariants(bm, [seq])
    bm.free(seq)
    assert bm.num_free_blocks == 64


def test_a_fork_shares_every_groups_live_blocks():
    bm = BlockManager(32, BS, enable_prefix_caching=False, group_windows=[6, None])
    parent, child = make_seq(1), make_seq(1)
    run(bm, parent, 21)
    bm.fork(parent, child)
    assert child.block_tables == parent.block_tables and child.num_released == parent.num_released
    assert all(bm.ref_counts[b] == 2 for g in (0, 1) for b in live(parent, g))
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 32


def cached_prompt(bm: BlockManager, tokens: int) -> Sequence:
    """A finished sequence of ``tokens`` tokens whose blocks stay cached (free) in every group."""
    first = Sequence(0, "r0", 0, list(range(tokens)), SamplingParams(), 16, None)
    run(bm, first, tokens)
    bm.free(first)
    return first


def test_a_prefix_hit_is_the_longest_prefix_every_group_serves():
    """Groups [full, window 6], 6 cached blocks of 4 tokens, a 25-token prompt (6 blocks may hit)."""
    def hit_after_evicting(evicted: list[tuple[int, int]]) -> Sequence:
        bm = BlockManager(32, BS, enable_prefix_caching=True, group_windows=[None, 6])
        first = cached_prompt(bm, 25)
        for group, index in evicted:   # as the LRU eviction of that group's cached copy would
            del bm.cached[group, first.block_hashes[index]]
        seq = Sequence(1, "r1", 0, list(range(25)), SamplingParams(), 16, None)
        bm.match_prefix(seq)
        return seq

    seq = hit_after_evicting([])
    assert seq.num_computed_tokens == 24 and seq.num_released == [0, 4]
    assert seq.block_tables[1][:4] == [NULL_BLOCK] * 4
    # The sliding group's early blocks are not needed: still a full hit.
    assert hit_after_evicting([(1, 0), (1, 2)]).num_computed_tokens == 24
    # Its last block gone: the longest prefix whose window it still has (5 blocks: needs blocks 3 and 4).
    seq = hit_after_evicting([(1, 5)])
    assert seq.num_computed_tokens == 20 and seq.num_released == [0, 3] and len(seq.block_tables[0]) == 5
    # The full group misses block 2: at most 2 blocks, which the sliding group serves from the start.
    assert hit_after_evicting([(0, 2)]).num_computed_tokens == 8
    # The full group allows 3 blocks; the sliding group, missing block 1, serves only a prefix whose window
    # starts past it or ends before it: the first block.
    assert hit_after_evicting([(0, 3), (1, 1)]).num_computed_tokens == 4


def test_most_blocks_held_counts_every_group():
    # 130 tokens, 8-token steps, window 10: 33 blocks in the full group, 6 in the sliding one.
    assert most_blocks_held(BS, [None, 10], 30, 130, 8, True) == 39
    assert most_blocks_held(BS, [10, 10, 10, None], 30, 130, 8, True) == 3 * 6 + 33
    # A draft model's 4 lookahead slots after each step, reserved in every group: 34 blocks in the full group, 7 in
    # the sliding one (the window, the step and the slots: 10 - 1 + 8 + 4 tokens, from anywhere in a block).
    assert most_blocks_held(BS, [None, 10], 30, 130, 8, True, lookahead=4) == 34 + 7


# One op: (sequence slot, tokens) computes that many more of the slot's tokens (0: first looks its prompt up in
# the prefix cache, if it holds no block); (slot, None) frees it.
_ops = st.lists(st.tuples(st.integers(0, 3), st.one_of(st.none(), st.integers(0, 12))), max_size=60)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4]),
       windows=st.lists(st.one_of(st.none(), st.integers(1, 12)), min_size=1, max_size=3), ops=_ops)
def test_random_steps_keep_every_groups_invariants(num_blocks, block_size, windows, ops):
    """One to three groups, full or sliding. Each slot has its own 60-token prompt (so blocks are shared only
    through its own earlier runs' cache); every group's table covers the computed tokens and its released prefix
    is exactly the blocks out of its window."""
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True, group_windows=windows)
    seqs = [Sequence(slot, f"r{slot}", 0, [slot * 100 + t for t in range(60)], SamplingParams(), 16, None)
            for slot in range(4)]
    for slot, n in ops:
        seq = seqs[slot]
        if n is None:
            bm.free(seq)
            seq.num_computed_tokens = 0
        elif n == 0:
            if not seq.block_tables:
                hit = bm.match_prefix(seq)
                assert seq.num_released == [bm.num_dead_blocks(hit, g) for g in range(len(windows))]
        elif seq.num_computed_tokens + n <= 60 and bm.allocate(seq, seq.num_computed_tokens + n):
            wanted = -(-(seq.num_computed_tokens + n) // block_size)
            for g in range(len(windows)):
                dead = bm.num_dead_blocks(seq.num_computed_tokens, g)
                assert len(seq.block_tables[g]) == wanted and seq.num_released[g] == dead
            seq.num_computed_tokens += n
            bm.cache_full_blocks(seq)
        assert_invariants(bm, seqs)
    for seq in seqs:
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks


# ---------------------------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("family,groups,pool,pp", [
    ("gemma2", [10, None], 12, 1), ("gemma3", [10] * 5 + [None], 8, 1), ("cohere2", [10, 10, 10, None], 10, 1),
    ("gemma4", [10, 10, 10, None], 10, 1), ("gemma2", [10, None], 12, 2)],
    ids=["gemma2", "gemma3", "cohere2", "gemma4", "gemma2-pp2"])
def test_mixed_models_match_hf_with_their_sliding_blocks_freed(checkpoint_dir, family, groups, pool, pp):
    """Prompts past the window, generating 4x past it, 8-token chunks, every prompt twice (prefix hits), in a
    pool of ``pool`` blocks' worth of every layer: small enough that sequences are preempted. Each sliding
    group holds at most the window of a chunk's first token and the chunk; the full group every block. Gemma 4's
    four cache-holding layers (three sliding with 2 KV heads of 16, one full with 1 of 24) form groups of one
    layer over one padded tensor, and its two layers sharing K/V read their sources' groups. Split into ``pp``
    pipeline stages (Gemma 2's sliding layer on one, its full layer on the other), the stages form the same
    groups as the whole model and each holds its layers' share of every block."""
    path = checkpoint_dir(family)
    llm = LLM(str(path), block_size=BS, max_num_batched_tokens=8, pipeline_parallel_size=pp,
              kv_cache_memory_bytes=pool * llm_block_bytes(path, BS))
    try:
        engine = llm.engine
        assert engine.block_manager.group_windows == groups
        prompts = [LONG_PROMPT, LONG_PROMPT[:13], LONG_PROMPT, LONG_PROMPT[:13]]
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        done = {}
        released = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
            for seq in engine.scheduler.running.values():
                for g, window in enumerate(groups):
                    if window is None:
                        assert len(live(seq, g)) == len(seq.block_tables[g])
                    else:
                        assert len(live(seq, g)) <= -(-(window - 1 + 8) // BS) + 1
                released = max(released, *seq.num_released)
        assert released > 0 and engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_hit_tokens > 0
        assert_matches_hf(path, [done[str(i)] for i in range(len(prompts))], max_tokens=40)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        llm.shutdown()


def test_qwen2_slides_from_max_window_layers_on(checkpoint_dir, tmp_path):
    """Qwen2's first ``max_window_layers`` layers attend fully, the rest within the window: a full and a
    sliding group, and transformers' output under preemption."""
    path = with_config(tmp_path, checkpoint_dir("qwen2"),
                       {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1})
    llm = LLM(str(path), block_size=BS, max_num_batched_tokens=8, kv_cache_memory_bytes=10 * llm_block_bytes(path, BS))
    assert llm.engine.block_manager.group_windows == [None, 8]
    outputs = llm.generate([{"prompt_token_ids": p} for p in (LONG_PROMPT, LONG_PROMPT[:13], LONG_PROMPT[5:])],
                           SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, outputs, max_tokens=24)
