"""The scheduler's share of speculative decoding: which decoding sequences get drafts in a step, how many, and
what a step's accepted drafts move.

A running sequence that is one token behind gets up to k draft tokens from the proposer and is scheduled for
1 + k tokens through the scheduler's usual rule and allocation; the result says how many drafts were accepted,
and the rejected ones are never counted as computed (their K/V slots are written again later), so no block
holding them is ever published. A draft model's drafts are made in the worker after a step and come back with
its result; a sequence whose step samples then also gets blocks for the slots the draft model writes after it
(the proposer's lookahead). With adaptive speculation (:mod:`llmserve.spec_decode.adaptive`), each step caps
every decoding sequence's drafts (down to none) from its measured acceptance and the batch's size; a draft
model is told the caps too.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmserve.engine.sequence import Sequence
from llmserve.spec_decode.adaptive import AdaptiveSpeculation
from llmserve.spec_decode.drafts_from_worker import DraftsFromWorker
from llmserve.spec_decode.metrics import SpecDecodingStats
from llmserve.spec_decode.proposer import Proposer
from llmserve.spec_decode.step_cost_fit import DecodingStepShape


class DraftScheduling:
    """Per step: :meth:`begin_step`, :meth:`drafts_for` each running sequence, :meth:`end_schedule`; then, with
    the result, :meth:`take_drafts`, :meth:`observe_accepted` per drafting sequence and :meth:`keep_drafts`.
    Without a proposer every sequence drafts nothing and nothing here costs a step anything."""

    def __init__(self, proposer: Proposer | None, adaptive: AdaptiveSpeculation | None,
                 max_model_len: int | None) -> None:
        self.proposer = proposer
        self.adaptive = adaptive
        self.max_model_len = max_model_len
        self.num_lookahead_slots = proposer.num_lookahead_slots if proposer else 0
        self.stats = SpecDecodingStats(
            num_accepted_tokens_per_pos=[0] * (proposer.num_speculative_tokens if proposer else 0))
        self._caps: dict[int, int] | None = None   # this step's adaptive caps (None: k for all)
        self._step_shape: DecodingStepShape | None = None   # the step awaiting its result, as priced
        self._drafts: dict[int, list[int]] = {}   # seq id -> drafts in the step awaiting its result

    def begin_step(self, running: Iterable[Sequence]) -> None:
        """Start scheduling a step: with adaptive speculation, cap each decoding sequence's drafts."""
        self._drafts = {}
        if self.adaptive is not None:
            decoding = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
            self._caps = self.adaptive.num_drafts([s.seq_id for s in decoding],
                                                  [s.num_computed_tokens for s in decoding])

    def drafts_for(self, seq: Sequence, budget: int) -> list[int]:
        """Drafts for a running sequence this step (none unless it decodes and may draft): none for pooling or
        grammar-constrained ones (their matcher lives with the sampler and is not rolled back) or before the
        first output token; never more than the step's ``budget``, ``max_tokens`` or the context length leave
        room to emit. The caller schedules them only if it also gets their blocks (:meth:`scheduled`)."""
        if (self.proposer is None or seq.num_tokens - seq.num_computed_tokens != 1
                or (self._caps is not None and self._caps.get(seq.seq_id, 0) == 0)):
            return []
        if not seq.output_token_ids or seq.pending_forks or seq.params.structured_outputs is not None:
            return []
        room = min(budget, seq.max_tokens - len(seq.output_token_ids))
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - seq.num_tokens)
        if self._caps is not None:
            room = min(room, self._caps[seq.seq_id] + 1)
        return self.proposer.propose(seq.seq_id, seq.all_token_ids, room - 1) if room > 1 else []

    def scheduled(self, seq: Sequence, drafts: list[int]) -> None:
        """``seq`` runs this step with ``drafts``."""
        if drafts:
            self._drafts[seq.seq_id] = drafts

    def preempted(self, seq: Sequence) -> None:
        self._drafts.pop(seq.seq_id, None)

    def step_drafts(self) -> dict[int, list[int]]:
        """The drafts of the step being scheduled, by sequence id (for its SchedulerOutput)."""
        return self._drafts

    def drafts_after_step(self, scheduled: list[tuple[Sequence, int]]) -> dict[int, int]:
        """What a draft model drafts after the step, per scheduled sequence (empty: k for all): its adaptive cap,
        and for a sequence not decoding yet the step's boldest cap."""
        if self._caps is None or not self.num_lookahead_slots:
            return {}
        new = max(self._caps.values(), default=0)
        return {seq.seq_id: self._caps.get(seq.seq_id, new) for seq, _ in scheduled}

    def end_schedule(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """The step is scheduled: price it if adaptive speculation's cost model covers its shape."""
        self._step_shape = self._decoding_shape(scheduled) if self.adaptive is not None else None

    def _decoding_shape(self, scheduled: list[tuple[Sequence, int]]) -> DecodingStepShape | None:
        """A step of decoding sequences only (the steps adaptive speculation's cost model prices), as priced; None
        for any other step."""
        tokens = row_context = token_context = 0
        for seq, n in scheduled:
            if seq.num_tokens - seq.num_computed_tokens != 1 or not seq.output_token_ids:
                return None
            tokens += n
            row_context += seq.num_computed_tokens
            token_context += n * seq.num_computed_tokens
        caps = [c for c in (self._caps or {}).values() if c > 0] if self.num_lookahead_slots else []
        return DecodingStepShape(len(scheduled), tokens, row_context, token_context, len(caps), max(caps, default=0))

    def observe_step_time(self, seconds: float) -> None:
        """The step just applied took ``seconds`` from scheduling to its result's bookkeeping: adaptive
        speculation's measure of what a step costs beyond its cost model."""
        if self._step_shape is not None:
            assert self.adaptive is not None
            self.adaptive.observe_step(seconds, self._step_shape)

    def take_drafts(self) -> dict[int, list[int]]:
        """The drafts of the step whose result has come (cleared here)."""
        drafts, self._drafts = self._drafts, {}
        return drafts

    def observe_accepted(self, seq_id: int, num_drafts: int, accepted: int) -> None:
        self.stats.observe(num_drafts, accepted)
        if self.adaptive is not None:
            self.adaptive.tracker.observe(seq_id, num_drafts, accepted)

    def keep_drafts(self, drafts: dict[int, list[int]], running: dict[int, Sequence]) -> None:
        """Drafts the worker's draft model made after this step, for the next step of each still-running sequence."""
        assert isinstance(self.proposer, DraftsFromWorker)
        for seq_id, tokens in drafts.items():
            seq = running.get(seq_id)
            if seq is not None and tokens:
                self.proposer.add(seq_id, seq.num_tokens, tokens)

    def finished(self, seq: Sequence) -> None:
        """``seq`` left the engine: forget what was kept for it."""
        if self.proposer is not None:
            self.proposer.remove(seq.seq_id, seq.all_token_ids)
        if self.adaptive is not None:
            self.adaptive.tracker.remove(seq.seq_id)
