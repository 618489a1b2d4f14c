"""N-gram prompt lookup: guess a sequence's next tokens by finding where its last few tokens occurred before
(in the prompt or its own output) and copying what followed there.

The longest n in ``[prompt_lookup_min, prompt_lookup_max]`` whose n-gram ending at the last token also
occurs earlier, with at least one token after it, wins; among occurrences of that length the last one
(the most recent context) is taken. The search is a few vectorised numpy passes: the candidates are the
earlier positions holding the last token, and each further pass keeps those whose previous token matches
too, so a step costs O(sequence length) in numpy, not O(length x n) in Python.

Tokens are kept per sequence in a growing numpy buffer (a sequence's tokens only ever grow), so a step
converts only the tokens appended since the last one.
"""

from __future__ import annotations

import numpy as np

from llmserve.spec_decode.config import SpeculativeConfig


def propose_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest n-gram (``min_n``
    <= n <= ``max_n``) ending ``tokens``; empty when there is none."""
    length = len(tokens)
    if length < min_n + 1 or k < 1:
        return tokens[:0]
    # Candidate ends e (< last position) of an earlier occurrence; a match of length n needs e >= n - 1.
    ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])
    matched = 1
    best = ends if min_n <= 1 else ends[:0]
    while ends.size and matched < max_n:
        ends = ends[ends >= matched]
        ends = ends[tokens[ends - matched] == tokens[length - 1 - matched]]
        matched += 1
        if ends.size and matched >= min_n:
            best = ends
    if not best.size:
        return tokens[:0]
    start = int(best[-1]) + 1
    return tokens[start:start + k]


class NgramProposer:
    """Drafts for the scheduler's running sequences, by sequence id."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.num_lookahead_slots = 0   # drafts come from the tokens; nothing is written ahead
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._tokens: dict[int, tuple[np.ndarray, int]] = {}   # seq id -> (buffer, tokens in it)

    def propose(self, seq_id: int, token_ids: list[int], max_tokens: int) -> list[int]:
        """At most ``max_tokens`` (and ``num_speculative_tokens``) drafts to follow ``token_ids``."""
        k = min(max_tokens, self.num_speculative_tokens)
        if k < 1:
            return []
        return propose_ngram(self._buffer(seq_id, token_ids), self.min_n, self.max_n, k).tolist()

    def remove(self, seq_id: int, token_ids: list[int]) -> None:
        """Forget a finished sequence's tokens (lookup reads only the sequence's own)."""
        self._tokens.pop(seq_id, None)

    def _buffer(self, seq_id: int, token_ids: list[int]) -> np.ndarray:
        buffer, filled = self._tokens.get(seq_id, (np.empty(0, dtype=np.int64), 0))
        length = len(token_ids)
        if length > buffer.size:
            grown = np.empty(max(length, 2 * buffer.size), dtype=np.int64)
            grown[:filled] = buffer[:filled]
            buffer = grown
        if length > filled:
            buffer[filled:length] = token_ids[filled:length]
        self._tokens[seq_id] = (buffer, length)
        return buffer[:length]
