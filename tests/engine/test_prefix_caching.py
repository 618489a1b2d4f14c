"""Prefix caching and parallel-sample sharing: requests with a common prefix reuse its KV blocks, the n
samples of a request prefill once and share the prompt's blocks (copy-on-write for the last partial
block), and none of it changes a single greedy token."""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams
from tests.hf_reference import hf_greedy

BLOCK = 4
SYSTEM = ("You are a helpful assistant. Answer briefly and precisely, quoting the documentation when you "
          "can, and never invent an API that does not exist.")
QUESTIONS = ["What does os.path.join do?", "How do I sort a dict by value?", "Explain list comprehensions.",
             "What is a context manager?", "Why use pathlib?"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def make_llm(path, caching: bool, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory_bytes", "8MiB")
    return LLM(str(path), block_size=BLOCK, enable_prefix_caching=caching, **kwargs)


def greedy_tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def assert_idle(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(rc == 0 for rc in bm.ref_counts)


def test_shared_prefix_is_computed_once_and_outputs_do_not_change(llama_dir):
    prompts = [SYSTEM + " " + q for q in QUESTIONS]
    expected = greedy_tokens(make_llm(llama_dir, caching=False), prompts)
    llm = make_llm(llama_dir, caching=True)
    first = greedy_tokens(llm, prompts[:1])
    bm = llm.engine.block_manager
    hits_before = bm.prefix_hit_tokens
    rest = greedy_tokens(llm, prompts[1:])
    assert first + rest == expected
    prefix_len = len(llm.get_tokenizer().encode(SYSTEM))
    # Each later prompt reuses (at least) every full block of the shared system prompt.
    assert bm.prefix_hit_tokens - hits_before >= (len(prompts) - 1) * (prefix_len // BLOCK - 1) * BLOCK
    assert_idle(llm)
    ids = llm.get_tokenizer().encode(prompts[2])
    assert rest[1] == hf_greedy(llama_dir, ids, 10)[0]


def test_hit_ending_mid_block_and_full_prompt_hit(llama_dir):
    """A prompt whose cached prefix ends inside a block recomputes only from that block; a prompt that is
    entirely cached still computes its last token (its logits are needed)."""
    tokenizer_llm = make_llm(llama_dir, caching=True)
    ids = tokenizer_llm.get_tokenizer().encode(SYSTEM)
    shorter = ids[:4 * BLOCK + 2]          # ends mid-block
    off = greedy_tokens(make_llm(llama_dir, caching=False), [ids, shorter, ids])
    llm = tokenizer_llm
    assert greedy_tokens(llm, [ids]) == off[:1]
    bm = llm.engine.block_manager
    hits = bm.prefix_hit_tokens
    assert greedy_tokens(llm, [shorter]) == off[1:2]
    assert bm.prefix_hit_tokens - hits == 4 * BLOCK      # the 4 full blocks before the cut
    hits = bm.prefix_hit_tokens
    assert greedy_tokens(llm, [ids]) == off[2:]          # everything cached but the last token's block
    assert bm.prefix_hit_tokens - hits == (len(ids) - 1) // BLOCK * BLOCK
    assert_idle(llm)


def test_different_continuations_share_only_the_common_blocks(llama_dir):
    llm = make_llm(llama_dir, caching=True)
    ids = llm.get_tokenizer().encode(SYSTEM)
    a = ids[:3 * BLOCK] + [101] * 6
    b = ids[:3 * BLOCK] + [102] * 6
    off = greedy_tokens(make_llm(llama_dir, caching=False), [a, b])
    assert greedy_tokens(llm, [a]) == off[:1]
    hits = llm.engine.block_manager.prefix_hit_tokens
    assert greedy_tokens(llm, [b]) == off[1:]
    assert llm.engine.block_manager.prefix_hit_tokens - hits == 3 * BLOCK


def test_eviction_under_memory_pressure_keeps_outputs_exact(llama_dir):
    """A cache far smaller than the workload: cached blocks are evicted (least recently used first) and
    reused blocks are overwritten, yet every output equals the no-caching run; preemption happens too."""
    prompts = [SYSTEM + " " + q for q in QUESTIONS] * 2
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    off = greedy_tokens(make_llm(llama_dir, caching=False, kv_cache_memory_bytes=48 * block_bytes(llama_dir)),
                        prompts, params)
    llm = make_llm(llama_dir, caching=True, kv_cache_memory_bytes=48 * block_bytes(llama_dir))
    assert greedy_tokens(llm, prompts, params) == off
    assert llm.engine.scheduler.num_preemptions > 0
    assert_idle(llm)
    # Another round after everything was evicted and recycled still matches.
    assert greedy_tokens(llm, prompts[:3], params) == off[:3]


def test_chunked_prefill_with_cache_hits(llama_dir):
    prompts = [SYSTEM + " " + q for q in QUESTIONS]
    off = greedy_tokens(make_llm(llama_dir, caching=False, max_num_batched_tokens=7), prompts)
    llm = make_llm(llama_dir, caching=True, max_num_batched_tokens=7)
    assert greedy_tokens(llm, prompts[:2]) == off[:2]
    assert greedy_tokens(llm, prompts[2:]) == off[2:]
    assert llm.engine.block_manager.prefix_hit_tokens > 0
    assert_idle(llm)


def block_bytes(path) -> int:
    import json

    cfg = json.loads((path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * BLOCK * cfg["num_key_value_heads"] * head_dim * 4


@pytest.mark.parametrize("caching", [True, False])
def test_n_samples_prefill_once_and_share_the_prompt_blocks(llama_dir, caching):
    llm = make_llm(llama_dir, caching=caching)
    engine, bm = llm.engine, llm.engine.block_manager
    ids = llm.get_tokenizer().encode(SYSTEM)[:6 * BLOCK + 2]   # last prompt block is partly filled
    engine.add_request("r", ids, SamplingParams(n=4, temperature=0.0, max_tokens=6, ignore_eos=True))
    engine.step()   # prefill once, then every sample gets its first token from the same logits
    prompt_blocks = -(-len(ids) // BLOCK)
    assert bm.num_blocks - bm.num_free_blocks == prompt_blocks        # one copy of the prompt, 4 holders
    assert len(engine.scheduler.running) == 4
    engine.step()   # each sample writes its token: the shared partial block is copied on write
    assert bm.num_blocks - bm.num_free_blocks == (prompt_blocks - 1) + 4
    full_prompt_blocks = [s.block_table[:prompt_blocks - 1] for s in engine.scheduler.running.values()]
    assert all(t == full_prompt_blocks[0] for t in full_prompt_blocks)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    samples = [c.token_ids for c in outputs[0].outputs]
    assert samples[0] == samples[1] == samples[2] == samples[3] == hf_greedy(llama_dir, ids, 6)[0]
    assert_idle(llm)


def test_seeded_parallel_samples_are_reproducible_and_distinct(llama_dir):
    llm = make_llm(llama_dir, caching=True)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    first = [c.token_ids for c in llm.generate(SYSTEM, params)[0].outputs]
    again = [c.token_ids for c in make_llm(llama_dir, caching=False).generate(SYSTEM, params)[0].outputs]
    assert first == again
    assert len({tuple(s) for s in first}) > 1
    assert_idle(llm)


def test_waste_per_sequence_is_below_one_block(llama_dir):
    llm = make_llm(llama_dir, caching=True)
    engine = llm.engine
    for i, q in enumerate(QUESTIONS):
        engine.add_request(str(i), SYSTEM + " " + q, SamplingParams(n=2, temperature=0.8, seed=i, max_tokens=9,
                                                                       ignore_eos=True))
        if i == 0:
            engine.step()   # the first prompt's blocks are cached once computed; the others then hit them
    while engine.has_unfinished_requests():
        engine.step()
        running = list(engine.scheduler.running.values())
        allocated, filled = engine.block_manager.waste(running)
        assert allocated - filled < max(1, len(running)) * BLOCK
        assert 0.0 <= engine.stats()["kv_cache_waste"] < 1.0
    stats = engine.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["prefix_cache_queries"] >= stats["prefix_cache_hits"]
    assert_idle(llm)


def test_prompt_logprobs_are_computed_even_when_the_prompt_is_cached(llama_dir):
    """A request that asks for prompt logprobs computes every prompt position (as vLLM, it skips the prefix
    cache): asking twice gives the same complete list, not ``None`` for the cached positions."""
    llm = LLM(str(llama_dir), block_size=BLOCK, kv_cache_memory_bytes="32MiB")
    prompt = SYSTEM + QUESTIONS[0]
    llm.generate([prompt], GREEDY)   # the prompt's blocks are now cached
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    first, second = (llm.generate([prompt], params)[0] for _ in range(2))
    for out in (first, second):
        assert out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
        assert all(pos is not None for pos in out.prompt_logprobs[1:])
    assert [p[t].logprob for p, t in zip(first.prompt_logprobs[1:], first.prompt_token_ids[1:])] == [
        p[t].logprob for p, t in zip(second.prompt_logprobs[1:], second.prompt_token_ids[1:])]
