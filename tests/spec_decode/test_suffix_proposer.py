"""Suffix decoding: a request's tree grown token by token holds exactly the counted suffixes (cut at the
tree depth) of its tokens; drafts follow the most frequent continuation of the longest matching tail, no
longer than the match (max_spec_factor 1) and only while a continuation is frequent enough; finished
requests feed a global tree that later requests draft from; past max_cached_requests the oldest request's
suffixes leave it, so its size stays bounded."""

from __future__ import annotations

import random

from llmserve.spec_decode.config import SpeculativeConfig
from llmserve.spec_decode.suffix_proposer import SuffixProposer, SuffixTree


def paths(tree: SuffixTree) -> dict[tuple[int, ...], int]:
    """Every path of the tree with its count."""
    out, stack = {}, [((), tree.root)]
    while stack:
        prefix, node = stack.pop()
        for token, child in node.children.items():
            out[prefix + (token,)] = child.count
            stack.append((prefix + (token,), child))
    return out


def config(**kwargs) -> SpeculativeConfig:
    kwargs.setdefault("num_speculative_tokens", 8)
    kwargs.setdefault("suffix_decoding_max_tree_depth", 6)
    return SpeculativeConfig("suffix", **kwargs)


def test_growing_a_tree_token_by_token_equals_adding_the_sequence():
    rng = random.Random(0)
    for _ in range(50):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
        grown, active = SuffixTree(5), []
        for token in tokens:
            active = grown.extend(active, token)
        whole = SuffixTree(5)
        whole.add(tokens)
        assert paths(grown) == paths(whole)
        expected: dict[tuple[int, ...], int] = {}
        for start in range(len(tokens)):
            for end in range(start + 1, min(len(tokens), start + 5) + 1):
                key = tuple(tokens[start:end])
                expected[key] = expected.get(key, 0) + 1
        assert paths(whole) == expected


def test_drafts_follow_the_most_frequent_continuation_of_the_longest_tail():
    proposer = SuffixProposer(config())
    assert proposer.propose(0, [1, 2, 3, 4, 1, 2], max_tokens=8) == [3, 4]       # as long as the match (2)
    assert proposer.propose(0, [1, 2, 3, 4, 1, 2, 3], max_tokens=8) == [4, 1, 2]
    assert proposer.propose(0, [1, 2, 3, 4, 1, 2, 3], max_tokens=1) == [4]
    # After 7: 8 twice, 9 once; a longer tail (5 7) picks 9 where it occurred.
    tokens = [7, 8, 0, 7, 8, 0, 5, 7, 9, 0, 5, 7]
    assert SuffixProposer(config()).propose(1, tokens, 8)[:1] == [9]
    assert SuffixProposer(config()).propose(1, tokens[:-2] + [6, 7], 8)[:1] == [8]
    # min_token_prob: a continuation seen once of 3 times after "7" is not drafted at 0.5.
    tokens = [7, 1, 7, 2, 7, 3, 7]
    assert SuffixProposer(config(suffix_decoding_min_token_prob=0.5)).propose(2, tokens, 8) == []
    assert SuffixProposer(config(suffix_decoding_min_token_prob=0.1)).propose(2, tokens, 8) in ([1], [2], [3])


def test_finished_requests_teach_later_ones_and_the_oldest_are_forgotten():
    proposer = SuffixProposer(config(suffix_decoding_max_cached_requests=1))
    first = [10, 11, 12, 13, 14, 15]
    proposer.propose(0, first, 8)
    proposer.remove(0, first)
    assert proposer.propose(1, [99, 10, 11, 12], 8) == [13, 14, 15]   # learnt from request 0
    second = [20, 21, 22, 23]
    proposer.remove(1, second)
    only_second = SuffixTree(6)
    only_second.add(second)
    assert paths(proposer.global_tree) == paths(only_second)         # request 0 left the tree
    assert proposer.propose(2, [99, 10, 11, 12], 8) == []


def test_a_request_without_global_tree_drafts_from_itself_only():
    proposer = SuffixProposer(config(suffix_decoding_max_cached_requests=0))
    proposer.remove(0, [1, 2, 3, 4])
    assert paths(proposer.global_tree) == {}
    assert proposer.propose(1, [5, 1, 2], 8) == []
