"""Adaptive speculation: how many drafts each running sequence checks in a step, chosen so that the step's
expected tokens per second beat those of the same step without speculation, down to none.

Two measurements decide it:

- **The step's cost** (:class:`StepCostModel`), measured at start-up: seconds of a decode-like step as a
  function of the tokens it computes (and, with a draft model, of the draft's forwards), interpolated between
  measured points, plus what each token adds per token of context it attends over (a verified draft attends
  over its sequence's whole context). On a GPU the curve is flat until the tensor cores fill, so drafts are
  nearly free at low load and costly at high load; on a CPU it rises early. The running engine's steps are
  fitted against it (:mod:`llmserve.spec_decode.step_cost_fit`, per batch-size class): what a real step costs
  beyond the model's forward (scheduling, the inputs' preparation, the outputs' bookkeeping) is paid once per
  step, whatever its drafts, and makes them cheaper in proportion; drafted tokens may cost more or less than
  the model says.
- **Each sequence's acceptance** (:class:`AcceptanceTracker`): the probability that a draft is accepted
  given the ones before it were, estimated from the sequence's recent steps (older ones decay) and, while it
  has few, from the engine's recent rate.

With acceptance ``a``, ``c`` drafts yield ``1 + a + ... + a^c`` tokens in expectation. The policy
(:func:`choose_num_drafts`) tries every cap ``c`` and every number of the most promising sequences that draft
``c`` tokens, and keeps the choice of most expected tokens per second, if it beats the step without drafts by
``min_speedup``; otherwise nobody drafts. Expected tokens per second of the batch is its throughput, and
per sequence the inverse of its mean TPOT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from llmserve.spec_decode.step_cost_fit import DecodingStepShape, StepCostFit

# A choice must beat no speculation by this factor: the cost model is measured on a machine that may be noisy.
MIN_SPEEDUP = 1.05
# Per step, older observations of a sequence (and of the engine) count this much less.
SEQ_DECAY, ENGINE_DECAY = 0.95, 0.99
# How many observations the engine's rate is worth in a sequence's estimate.
PRIOR_WEIGHT = 2.0
# The engine's rate starts as one observation of this rate, which never decays: when nobody drafts for a while
# the engine's estimate drifts back to it, and drafting is tried again.
INITIAL_RATE = 0.5
# The policy prices a step rounded to a grid of this many values per doubling (so its bound is kept per grid
# value), each on the side of fewer drafts.
GRID_PER_DOUBLING = 4


@dataclass(frozen=True)
class StepPricing:
    """What the policy adds to the start-up cost model for one step: the decoding sequences' mean ``context``
    (each token attends over it), ``overhead`` seconds a step costs beyond the model, and ``draft_scale``, what
    the drafts' tokens cost against what the model says (:mod:`llmserve.spec_decode.step_cost_fit`)."""

    context: float = 0.0
    overhead: float = 0.0
    draft_scale: float = 1.0

    def on_grid(self) -> StepPricing:
        """Rounded to the grid on the side of fewer drafts: context and scale up, overhead down."""
        return StepPricing(on_grid(self.context, math.ceil), on_grid(self.overhead, math.floor),
                           on_grid(self.draft_scale, math.ceil))


