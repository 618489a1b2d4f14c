"""N-gram prompt lookup: the longest n-gram (within the bounds) ending the sequence that occurred before
with a continuation, its most recent occurrence, and up to k tokens that followed it; checked against a
plain Python search on random sequences over a small alphabet."""

from __future__ import annotations

import numpy as np

from llmserve.spec_decode.config import SpeculativeConfig
from llmserve.spec_decode.ngram_proposer import NgramProposer, propose_ngram


def reference(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):   # an occurrence with at least one token after it
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_matches_a_plain_search():
    rng = np.random.default_rng(0)
    for _ in range(400):
        tokens = rng.integers(0, 4, size=int(rng.integers(1, 40))).tolist()
        low = int(rng.integers(1, 4))
        high = low + int(rng.integers(0, 3))
        k = int(rng.integers(1, 6))
        got = propose_ngram(np.array(tokens, dtype=np.int64), low, high, k).tolist()
        assert got == reference(tokens, low, high, k), (tokens, low, high, k)


def test_longest_match_wins_over_a_more_recent_shorter_one():
    #            0  1  2  3  4  5  6  7  8  9
    tokens = [7, 1, 2, 3, 9, 5, 3, 8, 1, 2, 3]
    # "1 2 3" occurred at 1..3 (followed by 9); "3" alone occurred later at 6 (followed by 8).
    assert propose_ngram(np.array(tokens), 1, 3, 2).tolist() == [9, 5]
    assert propose_ngram(np.array(tokens), 1, 1, 2).tolist() == [8, 1]
    assert propose_ngram(np.array(tokens), 4, 5, 2).tolist() == []   # nothing of length 4 repeats


def test_proposer_caps_drafts_and_follows_a_growing_sequence():
    proposer = NgramProposer(SpeculativeConfig("ngram", 3, prompt_lookup_min=2, prompt_lookup_max=3))
    tokens = [4, 5, 6, 7, 8, 4, 5]
    assert proposer.propose(0, tokens, max_tokens=10) == [6, 7, 8]
    assert proposer.propose(0, tokens, max_tokens=1) == [6]
    assert proposer.propose(0, tokens, max_tokens=0) == []
    tokens += [6, 9, 4, 5, 6]            # the buffer takes the new tokens only
    assert proposer.propose(0, tokens, max_tokens=10) == [9, 4, 5]
    proposer.remove(0, tokens)
    assert proposer.propose(0, [1, 2, 1, 2], max_tokens=10) == [1, 2]
