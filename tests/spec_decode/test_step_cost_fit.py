"""The fit of real steps against the cost model: a per-step overhead and a scale for the drafts' cost, by least
squares over recent steps, the scale leaning on 1 until steps with different drafts have been seen."""

from __future__ import annotations

import pytest

from llmserve.spec_decode.step_cost_fit import FIT_DECAY, MAX_SCALE, MIN_SCALE, StepCostFit


def test_before_any_step_the_model_is_taken_at_its_word():
    assert StepCostFit().overhead_and_scale() == (0.0, 1.0)


def test_steps_without_drafts_give_the_overhead_and_leave_the_scale_at_one():
    fit = StepCostFit()
    for base in (2.0, 5.0, 3.0) * 50:
        fit.observe(base + 0.5, base, 0.0)
    assert fit.overhead_and_scale() == pytest.approx((0.5, 1.0))


def test_steps_that_all_draft_alike_cannot_tell_overhead_from_scale_and_keep_near_one():
    fit = StepCostFit()
    for _ in range(300):
        fit.observe(10.0 + 1.0 + 3.0, 10.0, 2.0)   # overhead 1 and drafts 1.5x, or overhead 2 and scale 1
    overhead, scale = fit.overhead_and_scale()
    assert scale == pytest.approx(1.0, abs=0.02) and overhead == pytest.approx(2.0, abs=0.05)


def test_older_steps_decay_and_the_scale_stays_within_its_bounds():
    fit = StepCostFit()
    for i in range(2000):
        drafts = float(i % 4)
        fit.observe(1.0 + 50 * drafts, 1.0, drafts)   # drafts 50x what the model says: beyond the bound
    assert fit.overhead_and_scale()[1] == MAX_SCALE
    for i in range(int(20 / (1 - FIT_DECAY))):        # then for many steps they cost half
        drafts = float(i % 4)
        fit.observe(1.0 + 0.5 * drafts, 1.0, drafts)
    overhead, scale = fit.overhead_and_scale()
    assert scale == pytest.approx(MIN_SCALE, rel=0.02) and overhead == pytest.approx(0.0, abs=0.05)
