"""The draft-model proposer through the whole engine: greedy output is token for token the output without
speculation, with a smaller draft sharing the tokenizer and with the target as its own draft; the latter
accepts (nearly) every draft, which holds only if the draft's K/V in the shared paged pool is right: after
rollbacks, chunked prefill, preemption and recompute, prefix-cache hits and forks. Stop conditions, n > 1,
seeded sampling and logprobs are as without speculation; no block leaks; drafts not made for a sequence's
current tokens are never checked; a draft with another vocabulary is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.spec_decode.adaptive import AcceptanceTracker
from llmserve.spec_decode.config import SpeculativeConfig
from llmserve.spec_decode.drafts_from_worker import DraftsFromWorker
from llmserve.testing.checkpoints import write_checkpoint
from tests.spec_decode.test_spec_equivalence import (BLOCK, GREEDY, PROMPTS, assert_cached_continuations_are_exact,
                                                     assert_idle_and_accepting, completions, make_llm)

K = 3


def draft_llm(target, draft, **kwargs) -> LLM:
    return make_llm(target, spec=False, speculative_config={"method": "draft_model", "model": str(draft),
                                                            "num_speculative_tokens": K}, **kwargs)


def assert_accepts_nearly_all(llm: LLM) -> None:
    """The target drafting for itself: a rejection means the draft's K/V (or its inputs) differ from the
    target's (a float32 near-tie between a decode and a verification pass is the only excuse)."""
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens >= 0.95 * stats.num_draft_tokens
    assert_idle_and_accepting(llm)


@pytest.fixture(scope="module")
def greedy_off(llama_dir):
    return completions(make_llm(llama_dir, spec=False), prompts=PROMPTS * 2)


def test_greedy_output_is_unchanged_with_a_smaller_draft(llama_dir, small_draft_dir, greedy_off):
    on = draft_llm(llama_dir, small_draft_dir)
    assert completions(on, prompts=PROMPTS * 2) == greedy_off
    fused = on.engine.runner.drafter.fused   # on a CPU the draft's catch-up and drafting run the fused step
    assert fused is None if cpu_kernels() is None else fused.calls > 0
    stats = on.engine.scheduler.spec_stats
    assert stats.num_drafts > 0 and stats.num_draft_tokens <= K * stats.num_drafts
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    per_pos = stats.num_accepted_tokens_per_pos
    assert sum(per_pos) == stats.num_accepted_tokens and per_pos == sorted(per_pos, reverse=True)
    bm = on.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(rc == 0 for rc in bm.ref_counts)


@pytest.mark.parametrize("engine_args", [
    {},
    {"max_num_batched_tokens": 8},                       # prompts in chunks, drafts cut to the budget
    {"kv_cache_memory_bytes": 80 * 1024},                # few blocks (half of each is the draft's): preemptions
], ids=["plain", "chunked_prefill", "preemption"])
def test_target_as_its_own_draft_accepts_everything(llama_dir, greedy_off, engine_args):
    on = draft_llm(llama_dir, llama_dir, **engine_args)
    assert completions(on, prompts=PROMPTS * 2) == greedy_off
    assert_accepts_nearly_all(on)
    if "kv_cache_memory_bytes" in engine_args:
        assert on.engine.scheduler.num_preemptions > 0


