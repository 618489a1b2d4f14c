"""Adaptive speculation: drafts are checked only where they pay for their cost in expected tokens per second,
by the step-cost model and each sequence's measured acceptance; with acceptance 0 the engine stops drafting
(and greedy output is unchanged)."""

from __future__ import annotations

import numpy as np
import pytest

from llmserve.spec_decode.adaptive import (ENGINE_DECAY, GRID_PER_DOUBLING, INITIAL_RATE, MIN_SPEEDUP,
                                           PRIOR_WEIGHT, SEQ_DECAY, AcceptanceTracker, AdaptiveSpeculation,
                                           StepCostModel, StepPricing, choose_num_drafts)
from llmserve.spec_decode.step_cost_fit import DecodingStepShape
from tests.spec_decode.test_draft_model import draft_llm
from tests.spec_decode.test_spec_equivalence import PROMPTS, completions, make_llm

COUNTS = [1, 2, 4, 8, 16, 32, 64]
FLAT_THEN_LINEAR = [10.0, 10.0, 10.0, 10.0, 10.0, 20.0, 40.0]   # a GPU: free until the cores fill
LINEAR = [float(n) for n in COUNTS]                           # every token costs the same


def test_the_choice_is_the_best_of_every_cap_and_number_of_drafting_sequences():
    """Against a search written out: ``c`` drafts accepted with probability ``a`` each (given the earlier ones)
    yield 1 + a + ... + a^c tokens; the ``j`` most promising sequences draft ``c``; a step costs its overhead, the
    model's time for its rows and their context, and the drafts' part (the model's time for the extra tokens,
    their context, a draft model's forwards) times the scale; the first best choice (fewest drafts, then fewest
    sequences) is taken if it beats no drafts by the margin."""
    rng = np.random.default_rng(1)

    def grid(value: float, rounding) -> float:   # GRID_PER_DOUBLING values per doubling
        return 0.0 if value <= 0 else 2 ** (rounding(GRID_PER_DOUBLING * np.log2(value)) / GRID_PER_DOUBLING)

    for _ in range(300):
        rows, max_drafts = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        acceptance = rng.random(rows).round(2).tolist()
        times = np.maximum.accumulate(rng.random(len(COUNTS)) * 10 + 1).tolist()
        draft = None if rng.random() < 0.5 else (rng.random(len(COUNTS)) * 2).tolist()
        per_context = 0.0 if rng.random() < 0.3 else float(rng.random() * 0.01)
        cost = StepCostModel(COUNTS, times, draft, per_context)
        pricing = StepPricing(float(rng.integers(0, 500)), float(rng.random() * 10 * (rng.random() < 0.7)),
                              float(0.5 + 2 * rng.random()) if rng.random() < 0.7 else 1.0)
        context = grid(pricing.context, np.ceil)      # priced on the side of fewer drafts
        overhead = grid(pricing.overhead, np.floor)
        scale = grid(pricing.draft_scale, np.ceil)
        plain = cost.baseline_time(rows) + per_context * context * rows

        def seconds(c: int, j: int) -> float:
            drafts = cost.step_time(rows + c * j, j, c).item() - cost.baseline_time(rows) + per_context * context * c * j
            return overhead + plain + scale * drafts

        order = sorted(range(rows), key=lambda i: -acceptance[i])
        best_rate, best = MIN_SPEEDUP * rows / (overhead + plain), (0, 0)
        for c in range(1, max_drafts + 1):
            for j in range(1, rows + 1):
                tokens = rows + sum(sum(acceptance[i] ** p for p in range(1, c + 1)) for i in order[:j])
                rate = tokens / seconds(c, j)
                if rate > best_rate * (1 + 1e-12):
                    best_rate, best = rate, (c, j)
        expected = [0] * rows
        for i in order[:best[1]]:
            expected[i] = best[0]
        assert choose_num_drafts(acceptance, max_drafts, cost, pricing=pricing) == expected


def test_cost_model_interpolates_and_never_falls():
    cost = StepCostModel(COUNTS, [1.0, 3.0, 2.0, 4.0, 8.0, 16.0, 32.0])   # 2.0 at 4 tokens is noise
    assert cost.step_time(3).item() == 3.0 and cost.step_time(6).item() == 3.5
    assert cost.step_time(128).item() == 64.0                               # beyond: proportional to the tokens
    with_draft = StepCostModel(COUNTS, LINEAR, [0.5 * n for n in COUNTS])
    assert with_draft.step_time(8, drafting_rows=2, draft_passes=3).item() == 8 + 3 * 1.0
    assert with_draft.baseline_time(8) == 8.0   # no draft model at all


