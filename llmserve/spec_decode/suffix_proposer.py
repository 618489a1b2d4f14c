"""Suffix decoding: drafts from a suffix tree of the request's own prompt and output, and of a tree over
recent requests, kept by the engine core (the idea of Arctic Inference's suffix decoding, which vLLM calls
``method: "suffix"``).

A tree holds every suffix of its token sequences cut at ``max_depth`` tokens, each node counting how many
times its path occurred. To draft, the longest tail of the sequence (shorter than ``max_depth``) that is a
path of a tree is found, and the draft follows, from its end, the most frequent child while that child's
share of its parent's count is at least ``min_token_prob``, for at most ``max_spec_factor`` x the match
length (and ``num_speculative_tokens``) tokens. The request's own tree and the global one both propose;
the longer draft wins (the request's own on a tie).

A request's tree grows by the tokens appended since its last step: each suffix that is still shorter than
``max_depth`` (at most ``max_depth`` of them) takes one step down, so a step costs O(max_depth) Python work
whatever the sequence's length. A finished request's tokens go into the global tree; past
``max_cached_requests`` the oldest one's suffixes are taken out again (counts decremented, empty nodes
removed), so memory stays bounded by that many requests x their length x ``max_depth`` nodes.
"""

from __future__ import annotations

from collections import deque

from llmserve.spec_decode.config import SpeculativeConfig


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] = {}


class SuffixTree:
    """Counted suffixes (at most ``max_depth`` tokens long) of the sequences added to it."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node()

    def add(self, tokens: list[int], delta: int = 1) -> None:
        """Add (``delta`` 1) or take out (-1) every suffix of ``tokens`` cut at ``max_depth``."""
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start:start + self.max_depth]:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                child.count += delta
                if child.count == 0:
                    del node.children[token]
                    break
                node = child

    def extend(self, active: list[_Node], token: int) -> list[_Node]:
        """Append ``token`` to a growing sequence whose open suffixes end at ``active`` (the nodes of its
        suffixes shorter than ``max_depth``, shortest last); returns the new open suffixes."""
        grown = []
        for node in [*active, self.root]:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
            child.count += 1
            grown.append(child)
        depth_limit = self.max_depth - 1   # suffixes of max_depth tokens are complete
        return grown[-depth_limit:] if depth_limit > 0 else []

    def propose(self, context: list[int], k: int, max_spec_factor: float, min_token_prob: float) -> list[int]:
        """The draft after the longest tail of ``context`` that is a path of this tree (see the module)."""
        for length in range(min(len(context), self.max_depth - 1), 0, -1):
            node = self.root
            for token in context[len(context) - length:]:
                node = node.children.get(token)
                if node is None:
                    break
            if node is None or not node.children:
                continue
            draft: list[int] = []
            limit = min(k, int(max_spec_factor * length))
            while node.children and len(draft) < limit:
                token, child = max(node.children.items(), key=lambda item: item[1].count)
                if child.count < min_token_prob * node.count:
                    break
                draft.append(token)
                node = child
            return draft
        return []


class SuffixProposer:
    """Drafts for the scheduler's running sequences from their own suffix trees and the global one."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.num_lookahead_slots = 0   # drafts come from the trees; nothing is written ahead
        self.max_depth = config.suffix_decoding_max_tree_depth
        self.max_spec_factor = config.suffix_decoding_max_spec_factor
        self.min_token_prob = config.suffix_decoding_min_token_prob
        self.max_cached_requests = config.suffix_decoding_max_cached_requests
        self.global_tree = SuffixTree(self.max_depth)
        self._cached: deque[list[int]] = deque()
        # seq id -> (its tree, its open suffixes, tokens added so far)
        self._local: dict[int, tuple[SuffixTree, list[_Node], int]] = {}

    def propose(self, seq_id: int, token_ids: list[int], max_tokens: int) -> list[int]:
        k = min(max_tokens, self.num_speculative_tokens)
        if k < 1:
            return []
        tree, active, seen = self._local.get(seq_id) or (SuffixTree(self.max_depth), [], 0)
        for token in token_ids[seen:]:
            active = tree.extend(active, token)
        self._local[seq_id] = (tree, active, len(token_ids))
        context = token_ids[-self.max_depth:]
        # The last token's own suffixes are in the tree with nothing after them yet; only earlier occurrences
        # can have a continuation, which is what propose finds (a node without children is skipped).
        own = tree.propose(context, k, self.max_spec_factor, self.min_token_prob)
        if self.max_cached_requests == 0:
            return own
        other = self.global_tree.propose(context, k, self.max_spec_factor, self.min_token_prob)
        return other if len(other) > len(own) else own

    def remove(self, seq_id: int, token_ids: list[int]) -> None:
        """A sequence finished: forget its tree; its tokens join the global tree."""
        self._local.pop(seq_id, None)
        if self.max_cached_requests == 0:
            return
        tokens = list(token_ids)
        self.global_tree.add(tokens)
        self._cached.append(tokens)
        while len(self._cached) > self.max_cached_requests:
            self.global_tree.add(self._cached.popleft(), delta=-1)
