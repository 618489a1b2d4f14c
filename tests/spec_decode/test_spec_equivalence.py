"""The engine against itself: with n-gram (or suffix) speculation on, greedy output is token for token the output
with it off (families with plain, sliding-window and soft-capped attention), also under chunked prefill,
preemption, prefix caching, stop token ids, min_tokens, max_tokens and n > 1; logprobs of emitted tokens
are those without speculation; seeded sampling gives the same tokens too (each position draws from its
own seeded stream); drafts really are accepted (the checks are not vacuous); no block leaks."""

from __future__ import annotations

import re

import pytest

from llmserve import LLM, SamplingParams

BLOCK = 4
# Repetitive prompts (the tiny random models also fall into loops of their own), so drafts get accepted.
PROMPTS = ["one two three four five one two three four five one two three",
           "a b c a b c a b c a b",
           "The cat sat on the mat. The cat sat on the",
           "hello world " * 5]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def make_llm(path, spec: bool, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory_bytes", "8MiB")
    if spec:
        kwargs["speculative_config"] = NGRAM
    return LLM(str(path), block_size=BLOCK, **kwargs)


def completions(llm: LLM, params=GREEDY, prompts=PROMPTS):
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in llm.generate(prompts, params)]


def assert_idle_and_accepting(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(rc == 0 for rc in bm.ref_counts)
    stats = llm.engine.scheduler.spec_stats
    assert 0 < stats.num_accepted_tokens <= stats.num_draft_tokens


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_greedy_output_is_unchanged(checkpoint_dir, family):
    path = checkpoint_dir(family)
    on = make_llm(path, spec=True)
    assert completions(on) == completions(make_llm(path, spec=False))
    assert_idle_and_accepting(on)


def test_greedy_output_is_unchanged_with_suffix_decoding(llama_dir):
    """Suffix decoding drafts from the request and from the requests before it (the second round of the
    same prompts finds the first round's outputs in the global tree)."""
    on = make_llm(llama_dir, spec=False, speculative_config={"method": "suffix", "num_speculative_tokens": 4})
    off = completions(make_llm(llama_dir, spec=False))
    assert completions(on) == off
    first = on.engine.scheduler.spec_stats.num_accepted_tokens
    assert completions(on) == off
    assert on.engine.scheduler.spec_stats.num_accepted_tokens - first > first   # it learnt from round one
    assert_idle_and_accepting(on)


@pytest.mark.parametrize("engine_args", [
    {"max_num_batched_tokens": 8},                       # prompts in chunks, drafts cut to the budget
    {"kv_cache_memory_bytes": 40 * 1024},                # few blocks: sequences are preempted and recomputed
], ids=["chunked_prefill", "preemption"])
def test_greedy_output_is_unchanged_under_scheduling_pressure(llama_dir, engine_args):
    off = completions(make_llm(llama_dir, spec=False), prompts=PROMPTS * 2)
    on = make_llm(llama_dir, spec=True, **engine_args)
    assert completions(on, prompts=PROMPTS * 2) == off
    assert_idle_and_accepting(on)
    if "kv_cache_memory_bytes" in engine_args:
        assert on.engine.scheduler.num_preemptions > 0


def test_prefix_cache_serves_the_right_blocks_after_rollbacks(llama_dir):
    """Blocks published while drafts were rolled back hold exactly their tokens' K/V: prompts that reuse
    them (the earlier prompts followed by their own outputs) continue exactly as without the cache."""
    on = make_llm(llama_dir, spec=True)
    assert_cached_continuations_are_exact(on, llama_dir)
    assert_idle_and_accepting(on)


def assert_cached_continuations_are_exact(on: LLM, target) -> None:
    """Prompts that are the earlier prompts followed by their own outputs hit the cache for at least half
    their tokens and continue exactly as ``target`` does without speculation or a cache."""
    first = completions(on)
    tokenizer = on.get_tokenizer()
    extended = [tokenizer.encode(p) + out[0][0] for p, out in zip(PROMPTS, first)]
    hits = on.engine.block_manager.prefix_hit_tokens
    again = completions(on, prompts=extended)
    assert on.engine.block_manager.prefix_hit_tokens - hits >= sum(len(ids) for ids in extended) // 2
    assert again == completions(make_llm(target, spec=False, enable_prefix_caching=False), prompts=extended)


def test_stop_conditions_hold_when_several_tokens_arrive(llama_dir):
    off_llm, on = make_llm(llama_dir, spec=False), make_llm(llama_dir, spec=True)
    reference = completions(off_llm)
    for outputs in reference:                          # stop on a token the output has late, after min_tokens
        tokens = outputs[0][0]
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[tokens[30]],
                                min_tokens=20)
        assert completions(on, params, prompts=[PROMPTS[reference.index(outputs)]]) == \
            completions(off_llm, params, prompts=[PROMPTS[reference.index(outputs)]])
    texts = [o.outputs[0].text for o in off_llm.generate(PROMPTS, GREEDY)]
    for prompt, text in zip(PROMPTS, texts):              # a stop string found in text, after several tokens at once
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[text[-12:-6]])
        on_out, off_out = on.generate([prompt], params)[0].outputs[0], off_llm.generate([prompt], params)[0].outputs[0]
        assert (on_out.text, on_out.token_ids, on_out.finish_reason, on_out.stop_reason) == \
            (off_out.text, off_out.token_ids, off_out.finish_reason, off_out.stop_reason)
        assert off_out.finish_reason == "stop"
    short = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    assert completions(on, short) == [[(o[0][0][:7], "length")] for o in reference]
    assert_idle_and_accepting(on)


def test_logprobs_are_those_without_speculation(llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3)
    off = make_llm(llama_dir, spec=False).generate(PROMPTS, params)
    on_llm = make_llm(llama_dir, spec=True)
    on = on_llm.generate(PROMPTS, params)
    for a, b in zip(off, on):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys()
            for token in x:
                assert abs(x[token].logprob - y[token].logprob) < 1e-4 and x[token].rank == y[token].rank
    assert_idle_and_accepting(on_llm)


def test_seeded_sampling_and_parallel_samples_are_unchanged(llama_dir):
    params = SamplingParams(temperature=0.7, top_k=20, max_tokens=40, ignore_eos=True, seed=11, n=2)
    on = make_llm(llama_dir, spec=True)
    first = completions(on, params)
    assert first == completions(make_llm(llama_dir, spec=False), params)
    assert completions(on, params) == first
    assert_idle_and_accepting(on)


def test_grammar_constrained_requests_decode_alongside_drafted_ones(llama_dir):
    """A constrained request is not speculated (one token per step, under its grammar's mask) while the
    unconstrained requests of the same steps are; both get what they get without speculation."""
    pytest.importorskip("llguidance")
    constrained = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs={"regex": "[0-9]{3}-[a-z]{2,30}"})
    prompts = ["Code: ", *PROMPTS]
    params = [constrained] + [GREEDY] * len(PROMPTS)
    on = make_llm(llama_dir, spec=True)
    outputs = on.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == \
        [o.outputs[0].token_ids for o in make_llm(llama_dir, spec=False).generate(prompts, params)]
    assert re.fullmatch("[0-9]{3}-[a-z]{2,30}", outputs[0].outputs[0].text)
    assert_idle_and_accepting(on)