def test_drafts_when_tokens_are_free_and_acceptance_high():
    cost = StepCostModel(COUNTS, FLAT_THEN_LINEAR)
    assert choose_num_drafts([0.8] * 4, 4, cost) == [3, 3, 3, 3]             # 16 tokens: the most still free
    assert choose_num_drafts([0.8] * 4, 2, cost) == [2, 2, 2, 2]


def test_no_drafts_when_they_cannot_pay():
    assert choose_num_drafts([0.0, 0.0, 0.0], 4, StepCostModel(COUNTS, FLAT_THEN_LINEAR)) == [0, 0, 0]
    assert choose_num_drafts([0.9] * 3, 4, StepCostModel(COUNTS, LINEAR)) == [0, 0, 0]   # never cheaper per token
    big_batch = StepCostModel(COUNTS, FLAT_THEN_LINEAR)   # 64 decodes fill the step: a draft doubles its cost
    assert choose_num_drafts([0.6] * 64, 4, big_batch) == [0] * 64


def test_below_the_break_even_acceptance_nobody_drafts_and_just_above_it_the_search_drafts():
    """The bound that lets a step skip the search is the acceptance at which drafts start to pay (to 1e-4)."""
    cost = StepCostModel(COUNTS, [10.0, 10.0, 10.0, 12.0, 20.0, 40.0, 80.0])
    bound = cost.never_pays_up_to(8, 4, MIN_SPEEDUP)
    assert 0.0 < bound < 1.0
    assert choose_num_drafts([bound] * 8, 4, cost) == [0] * 8
    assert choose_num_drafts([bound + 1e-3] * 8, 4, cost) != [0] * 8
    assert StepCostModel(COUNTS, LINEAR).never_pays_up_to(3, 4, MIN_SPEEDUP) == 1.0   # drafts never pay


def test_a_steps_overhead_makes_drafts_pay_their_scale_and_context_make_them_cost():
    """Seconds a step pays once whatever its tokens (scheduling, bookkeeping) are shared by more tokens when they
    are drafted; every verified token attends over its sequence's context; drafted tokens that cost more than
    the model says (the scale) pay less."""
    linear = StepCostModel(COUNTS, LINEAR)
    assert choose_num_drafts([0.9] * 3, 4, linear) == [0, 0, 0]
    assert choose_num_drafts([0.9] * 3, 4, linear, pricing=StepPricing(overhead=100.0)) != [0, 0, 0]
    free = StepCostModel(COUNTS, FLAT_THEN_LINEAR, context_seconds=0.05)
    assert choose_num_drafts([0.8] * 4, 4, free) == [3, 3, 3, 3]
    assert choose_num_drafts([0.8] * 4, 4, free, pricing=StepPricing(context=512)) == [0, 0, 0, 0]
    flat = StepCostModel(COUNTS, [10.0, 10.0, 10.0, 12.0, 20.0, 40.0, 80.0])
    assert choose_num_drafts([0.6] * 4, 3, flat) != [0] * 4
    assert choose_num_drafts([0.6] * 4, 3, flat, pricing=StepPricing(draft_scale=8.0)) == [0] * 4


def test_the_policy_prices_steps_by_the_fit_of_real_ones():
    """Steps that take 3 seconds more than the model, whose drafts cost twice what it says, move the policy's
    pricing there (within the pull of the scale's prior toward 1)."""
    policy = AdaptiveSpeculation(StepCostModel(COUNTS, LINEAR, context_seconds=0.01), 4)
    for i in range(600):   # 8 rows over 100 tokens of context each, drafting 0-7 tokens
        drafts = i % 8
        shape = DecodingStepShape(8, 8 + drafts, 800, 100 * (8 + drafts))
        policy.observe_step(3.0 + (8 + 8) + 2 * (drafts + drafts), shape)   # rows and context, drafts doubled
    overhead, scale = policy.fit(8).overhead_and_scale()
    assert overhead == pytest.approx(3.0, rel=0.05) and scale == pytest.approx(2.0, rel=0.05)
    assert policy.fit(9).overhead_and_scale() == (overhead, scale)   # one fit for 8-15 rows,
    assert policy.fit(2).overhead_and_scale() == (0.0, 1.0)          # another for 2-3, with no steps yet
    assert policy.num_drafts([1, 2], [100, 300]) == {1: 0, 2: 0}   # the engine's prior rate: no drafts pay