class DraftingPhases:
    """An adaptive policy that lets every sequence draft ``K`` in odd phases of ``length`` steps, none in even ones."""

    def __init__(self, length: int = 5) -> None:
        self.length, self.steps = length, 0
        self.tracker = AcceptanceTracker()

    def drafting(self) -> bool:
        return (self.steps // self.length) % 2 == 1

    def num_drafts(self, seq_ids, context_lens):
        self.steps += 1
        return dict.fromkeys(seq_ids, K if self.drafting() else 0)

    def observe_step(self, seconds, shape):
        pass


def test_a_sequence_that_drafts_nothing_costs_the_draft_nothing_and_catches_up_later(llama_dir, greedy_off):
    """Capped at no drafts, a sequence is not fed to the draft, prompt included (no draft forward at all while
    nobody drafts); when it drafts again, its first row feeds every token it missed (the prompt through the
    draft's module path): the target as its own draft accepts nearly everything."""
    on = draft_llm(llama_dir, llama_dir)
    policy = on.engine.scheduler.speculation.adaptive = DraftingPhases()
    drafter = on.engine.runner.drafter
    forward, phases = drafter._forward, []

    def watched(*args):
        phases.append((policy.steps, policy.drafting()))
        return forward(*args)

    drafter._forward = watched
    assert completions(on, prompts=PROMPTS * 2) == greedy_off
    assert_accepts_nearly_all(on)
    assert any(drafting for _, drafting in phases)
    assert not [step for step, drafting in phases if not drafting]
    assert on.engine.scheduler.spec_stats.num_drafts > 0


def test_a_feeding_forward_gives_each_row_its_last_tokens_hidden_state_whatever_its_path(llama_dir, small_draft_dir):
    """One feeding forward mixes a long row (a prompt: the draft's module path) with short ones (drafted tokens:
    its fused step, on a CPU): each row's hidden state is the one it gets alone through the module path."""
    drafter = draft_llm(llama_dir, small_draft_dir).engine.runner.drafter
    lens = np.array([1, 20, 2, 1])
    starts = np.array([0, 0, 0, 0])
    tables = np.arange(4 * 8, dtype=np.int32).reshape(1, 4, 8)   # 8 blocks of 4 slots per row, all free
    tokens = np.arange(1, int(lens.sum()) + 1, dtype=np.int64) * 7
    calls = drafter.fused.calls if drafter.fused is not None else 0
    mixed = drafter._forward(tokens, lens, starts, tables, np.zeros(4, dtype=np.int64))
    assert drafter.fused is None or drafter.fused.calls == calls + 1   # the short rows, in one fused call
    ends = np.cumsum(lens)
    for i in range(4):
        alone = drafter._module_forward(tokens[ends[i] - lens[i]:ends[i]], lens[i:i + 1], starts[i:i + 1],
                                        tables[:, i:i + 1], np.zeros(1, dtype=np.int64))
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-4, rtol=1e-4)


def test_the_drafts_kv_cache_takes_the_targets_kv_cache_dtype(llama_dir, small_draft_dir):
    """Under --kv-cache-dtype int8 the draft's K/V is int8 too, and a block is sized for both models' layers
    at one byte a value. Greedy output with speculation is the output without it under the same cache format;
    the target drafting for itself (its int8 scales fitted to the same first batch) accepts nearly every draft."""
    off = completions(make_llm(llama_dir, spec=False, kv_cache_dtype="int8"), prompts=PROMPTS * 2)
    on = draft_llm(llama_dir, small_draft_dir, kv_cache_dtype="int8")
    runner = on.engine.runner
    draft_layers = runner.drafter.attention_layers()
    assert all(a.key_cache.dtype == a.value_cache.dtype == torch.int8 for a in runner.kv_layers())
    values_per_token = sum(a.kv_cache_elements_per_token() for a in runner.kv_layers())
    assert runner.kv_cache_bytes_per_block() == BLOCK * values_per_token
    assert completions(on, prompts=PROMPTS * 2) == off
    assert all(a.kv_scales.tolist() != [1.0, 1.0] for a in draft_layers)   # fitted to the first batch
    itself = draft_llm(llama_dir, llama_dir, kv_cache_dtype="int8")
    assert completions(itself, prompts=PROMPTS * 2) == off
    assert_accepts_nearly_all(itself)


def test_prefix_cache_hits_serve_the_drafts_kv_too(llama_dir):
    """Prompts that reuse earlier prompts' blocks (their outputs appended) skip those tokens in both models:
    the draft still accepts everything, so the cached blocks held its K/V too."""
    on = draft_llm(llama_dir, llama_dir)
    assert_cached_continuations_are_exact(on, llama_dir)
    assert_accepts_nearly_all(on)


def test_stop_conditions_and_logprobs_hold_when_several_tokens_arrive(llama_dir, small_draft_dir):
    off, on = make_llm(llama_dir, spec=False), draft_llm(llama_dir, llama_dir)
    texts = [o.outputs[0].text for o in off.generate(PROMPTS, GREEDY)]
    for prompt, text in zip(PROMPTS, texts):
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[text[-12:-6]], logprobs=2)
        on_out, off_out = on.generate([prompt], params)[0].outputs[0], off.generate([prompt], params)[0].outputs[0]
        assert (on_out.text, on_out.token_ids, on_out.finish_reason) == (off_out.text, off_out.token_ids, "stop")
        for a, b in zip(on_out.logprobs, off_out.logprobs):
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    short = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    assert completions(on, short) == [[(o[0][0][:7], "length")] for o in completions(off)]
    assert_accepts_nearly_all(on)


def test_seeded_parallel_samples_are_reproducible_and_unchanged(llama_dir, small_draft_dir):
    params = SamplingParams(temperature=0.7, top_k=20, max_tokens=40, ignore_eos=True, seed=11, n=2)
    on = draft_llm(llama_dir, llama_dir)
    first = completions(on, params)
    assert first == completions(make_llm(llama_dir, spec=False), params)
    assert completions(on, params) == first
    assert completions(draft_llm(llama_dir, small_draft_dir), params) == first
    assert_idle_and_accepting(on)


