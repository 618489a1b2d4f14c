"""N-gram prompt lookup: guess a sequence's next tokens by finding where its last few tokens occurred before
(in the prompt or its own output) and copying what followed there.

The longest n in ``[prompt_lookup_min, prompt_lookup_max]`` whose n-gram ending at the last token also
occurs earlier, with at least one token after it, wins; among occurrences of that length the last one
(the most recent context) is taken.

Each sequence keeps an index of its n-grams, one dictionary per n from each n-gram to the position where it
most recently ended. A sequence's tokens only ever grow (rejected drafts never join them), so a step indexes
the few tokens appended since the last one and a lookup is one dictionary probe per n: the step's cost does
not grow with the sequence's length, where a search over its tokens would (the scheduler asks every decoding
sequence every step). The index costs a few dictionary entries per token of the sequence.
"""

from __future__ import annotations

from llmserve.spec_decode.config import SpeculativeConfig


class NgramIndex:
    """One sequence's tokens and, for each n in ``[min_n, max_n]``, its n-grams by their most recent end among
    the positions that have a token after them."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}

    def extend(self, token_ids: list[int]) -> None:
        """Take the tokens of ``token_ids`` beyond those already held (it starts with them)."""
        tokens = self.tokens
        first = len(tokens)
        tokens.extend(token_ids[first:])
        for end in range(max(first - 1, 0), len(tokens) - 1):   # ends that now have a token after them
            for n, ends in self._ends.items():
                if n <= end + 1:
                    ends[tuple(tokens[end + 1 - n:end + 1])] = end

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest indexed n-gram
        ending the tokens; empty when there is none."""
        tokens = self.tokens
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self._ends[n].get(tuple(tokens[length - n:]))
            if end is not None:
                return tokens[end + 1:end + 1 + k]
        return []


class NgramProposer:
    """Drafts for the scheduler's running sequences, by sequence id."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.num_lookahead_slots = 0   # drafts come from the tokens; nothing is written ahead
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._indexes: dict[int, NgramIndex] = {}

    def propose(self, seq_id: int, token_ids: list[int], max_tokens: int) -> list[int]:
        """At most ``max_tokens`` (and ``num_speculative_tokens``) drafts to follow ``token_ids``."""
        k = min(max_tokens, self.num_speculative_tokens)
        if k < 1:
            return []
        index = self._indexes.get(seq_id)
        if index is None:
            index = self._indexes[seq_id] = NgramIndex(self.min_n, self.max_n)
        index.extend(token_ids)
        return index.propose(k)

    def remove(self, seq_id: int, token_ids: list[int]) -> None:
        """Forget a finished sequence's index (lookup reads only the sequence's own tokens)."""
        self._indexes.pop(seq_id, None)