class StepCostModel:
    """Seconds of a step computing ``n`` tokens (one per row), at the measured ``token_counts``; with a draft
    model, ``draft_seconds`` are its forward's over ``n`` one-token rows (one forward per draft over the drafting
    rows: a sequence that does not draft is not fed to the draft). ``context_seconds``: what a token adds per
    token of context it attends over."""

    def __init__(self, token_counts: Sequence[int], target_seconds: Sequence[float],
                 draft_seconds: Sequence[float] | None = None, context_seconds: float = 0.0) -> None:
        if len(token_counts) < 1 or len(token_counts) != len(target_seconds) or \
                (draft_seconds is not None and len(draft_seconds) != len(token_counts)):
            raise ValueError("a step cost model needs one time per measured token count")
        self.token_counts = np.asarray(token_counts, dtype=np.float64)
        # A step of more tokens never costs less: a measurement below an earlier one was noise.
        self.target = np.maximum.accumulate(np.asarray(target_seconds, dtype=np.float64))
        self.draft = None if draft_seconds is None else np.maximum.accumulate(np.asarray(draft_seconds, dtype=np.float64))
        self.context = max(0.0, float(context_seconds))
        self._drafting: dict[tuple[int, int], np.ndarray] = {}
        self._never_pays: dict[tuple[int, int, float, StepPricing], float] = {}
        self._seconds: dict[tuple[int, int, int], float] = {}
        self._baseline: dict[int, float] = {}

    def _interp(self, seconds: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Linear between measured points; beyond the last, proportional to the tokens (weights are read once,
        the rest grows with the tokens)."""
        last_n, last_t = self.token_counts[-1], seconds[-1]
        inside = np.interp(n, self.token_counts, seconds)
        return np.where(n > last_n, last_t * n / last_n, inside)

    def step_time(self, num_tokens: np.ndarray | int, drafting_rows: np.ndarray | int = 0,
                  draft_passes: int = 0) -> np.ndarray:
        n = np.asarray(num_tokens, dtype=np.float64)
        time = self._interp(self.target, n)
        if self.draft is not None:
            drafting = np.maximum(np.asarray(drafting_rows, dtype=np.float64), 1)
            time = time + np.asarray(draft_passes) * self._interp(self.draft, drafting)
        return time

    def step_seconds(self, num_tokens: int, drafting_rows: int = 0, draft_passes: int = 0) -> float:
        """:meth:`step_time` of one step as a float, kept per shape (the engine asks after every step)."""
        key = (num_tokens, drafting_rows, draft_passes)
        if key not in self._seconds:
            if len(self._seconds) >= 4096:
                self._seconds.clear()
            self._seconds[key] = float(self.step_time(num_tokens, drafting_rows, draft_passes))
        return self._seconds[key]

    def drafting_step_times(self, rows: int, max_drafts: int) -> np.ndarray:
        """``[c - 1, j - 1]``: seconds of a step of ``rows`` decodes where ``j`` of them check ``c`` drafts each,
        for every ``c <= max_drafts`` and ``j <= rows`` (kept per batch size: the policy asks every step)."""
        key = (rows, max_drafts)
        if key not in self._drafting:
            c = np.arange(1, max_drafts + 1)[:, None]
            j = np.arange(1, rows + 1)[None, :]
            self._drafting[key] = self.step_time(rows + c * j, np.broadcast_to(j, (max_drafts, rows)), c)
        return self._drafting[key]

    def never_pays_up_to(self, rows: int, max_drafts: int, min_speedup: float,
                         pricing: StepPricing = StepPricing()) -> float:
        """An acceptance at or below which no drafts pay in a step of ``rows`` decodes, priced (kept per value):
        if every sequence's is, the policy's search would find nothing, so it is skipped. Found by bisection, as
        drafts' expected tokens only grow with acceptance; the bound returned is one that was checked."""
        key = (rows, max_drafts, min_speedup, pricing)
        if key not in self._never_pays:
            if len(self._never_pays) >= 4096:
                self._never_pays.clear()
            times, baseline = self.priced_times(rows, max_drafts, pricing)
            floor = min_speedup * rows / baseline
            j = np.arange(1, rows + 1)[None, :]

            def pays(a: float) -> bool:
                extra = j * np.cumsum(a ** np.arange(1, max_drafts + 1))[:, None]
                return bool(((rows + extra) / times).max() > floor)

            low, high = 0.0, 1.0
            if pays(low):
                low = -1.0   # drafts pay even when never accepted: the search always runs
            elif not pays(high):
                low = high
            else:
                while high - low > 1e-4:
                    middle = (low + high) / 2
                    low, high = (low, middle) if pays(middle) else (middle, high)
            self._never_pays[key] = low
        return self._never_pays[key]

    def priced_times(self, rows: int, max_drafts: int, pricing: StepPricing) -> tuple[np.ndarray, float]:
        """Seconds of a step of ``rows`` decodes for every drafting choice (as :meth:`drafting_step_times`) and
        without drafts, each token over the priced context, the drafts' part scaled, the overhead added."""
        c = np.arange(1, max_drafts + 1)[:, None]
        j = np.arange(1, rows + 1)[None, :]
        plain = self.baseline_time(rows)
        without = pricing.overhead + plain + self.context * pricing.context * rows
        drafts = self.drafting_step_times(rows, max_drafts) - plain + self.context * pricing.context * c * j
        return without + pricing.draft_scale * drafts, without

    def baseline_time(self, num_rows: int) -> float:
        """A step of ``num_rows`` decodes without speculation (and without a draft model), kept per batch size."""
        if num_rows not in self._baseline:
            self._baseline[num_rows] = float(self._interp(self.target, np.asarray(float(num_rows))))
        return self._baseline[num_rows]


def on_grid(value: float, rounding: Callable[[float], int]) -> float:
    """``value`` rounded (``math.ceil`` or ``math.floor``) to the grid of :data:`GRID_PER_DOUBLING` values per
    doubling; 0 for anything not positive."""
    if value <= 0.0:
        return 0.0
    return 2.0 ** (rounding(GRID_PER_DOUBLING * math.log2(value)) / GRID_PER_DOUBLING)


def choose_num_drafts(acceptance: Sequence[float], max_drafts: int, cost: StepCostModel,
                      min_speedup: float = MIN_SPEEDUP, pricing: StepPricing = StepPricing()) -> list[int]:
    """Drafts per sequence (in the order of ``acceptance``) for the step of most expected tokens per second:
    a cap ``c`` <= ``max_drafts`` for the ``j`` sequences of highest acceptance, the others none; all zero
    unless it beats the step without speculation by ``min_speedup``. The step is priced by ``pricing``, rounded
    to its grid."""
    rows = len(acceptance)
    choice = [0] * rows
    pricing = pricing.on_grid()
    if rows == 0 or max_drafts < 1 or max(acceptance) <= cost.never_pays_up_to(rows, max_drafts, min_speedup, pricing):
        return choice   # the common case under load, decided without the search
    a = np.clip(np.asarray(acceptance, dtype=np.float64), 0.0, 1.0)
    order = np.argsort(-a, kind="stable")
    # extra tokens of the j most promising rows drafting c each: sum over them of a + a^2 + ... + a^c
    powers = a[order][None, :] ** np.arange(1, max_drafts + 1)[:, None]
    extra = np.cumsum(np.cumsum(powers, axis=0), axis=1)
    times, baseline = cost.priced_times(rows, max_drafts, pricing)
    rates = (rows + extra) / times
    best = int(np.argmax(rates))   # the first best: fewest drafts, then fewest drafting rows
    c, j = divmod(best, rows)
    if rates.flat[best] <= min_speedup * rows / baseline:
        return choice
    for i in order[:j + 1]:
        choice[int(i)] = c + 1
    return choice


class AcceptanceTracker:
    """Each sequence's draft acceptance, from its recent steps, leaning on the engine's recent rate while it has
    few. A step with ``k`` drafts of which ``m`` were accepted is ``m`` successes and, if ``m < k``, one failure
    (the drafts after the first rejection were never tried).

    A sequence's counts decay lazily: they are kept as of the step of its last observation and scaled by
    ``SEQ_DECAY ** steps since`` when read or updated, so a step costs the rows that drafted, not every
    sequence tracked."""

    def __init__(self) -> None:
        self._counts: dict[int, tuple[float, float, int]] = {}   # seq id -> accepted, tried, as of this step
        self._step = 0
        self._engine = [0.0, 0.0]   # the engine's decayed accepted and tried drafts

    @property
    def engine_rate(self) -> float:
        return (self._engine[0] + INITIAL_RATE) / (self._engine[1] + 1.0)

    def _decayed(self, seq_id: int) -> tuple[float, float]:
        """The sequence's accepted and tried drafts, decayed to this step."""
        accepted, tried, step = self._counts.get(seq_id, (0.0, 0.0, self._step))
        factor = SEQ_DECAY ** (self._step - step)
        return accepted * factor, tried * factor

    def rate(self, seq_id: int) -> float:
        prior = PRIOR_WEIGHT * self.engine_rate
        accepted, tried = self._decayed(seq_id)
        return (accepted + prior) / (tried + PRIOR_WEIGHT)

    def observe(self, seq_id: int, num_drafts: int, num_accepted: int) -> None:
        tried = num_accepted + (num_accepted < num_drafts)
        seq_accepted, seq_tried = self._decayed(seq_id)
        self._counts[seq_id] = (seq_accepted + num_accepted, seq_tried + tried, self._step)
        self._engine[0] += num_accepted
        self._engine[1] += tried

    def decay(self) -> None:
        """One step passed: every observation counts a little less (a sequence that stopped drafting drifts
        back toward the engine's rate, so it is tried again if the engine's drafts are accepted)."""
        self._step += 1
        self._engine = [self._engine[0] * ENGINE_DECAY, self._engine[1] * ENGINE_DECAY]

    def remove(self, seq_id: int) -> None:
        self._counts.pop(seq_id, None)


class AdaptiveSpeculation:
    """The scheduler's view: per step, each running sequence's draft cap; per result, what was accepted; per
    engine step of decoding sequences, its seconds against the cost model's."""

    def __init__(self, cost: StepCostModel, max_drafts: int) -> None:
        self.cost = cost
        self.max_drafts = max_drafts
        self.tracker = AcceptanceTracker()
        # one fit per batch size class (1, 2-3, 4-7, 8-15, ...): what a step costs beyond the model grows with
        # its rows (each is scheduled, proposed for and booked), and a change of load must not bring another
        # load's figures with it
        self.fits: dict[int, StepCostFit] = {}

    def fit(self, num_rows: int) -> StepCostFit:
        """The fit of steps of about ``num_rows`` rows."""
        return self.fits.setdefault(num_rows.bit_length(), StepCostFit())

    def num_drafts(self, seq_ids: Sequence[int], context_lens: Sequence[int]) -> dict[int, int]:
        """Caps for the decoding sequences ``seq_ids`` with ``context_lens`` tokens computed."""
        self.tracker.decay()
        context = sum(context_lens) / len(context_lens) if context_lens else 0.0
        overhead, scale = self.fit(len(seq_ids)).overhead_and_scale()
        caps = choose_num_drafts([self.tracker.rate(s) for s in seq_ids], self.max_drafts, self.cost,
                                 pricing=StepPricing(context, overhead, scale))
        return dict(zip(seq_ids, caps))

    def observe_step(self, seconds: float, shape: DecodingStepShape) -> None:
        """An engine step of only decoding sequences, of ``shape``, took ``seconds``."""
        without = self.cost.baseline_time(shape.num_rows) + self.cost.context * shape.row_context
        model = self.cost.step_seconds(shape.num_tokens, shape.drafting_rows, shape.draft_passes) + \
            self.cost.context * shape.token_context
        self.fit(shape.num_rows).observe(seconds, without, model - without)
