"""Real engine steps against adaptive speculation's start-up cost model (:mod:`llmserve.spec_decode.adaptive`).

The start-up model times the model's forward alone, over one-token rows. A real step also schedules, prepares
its inputs, proposes drafts, samples and keeps its books, and a verifying row's tokens cost more than one-token
rows of the same count. So each step of decoding sequences is recorded as its seconds against two model
figures, the step without its drafts and what the drafts add, and a least-squares line over recent steps
(older ones decay) gives

    seconds = model without drafts + overhead + scale x model's figure for the drafts:

``overhead`` is paid once per step whatever its drafts (it makes them cheaper in proportion), ``scale`` is what a
drafted token really costs against the model. Until steps with and without drafts have been seen, the scale
leans on 1 (the model is taken at its word).
"""

from __future__ import annotations

from dataclasses import dataclass

# Per step, the recorded steps count this much less (about the last 200 weigh).
FIT_DECAY = 0.995
# How firmly the scale leans on 1: a prior worth this many steps whose drafts' figure is the mean's (it decides
# only while the recorded steps' figures hardly differ).
SCALE_PRIOR_STEPS = 1.0
# The scale is kept within these bounds: outside them the fit is noise (a step slowed by something else).
MIN_SCALE, MAX_SCALE = 0.5, 8.0


@dataclass(frozen=True)
class DecodingStepShape:
    """A step of decoding sequences only, as the cost model prices it: its rows and tokens (a row checking ``k``
    drafts computes ``1 + k``), the sums of each row's and each token's context, and the draft model's
    drafting rows and passes after it."""

    num_rows: int
    num_tokens: int
    row_context: int
    token_context: int
    drafting_rows: int = 0
    draft_passes: int = 0


class StepCostFit:
    """The decayed least-squares fit of a step's excess over the model without drafts (``seconds - base``) on
    the model's figure for its drafts (``drafts``)."""

    def __init__(self) -> None:
        self._weight = self._drafts = self._drafts_sq = self._excess = self._cross = 0.0

    def observe(self, seconds: float, base: float, drafts: float) -> None:
        excess = seconds - base
        d = FIT_DECAY
        self._weight = d * self._weight + 1.0
        self._drafts = d * self._drafts + drafts
        self._drafts_sq = d * self._drafts_sq + drafts * drafts
        self._excess = d * self._excess + excess
        self._cross = d * self._cross + drafts * excess

    def overhead_and_scale(self) -> tuple[float, float]:
        """Seconds a step costs beyond the model (at least 0) and the drafts' scale; (0, 1) before any step."""
        if self._weight == 0.0:
            return 0.0, 1.0
        mean_drafts, mean_excess = self._drafts / self._weight, self._excess / self._weight
        spread = self._drafts_sq - self._weight * mean_drafts ** 2            # weighted sums of squares about
        co_spread = self._cross - self._weight * mean_drafts * mean_excess    # the means
        prior = SCALE_PRIOR_STEPS * mean_drafts ** 2 + 1e-18
        scale = min(MAX_SCALE, max(MIN_SCALE, (co_spread + prior) / (max(spread, 0.0) + prior)))
        return max(0.0, mean_excess - scale * mean_drafts), scale