def test_a_draft_with_another_vocabulary_is_refused(llama_dir, tmp_path):
    draft = write_checkpoint(tmp_path / "other", family="llama", size="tiny-draft")
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "vocab_size": 1999}))
    with pytest.raises(ValueError, match="vocabulary of 1999 tokens, the target 2000; a draft must share"):
        draft_llm(llama_dir, draft)


def test_drafts_are_checked_only_for_the_tokens_they_follow():
    drafts = DraftsFromWorker(SpeculativeConfig("draft_model", K, model="d"))
    assert drafts.num_lookahead_slots == K
    drafts.add(7, 5, [1, 2, 3])
    assert drafts.propose(7, [0] * 6, K) == []            # the sequence moved on (e.g. preempted and recomputed)
    drafts.add(7, 5, [1, 2, 3])
    assert drafts.propose(7, [0] * 5, 2) == [1, 2]        # cut to what the step has room for
    assert drafts.propose(7, [0] * 5, K) == []            # each set of drafts is checked once
    drafts.add(8, 5, [4])
    drafts.remove(8, [0] * 5)
    assert drafts.propose(8, [0] * 5, K) == []


def generate_watching_releases(llm: LLM, prompts: list[str]) -> tuple[list[list[int]], int]:
    """Greedy token ids of ``prompts``, and the most blocks any running sequence had handed back out of its
    groups' windows after a step."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    done, released = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        released = max([released] + [sum(seq.num_released) for seq in engine.scheduler.running.values()])
    return [done[str(i)] for i in range(len(prompts))], released


def test_a_full_attention_draft_leaves_a_sliding_window_target_its_freed_blocks(checkpoint_dir, small_draft_dir):
    """Phi-3 slides every layer, so its out-of-window blocks are handed back; a draft model that attends the
    whole context forms a full KV-cache group of its own in the pool, so Phi-3's groups still free theirs, and the
    output is unchanged."""
    target = checkpoint_dir("phi3")
    off = [c[0][0] for c in completions(make_llm(target, spec=False), prompts=PROMPTS)]
    assert make_llm(target, spec=False).engine.block_manager.group_windows == [10]
    on = draft_llm(target, small_draft_dir)
    assert on.engine.block_manager.group_windows == [10, 10, None]
    tokens, released = generate_watching_releases(on, PROMPTS)
    assert tokens == off and released > 0
    assert on.engine.block_manager.num_free_blocks == on.engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def gemma2_draft_dir(tmp_path_factory: pytest.TempPathFactory):
    """A 1-layer Gemma 2 (sliding, transformers' default window of 4096), narrower than the tiny one (1 KV head),
    with its tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("gemma2-draft") / "m", family="gemma2", size="tiny-draft", seed=1)


@pytest.mark.parametrize("own_draft", [False, True], ids=["smaller_draft", "target_as_draft"])
def test_a_mixed_target_keeps_its_kv_cache_groups_with_a_draft_model(checkpoint_dir, gemma2_draft_dir, own_draft):
    """Gemma 2 (a sliding and a full layer): a draft model's layers join the groups of their window in the same
    pool, so the sliding group still frees the blocks that left its window. The smaller draft's layer (its page
    padded to the target's) forms a group of its own window; the target drafting for itself puts a layer of its
    copy in each of its two groups (two tensors). Greedy output is the output without speculation, under chunked
    prefill and preemption (a pool too small for every sequence), and the target as its own draft accepts nearly
    every draft: the draft's K/V in its groups' blocks is right after releases, rollbacks and recomputation."""
    target = checkpoint_dir("gemma2")
    args = {"max_num_batched_tokens": 8, "kv_cache_memory_bytes": 64 * 1024}
    off = [c[0][0] for c in completions(make_llm(target, spec=False, **args), prompts=PROMPTS * 2)]
    on = draft_llm(target, target if own_draft else gemma2_draft_dir, **args)
    runner = on.engine.runner
    assert on.engine.block_manager.group_windows == ([10, None] if own_draft else [10, None, 4096])
    assert runner.kv_cache_groups.group_size == (2 if own_draft else 1)
    tokens, released = generate_watching_releases(on, PROMPTS * 2)
    assert tokens == off and released > 0 and on.engine.scheduler.num_preemptions > 0
    if own_draft:
        assert_accepts_nearly_all(on)
    else:   # a random draft of another size rarely agrees with the target: nothing to count on but the blocks
        assert on.engine.block_manager.num_free_blocks == on.engine.block_manager.num_blocks
