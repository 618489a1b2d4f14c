"""Benchmark datasets: lengths within bounds, seeded and reproducible, ShareGPT files parsed like vLLM."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from llmserve.benchmarks.datasets import (SHAREGPT_MAX_PROMPT_LEN, SHAREGPT_MAX_TOTAL_LEN, ApproxTokenizer,
                                          CorpusText, HFTokenizer, allowed_token_ids, load_sharegpt,
                                          sample_prefix_repetition, sample_random, sample_sharegpt_synthetic,
                                          sharegpt_lengths, uniform_lengths)


@pytest.fixture(scope="module")
def tokenizer(llama_dir) -> HFTokenizer:
    return HFTokenizer(AutoTokenizer.from_pretrained(str(llama_dir)))


@pytest.fixture(scope="module")
def corpus(tokenizer) -> CorpusText:
    return CorpusText(tokenizer)


def test_random_token_prompts_bounds_and_seed(tokenizer):
    ids = allowed_token_ids(tokenizer.vocab_size, tokenizer.special_ids)
    reqs = sample_random(50, 40, 20, range_ratio=0.5, seed=3, token_ids=ids)
    assert len(reqs) == 50
    for r in reqs:
        assert 20 <= r.prompt_len <= 60 and len(r.prompt) == r.prompt_len
        assert 10 <= r.expected_output_len <= 30
        assert not set(r.prompt) & tokenizer.special_ids
    assert len({r.prompt_len for r in reqs}) > 5                     # lengths do vary
    again = sample_random(50, 40, 20, range_ratio=0.5, seed=3, token_ids=ids)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    other = sample_random(50, 40, 20, range_ratio=0.5, seed=4, token_ids=ids)
    assert [r.prompt for r in other] != [r.prompt for r in reqs]
    fixed = sample_random(5, 16, 8, seed=0, token_ids=ids)
    assert all(r.prompt_len == 16 and r.expected_output_len == 8 for r in fixed)
    with pytest.raises(ValueError):
        uniform_lengths(np.random.default_rng(0), 10, 1.0, 3)
    for mean in (0, -5):   # refused, not run as 1-token lengths
        with pytest.raises(ValueError, match="at least 1 token"):
            uniform_lengths(np.random.default_rng(0), mean, 0.0, 3)
    assert uniform_lengths(np.random.default_rng(0), 1, 0.9, 50).min() == 1   # spread below 1: at least 1


def test_random_text_prompts_have_the_token_count(corpus, tokenizer):
    reqs = sample_random(10, 64, 8, seed=1, corpus=corpus)
    for r in reqs:
        assert isinstance(r.prompt, str) and r.prompt_len == 64
        assert abs(len(tokenizer.encode(r.prompt)) - 64) <= 4     # decode + re-encode is nearly exact


def test_random_prefix_is_shared_by_every_request(tokenizer, corpus):
    """vLLM's --random-prefix-len: one prefix of that many tokens before each request's own input."""
    ids = allowed_token_ids(tokenizer.vocab_size, tokenizer.special_ids)
    reqs = sample_random(6, 10, 4, seed=2, token_ids=ids, prefix_len=12)
    assert all(r.prompt_len == 22 and len(r.prompt) == 22 for r in reqs)
    assert len({tuple(r.prompt[:12]) for r in reqs}) == 1 and len({tuple(r.prompt[12:]) for r in reqs}) == 6
    text = sample_random(3, 10, 4, seed=2, corpus=corpus, prefix_len=12)
    assert len(os.path.commonprefix([r.prompt for r in text])) >= 12 and all(r.prompt_len == 22 for r in text)
    assert [r.prompt for r in sample_random(4, 10, 4, seed=2, token_ids=ids)] == \
        [r.prompt for r in sample_random(4, 10, 4, seed=2, token_ids=ids, prefix_len=0)]
    with pytest.raises(ValueError, match="random-prefix-len"):
        sample_random(1, 10, 4, token_ids=ids, prefix_len=-1)


def test_sharegpt_lengths_follow_the_filter_and_the_shape():
    lengths = np.array(sharegpt_lengths(5000, seed=0))
    prompts, outputs = lengths[:, 0], lengths[:, 1]
    assert prompts.min() >= 4 and outputs.min() >= 4
    assert prompts.max() <= SHAREGPT_MAX_PROMPT_LEN
    assert (prompts + outputs).max() <= SHAREGPT_MAX_TOTAL_LEN
    assert 160 <= prompts.mean() <= 220 and 220 <= outputs.mean() <= 300     # documented ~187 / ~259
    assert np.median(prompts) < prompts.mean() and np.median(outputs) < outputs.mean()   # long right tails
    assert sharegpt_lengths(100, seed=7) == sharegpt_lengths(100, seed=7)
    assert sharegpt_lengths(100, seed=7) != sharegpt_lengths(100, seed=8)
    short = np.array(sharegpt_lengths(500, seed=1, max_total_len=300))
    assert (short.sum(1) <= 300).all()
    assert all(o == 16 for _, o in sharegpt_lengths(50, seed=1, fixed_output_len=16))


def test_sharegpt_synthetic_requests(corpus, tokenizer):
    reqs = sample_sharegpt_synthetic(20, corpus, seed=5, as_token_ids=True)
    assert [(r.prompt_len, r.expected_output_len) for r in reqs] == sharegpt_lengths(20, seed=5)
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    again = sample_sharegpt_synthetic(20, corpus, seed=5, as_token_ids=True)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    texts = sample_sharegpt_synthetic(3, corpus, seed=5)
    assert all(isinstance(r.prompt, str) and r.prompt for r in texts)


def test_sharegpt_file(tmp_path, tokenizer):
    words = "the quick brown fox jumps over the lazy dog "
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": words * 3}, {"from": "gpt", "value": words * 5}]},
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": words}]},  # short
        {"id": "c", "conversations": [{"from": "human", "value": words}]},                               # one turn
        {"id": "d", "messages": [{"role": "user", "content": words * 2}, {"role": "assistant", "content": words}]},
        {"id": "e", "conversations": [{"from": "human", "value": words * 400}, {"from": "gpt", "value": "ok ok"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = load_sharegpt(path, 2, tokenizer, seed=0)
    assert sorted(r.prompt for r in reqs) == sorted([words * 3, words * 2])   # b too short, c one turn, e too long
    for r in reqs:
        assert r.prompt_len == len(tokenizer.encode(r.prompt))
        completion = words * 5 if r.prompt == words * 3 else words
        assert r.expected_output_len == len(tokenizer.encode(completion))
    assert [r.prompt for r in load_sharegpt(path, 2, tokenizer, seed=0)] == [r.prompt for r in reqs]
    more = load_sharegpt(path, 5, tokenizer, seed=0, fixed_output_len=7)
    assert len(more) == 5 and all(r.expected_output_len == 7 for r in more)    # reused to fill
    ids = load_sharegpt(path, 1, tokenizer, seed=0, as_token_ids=True)[0]
    assert isinstance(ids.prompt, list) and len(ids.prompt) == ids.prompt_len
    approx = load_sharegpt(path, 1, ApproxTokenizer(4.0), seed=1)[0]
    assert approx.prompt_len == -(-len(approx.prompt) // 4)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([data[2]]))
    with pytest.raises(ValueError):
        load_sharegpt(empty, 1, tokenizer)


def test_prefix_repetition(tokenizer, corpus):
    ids = allowed_token_ids(tokenizer.vocab_size, tokenizer.special_ids)
    reqs = sample_prefix_repetition(10, 32, 8, 3, 5, seed=0, token_ids=ids)
    assert len(reqs) == 10 and all(len(r.prompt) == 40 and r.expected_output_len == 5 for r in reqs)
    prefixes = {tuple(r.prompt[:32]) for r in reqs}
    assert len(prefixes) == 3
    assert len({tuple(r.prompt[32:]) for r in reqs}) == 10
    text = sample_prefix_repetition(4, 16, 4, 2, 3, seed=0, corpus=corpus)
    assert all(isinstance(r.prompt, str) for r in text)


def test_approx_tokenizer_round_trips():
    tok = ApproxTokenizer(4.0)
    units = tok.encode("abcdefghij")
    assert len(units) == 3 and tok.decode(units) == "abcdefghij"
    corpus = CorpusText(tok, "0123456789" * 10)
    assert len(corpus.text_of_length(5, __import__("random").Random(0))) == 20
