"""KV blocks that fall out of every layer's sliding window go back to the pool.

Specified: with a window ``w`` on every attention layer, a sequence whose next token to compute is at ``c``
holds no block that ends before ``c - w + 1``: its table keeps a placeholder there, and while it decodes it
holds at most ``ceil((w - 1) / block_size) + 1`` blocks however long it gets. The freed blocks serve other
sequences (more run at once in a small cache), nothing leaks, and greedy output still equals transformers'
with chunked prefill, preemption and prefix-cache hits. A prefix hit needs only the blocks inside the window
of its first uncomputed token. (Models that mix full and sliding layers: test_kv_cache_groups.py.)
"""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams
from llmserve.engine.block_manager import NULL_BLOCK, BlockManager
from llmserve.engine.sequence import Sequence
from llmserve.errors import InvalidRequestError
from tests.engine.test_block_manager import make_seq
from tests.engine.test_hf_equivalence import assert_matches_hf, llm_block_bytes
from tests.models.hf_logits import LONG_PROMPT, with_config

BS = 4


def decode_bound(window: int, block_size: int = BS) -> int:
    return -(-(window - 1) // block_size) + 1


def live_blocks(seq: Sequence) -> list[int]:
    return seq.block_table[seq.num_released_blocks:]


def run(bm: BlockManager, seq: Sequence, upto: int, step: int = 1) -> None:
    """Compute ``seq``'s tokens up to ``upto``, ``step`` at a time, publishing full blocks as the engine does."""
    while seq.num_computed_tokens < upto:
        n = min(step, upto - seq.num_computed_tokens)
        assert bm.allocate(seq, seq.num_computed_tokens + n)
        seq.num_computed_tokens += n
        bm.cache_full_blocks(seq)


# ---------------------------------------------------------------------------------------------- block manager
@pytest.mark.parametrize("window", [1, 4, 5, 10, 16])
def test_decoding_holds_at_most_the_window_and_frees_everything(window):
    bm = BlockManager(64, BS, enable_prefix_caching=False, group_windows=[window])
    seq = make_seq(3)
    most = 0
    for c in range(1, 120):   # computing token c - 1, one at a time
        seq.num_computed_tokens = c - 1
        assert bm.allocate(seq, c)
        live = live_blocks(seq)
        most = max(most, len(live))
        assert len(seq.block_table) == -(-c // BS)   # positions stay aligned
        assert seq.block_table[:seq.num_released_blocks] == [NULL_BLOCK] * seq.num_released_blocks
        first_seen = max(0, c - 1 - window + 1)      # the window of the query at c - 1
        assert seq.num_released_blocks == first_seen // BS
        assert bm.num_free_blocks == 64 - len(live)
    assert most == decode_bound(window)
    bm.free(seq)
    assert bm.num_free_blocks == 64 and seq.num_released_blocks == 0


def test_full_attention_keeps_every_block():
    bm = BlockManager(64, BS, enable_prefix_caching=False)
    seq = make_seq(3)
    run(bm, seq, 100)
    assert seq.num_released_blocks == 0 and len(seq.block_table) == 25


def test_a_fork_shares_only_the_live_blocks():
    bm = BlockManager(32, BS, enable_prefix_caching=False, group_windows=[6])
    parent, child = make_seq(40), make_seq(40)
    run(bm, parent, 40, step=8)
    bm.fork(parent, child)
    assert child.num_released_blocks == parent.num_released_blocks > 0
    assert bm.num_free_blocks == 32 - len(live_blocks(parent))
    bm.free(parent)
    assert bm.num_free_blocks == 32 - len(live_blocks(child))
    bm.free(child)
    assert bm.num_free_blocks == 32


def test_a_prefix_hit_needs_only_the_blocks_inside_the_window():
    """Window 6, 4-token blocks: a 25-token prompt can take 24 tokens from the cache, for which only its
    blocks 4 and 5 (tokens 16..23, the window of token 24 being 19..24) must be cached; when block 4 is
    gone too, the longest servable prefix is 16 tokens (blocks 2 and 3)."""
    bm = BlockManager(8, BS, enable_prefix_caching=True, group_windows=[6])
    first = make_seq(25)
    run(bm, first, 24, step=8)
    assert first.num_released_blocks == 2   # blocks 0 and 1 handed back (still cached) for the last chunk
    bm.free(first)
    ids = {i: bm.cached[0, h] for i, h in enumerate(first.block_hashes)}

    def evict(*indexes: int) -> None:
        for i in indexes:   # move the block to the front of the LRU list, then take it
            bm.free_blocks.move_to_end(ids[i], last=False)
            filler = make_seq(1)
            assert bm.allocate(filler, 1) and filler.block_table == [ids[i]]
            bm.free(filler)

    evict(0, 1)
    second = make_seq(25)
    assert bm.match_prefix(second) == 24
    assert second.num_released_blocks == 4
    assert second.block_table == [NULL_BLOCK] * 4 + [ids[4], ids[5]]
    bm.free(second)
    evict(4)
    third = make_seq(25)
    assert bm.match_prefix(third) == 16
    assert third.block_table == [NULL_BLOCK] * 2 + [ids[2], ids[3]]
    bm.free(third)
    assert bm.num_free_blocks == 8


def test_without_a_window_a_hole_at_the_start_is_a_miss():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    first = make_seq(25)
    run(bm, first, 24, step=8)
    bm.free(first)
    oldest = bm.cached[0, first.block_hashes[0]]
    bm.free_blocks.move_to_end(oldest, last=False)
    filler = make_seq(1)
    assert bm.allocate(filler, 1)
    assert bm.match_prefix(make_seq(25)) == 0


# ---------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def sliding_mistral(checkpoint_dir, tmp_path_factory):
    """Mistral with a 12-token window on every layer (the tiny checkpoint has none)."""
    return with_config(tmp_path_factory.mktemp("swa"), checkpoint_dir("mistral"), {"sliding_window": 12})


def generate_tracking_blocks(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list, int, int]:
    """Outputs in prompt order, the most blocks any sequence held after a step and the most sequences that ran
    in one step."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done, most_blocks, most_running = {}, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        running = engine.scheduler.running.values()
        most_running = max(most_running, len(running))
        most_blocks = max([most_blocks, *(len(live_blocks(s)) for s in running)])
    return [done[str(i)] for i in range(len(prompts))], most_blocks, most_running


@pytest.mark.parametrize("family", ["phi3", "mistral-window-12"])
def test_long_generation_matches_hf_in_a_window_of_blocks(checkpoint_dir, sliding_mistral, family):
    """Prompts past the window, generating 4x past it, with chunked prefill (8-token budget) and prefix hits
    (every prompt twice): each sequence holds at most the window's blocks plus its chunk's."""
    path = sliding_mistral if family.startswith("mistral") else checkpoint_dir(family)
    llm = LLM(str(path), block_size=BS, max_num_batched_tokens=8, kv_cache_memory_bytes=64 * llm_block_bytes(path, BS))
    [window] = llm.engine.block_manager.group_windows
    assert window == (12 if family.startswith("mistral") else 10)
    prompts = [LONG_PROMPT, LONG_PROMPT[:13], LONG_PROMPT, LONG_PROMPT[:13]]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)
    outputs, most_blocks, _ = generate_tracking_blocks(llm, prompts, params)
    assert most_blocks <= -(-(window - 1 + 8) // BS) + 1   # the window of a chunk's first token, and the chunk
    assert llm.engine.block_manager.prefix_hit_tokens > 0
    assert_matches_hf(path, outputs, max_tokens=40)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_freed_blocks_let_more_sequences_run_and_preemption_recomputes_identically(checkpoint_dir):
    """20 blocks of 4 tokens: each request (30 + 46 tokens = 19 blocks) would take the whole cache if it kept
    every block (then at most 3 ran at once, early on, and 20 preemptions followed); holding only its
    window's and its prefill chunk's blocks, five run side by side, and the cache is still tight enough that
    one is preempted and recomputed."""
    path = checkpoint_dir("phi3")
    llm = LLM(str(path), block_size=BS, max_num_batched_tokens=32, kv_cache_memory_bytes=20 * llm_block_bytes(path, BS),
              enable_prefix_caching=False)
    prompts = [LONG_PROMPT[i:] + LONG_PROMPT[:i] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=46, ignore_eos=True, logprobs=0)
    outputs, most_blocks, most_running = generate_tracking_blocks(llm, prompts, params)
    assert most_blocks <= -(-(10 - 1 + 32) // BS) + 1 < 19
    assert most_running >= 5
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, outputs, max_tokens=46)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_request_longer_than_the_cache_is_accepted_when_every_layer_slides(checkpoint_dir):
    """It never holds more than its window's and a step's blocks, so only those must fit; a model with a
    full-attention layer still needs them all in its full group (33), plus its sliding group's window and
    step (6)."""
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)   # 130 tokens = 33 blocks
    for family in ("phi3", "gemma2"):
        path = checkpoint_dir(family)
        llm = LLM(str(path), block_size=BS, max_num_batched_tokens=8,
                  kv_cache_memory_bytes=8 * llm_block_bytes(path, BS))
        if family == "phi3":
            assert len(llm.generate([{"prompt_token_ids": LONG_PROMPT}], params)[0].outputs[0].token_ids) == 100
        else:
            with pytest.raises(InvalidRequestError, match="needs 39 KV-cache blocks"):
                llm.generate([{"prompt_token_ids": LONG_PROMPT}], params)