def test_only_the_sequences_whose_drafts_pay_draft():
    cost = StepCostModel(COUNTS, [10.0, 10.0, 10.0, 10.0, 20.0, 40.0, 80.0])
    choice = choose_num_drafts([0.05, 0.9, 0.0, 0.85], 3, cost)
    assert choice[1] > 0 and choice[3] > 0 and choice[0] == choice[2] == 0


def test_a_draft_models_forwards_count():
    free_target = StepCostModel(COUNTS, FLAT_THEN_LINEAR)
    assert choose_num_drafts([0.5], 3, free_target) != [0]
    costly_draft = StepCostModel(COUNTS, FLAT_THEN_LINEAR, [6.0] * len(COUNTS))   # each draft forward: 0.6 step
    assert choose_num_drafts([0.5], 3, costly_draft) == [0]


def test_acceptance_estimates_follow_each_sequence_and_the_engine():
    tracker = AcceptanceTracker()
    assert tracker.rate(1) == pytest.approx(0.5)         # nothing seen: the initial guess
    for _ in range(10):
        tracker.observe(1, 4, 4)                          # all accepted: 4 successes
        tracker.observe(2, 4, 0)                          # first rejected: 1 failure
        tracker.decay()
    assert tracker.rate(1) > 0.9 and tracker.rate(2) < 0.2
    assert 0.5 < tracker.engine_rate < 1.0
    assert tracker.rate(3) == pytest.approx(tracker.engine_rate)   # a new sequence starts at the engine's rate
    tracker.remove(1)
    assert tracker.rate(1) == pytest.approx(tracker.engine_rate)


def test_lazy_decay_equals_decaying_every_sequence_every_step():
    """The tracker scales a sequence's counts only when it reads or updates them; the estimates are those of
    multiplying every tracked sequence's counts by the decay at every step."""
    rng = np.random.default_rng(0)
    tracker = AcceptanceTracker()
    accepted: dict[int, float] = {}
    tried: dict[int, float] = {}
    engine = [0.0, 0.0]
    for _ in range(2000):
        seq_id, op = int(rng.integers(8)), rng.random()
        if op < 0.4:
            drafts = int(rng.integers(1, 5))
            ok = int(rng.integers(drafts + 1))
            tracker.observe(seq_id, drafts, ok)
            accepted[seq_id] = accepted.get(seq_id, 0.0) + ok
            tried[seq_id] = tried.get(seq_id, 0.0) + ok + (ok < drafts)
            engine = [engine[0] + ok, engine[1] + ok + (ok < drafts)]
        elif op < 0.9:
            tracker.decay()
            accepted = {s: v * SEQ_DECAY for s, v in accepted.items()}
            tried = {s: v * SEQ_DECAY for s, v in tried.items()}
            engine = [engine[0] * ENGINE_DECAY, engine[1] * ENGINE_DECAY]
        else:
            tracker.remove(seq_id)
            accepted.pop(seq_id, None)
            tried.pop(seq_id, None)
        engine_rate = (engine[0] + INITIAL_RATE) / (engine[1] + 1.0)
        assert tracker.engine_rate == pytest.approx(engine_rate, rel=1e-12)
        for s in range(8):
            eager = (accepted.get(s, 0.0) + PRIOR_WEIGHT * engine_rate) / (tried.get(s, 0.0) + PRIOR_WEIGHT)
            assert tracker.rate(s) == pytest.approx(eager, rel=1e-12)


def test_a_draft_that_is_almost_never_accepted_is_turned_off(llama_dir, small_draft_dir):
    """The 1-layer draft (other random weights) is (nearly) never right: adaptive speculation soon stops drafting, while
    greedy output stays the output without speculation."""
    off = completions(make_llm(llama_dir, spec=False), prompts=PROMPTS)
    fixed = draft_llm(llama_dir, small_draft_dir)
    assert completions(fixed, prompts=PROMPTS) == off
    adaptive = make_llm(llama_dir, spec=False, speculative_config={
        "model": str(small_draft_dir), "num_speculative_tokens": 3, "adaptive": True})
    assert completions(adaptive, prompts=PROMPTS) == off
    fixed_drafts = fixed.engine.scheduler.spec_stats.num_draft_tokens
    assert fixed_drafts > 100 and fixed.engine.scheduler.spec_stats.num_accepted_tokens <= fixed_drafts // 100
    assert adaptive.engine.scheduler.spec_stats.num_draft_tokens <= fixed_drafts // 5
    bm = adaptive.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
