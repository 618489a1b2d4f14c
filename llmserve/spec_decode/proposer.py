"""What the scheduler needs of a proposer, and the one built for a :class:`SpeculativeConfig`."""

from __future__ import annotations

from typing import Protocol

from llmserve.spec_decode.config import SpeculativeConfig
from llmserve.spec_decode.drafts_from_worker import DraftsFromWorker
from llmserve.spec_decode.ngram_proposer import NgramProposer
from llmserve.spec_decode.suffix_proposer import SuffixProposer


class Proposer(Protocol):
    num_speculative_tokens: int
    # K/V slots after a sequence's scheduled tokens that its drafting writes (a draft model's), reserved with them
    num_lookahead_slots: int

    def propose(self, seq_id: int, token_ids: list[int], max_tokens: int) -> list[int]:
        """At most ``max_tokens`` (and ``num_speculative_tokens``) drafts to follow ``token_ids``."""

    def remove(self, seq_id: int, token_ids: list[int]) -> None:
        """The sequence finished (or was aborted) with ``token_ids``: drop its state (a proposer that learns
        from past requests keeps the tokens)."""


def make_proposer(config: SpeculativeConfig) -> Proposer:
    """The engine core's proposer (for ``draft_model``, the holder of the drafts the worker's draft model makes)."""
    if config.method == "draft_model":
        return DraftsFromWorker(config)
    return SuffixProposer(config) if config.method == "suffix" else NgramProposer(config)
