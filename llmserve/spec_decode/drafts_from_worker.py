"""The engine core's side of the draft-model proposer: it holds the drafts the worker's draft model made
after a sequence's last step (:mod:`llmserve.spec_decode.draft_model_proposer`), for the scheduler to check
in the sequence's next step.

Drafts are kept with the token count of the sequence they follow, and given only to a sequence that still has
that count: a sequence stopped, preempted and recomputed, or handed a token by any other path never gets drafts
made for other tokens.
"""

from __future__ import annotations

from llmserve.spec_decode.config import SpeculativeConfig


class DraftsFromWorker:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.num_lookahead_slots = config.num_lookahead_slots
        self._drafts: dict[int, tuple[int, list[int]]] = {}   # seq id -> (its token count, drafts after them)

    def add(self, seq_id: int, num_tokens: int, drafts: list[int]) -> None:
        """The worker drafted ``drafts`` to follow the sequence's first ``num_tokens`` tokens."""
        self._drafts[seq_id] = (num_tokens, drafts)

    def propose(self, seq_id: int, token_ids: list[int], max_tokens: int) -> list[int]:
        num_tokens, drafts = self._drafts.pop(seq_id, (-1, []))
        return drafts[:max(max_tokens, 0)] if num_tokens == len(token_ids) else []

    def remove(self, seq_id: int, token_ids: list[int]) -> None:
        self._drafts.pop(seq_id, None)
