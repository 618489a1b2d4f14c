"""N-gram prompt lookup: the longest n-gram (within the bounds) ending the sequence that occurred before
with a continuation, its most recent occurrence, and up to k tokens that followed it; checked against a
plain search on random sequences over a small alphabet, growing as a decoding sequence does."""

from __future__ import annotations

import numpy as np

from llmserve.spec_decode.config import SpeculativeConfig
from llmserve.spec_decode.ngram_proposer import NgramIndex, NgramProposer


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
    for _ in range(150):
        tokens = rng.integers(0, 4, size=int(rng.integers(1, 40))).tolist()
        low = int(rng.integers(1, 4))
        high = low + int(rng.integers(0, 3))
        index = NgramIndex(low, high)
        length = int(rng.integers(1, 4))
        while length <= len(tokens):     # the index takes the tokens a few at a time
            index.extend(tokens[:length])
            k = int(rng.integers(1, 6))
            assert index.propose(k) == reference(tokens[:length], low, high, k), (tokens[:length], low, high, k)
            length += int(rng.integers(1, 4))


def test_longest_match_wins_over_a_more_recent_shorter_one():
    #            0  1  2  3  4  5  6  7  8  9
    tokens = [7, 1, 2, 3, 9, 5, 3, 8, 1, 2, 3]

    def lookup(low: int, high: int) -> list[int]:
        index = NgramIndex(low, high)
        index.extend(tokens)
        return index.propose(2)

    # "1 2 3" occurred at 1..3 (followed by 9); "3" alone occurred later at 6 (followed by 8).
    assert lookup(1, 3) == [9, 5]
    assert lookup(1, 1) == [8, 1]
    assert lookup(4, 5) == []   # nothing of length 4 repeats


def test_proposer_caps_drafts_and_follows_a_growing_sequence():
    proposer = NgramProposer(SpeculativeConfig("ngram", 3, prompt_lookup_min=2, prompt_lookup_max=3))
    tokens = [4, 5, 6, 7, 8, 4, 5]
    assert proposer.propose(0, tokens, max_tokens=10) == [6, 7, 8]
    assert proposer.propose(0, tokens, max_tokens=1) == [6]
    assert proposer.propose(0, tokens, max_tokens=0) == []
    tokens += [6, 9, 4, 5, 6]            # the index takes the new tokens only
    assert proposer.propose(0, tokens, max_tokens=10) == [9, 4, 5]
    proposer.remove(0, tokens)
    assert proposer.propose(0, [1, 2, 1, 2], max_tokens=10) == [1, 2]
