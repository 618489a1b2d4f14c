"""Multi-step decoding in the scheduler (``--num-scheduler-steps``), without a model.

Specified: a step whose rows are all running decodes, greedy or unseeded random, with nothing asked of their logits
but the token runs up to N decode steps (``SchedulerOutput.num_steps``), cut to the tokens every row may still
generate; each row holds KV-cache blocks for every position the steps write. Any other row in the step (a prefill,
a seeded, penalised, biased, constrained or adapted request, one that asks logprobs or has not reached
``min_tokens``), a setting of 1, more rows than the workers' loop runs, or too few free blocks for the lookahead
(none taken then) makes it a plain step. When the result comes back, a row's tokens are appended in order
(``multi_step_tokens`` then ``sampled``), each but the last counted as computed, and the row stops at its first
stop: the tokens after it are dropped and its blocks freed, those its tokens filled published to the prefix cache
first. A runner that ran fewer steps returns fewer tokens.
"""

from __future__ import annotations

import pytest

from llmserve.engine.block_manager import BlockManager
from llmserve.engine.messages import ModelRunnerOutput
from llmserve.engine.multi_step import decodes_in_the_loop
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.sequence import Sequence, SequenceStatus
from llmserve.lora.request import LoRARequest
from llmserve.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
_ids = iter(range(10**9))


def make_seq(prompt_len: int = 5, max_tokens: int = 32, eos: int | None = None, prompt: list[int] | None = None,
             **params) -> Sequence:
    seq_id = next(_ids)
    return Sequence(seq_id, f"r{seq_id}", 0, prompt or [7] * prompt_len,
                    SamplingParams(max_tokens=max_tokens, **params), max_tokens, eos)


def make_scheduler(steps: int = 4, num_blocks: int = 64, max_model_len: int | None = None,
                   prefix_caching: bool = False, max_rows: int | None = None) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4, prefix_caching), 8, 64, True, max_model_len,
                     num_scheduler_steps=steps, multi_step_max_rows=max_rows)


def run_prefill(sched: Scheduler, *seqs: Sequence) -> None:
    """Admit and prefill ``seqs`` (one plain step: prompts of several tokens), each sampling token 1."""
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert out.num_steps == 1
    sched.update_from_output(out, ModelRunnerOutput(sampled={s.seq_id: 1 for s in seqs}))


def answer(sched: Scheduler, out, tokens: dict[int, list[int]]):
    """Answer a step as the runner does: each row's tokens, the last as ``sampled``."""
    return sched.update_from_output(out, ModelRunnerOutput(
        sampled={i: t[-1] for i, t in tokens.items()},
        multi_step_tokens={i: t[:-1] for i, t in tokens.items()} if out.num_steps > 1 else {}))


def test_greedy_decodes_run_n_steps_with_blocks_for_every_position():
    sched = make_scheduler(steps=4)
    a, b = make_seq(**GREEDY), make_seq(prompt_len=9, **GREEDY)
    run_prefill(sched, a, b)
    out = sched.schedule()
    assert out.num_steps == 4 and out.num_scheduled_tokens == {a.seq_id: 1, b.seq_id: 1}
    for seq in (a, b):   # positions num_tokens - 1 .. num_tokens + 2 are written
        assert len(seq.block_table) * 4 >= seq.num_tokens + 3
    step = answer(sched, out, {a.seq_id: [2, 3, 4, 5], b.seq_id: [6, 7, 8, 9]})
    assert a.output_token_ids == [1, 2, 3, 4, 5] and b.output_token_ids == [1, 6, 7, 8, 9]
    assert a.num_computed_tokens == a.num_tokens - 1 and b.num_computed_tokens == b.num_tokens - 1
    assert [t for s, t, _ in step.sampled if s is a] == [2, 3, 4, 5]


def test_the_step_count_is_cut_to_what_every_row_may_still_generate():
    sched = make_scheduler(steps=8, max_model_len=12)
    short, long = make_seq(max_tokens=4, **GREEDY), make_seq(prompt_len=3, **GREEDY)
    run_prefill(sched, short, long)
    out = sched.schedule()
    assert out.num_steps == 3   # `short` has 1 of its 4 tokens
    answer(sched, out, {short.seq_id: [2, 3, 4], long.seq_id: [2, 3, 4]})
    assert short.finish_reason == "length" and short.status is SequenceStatus.FINISHED
    out = sched.schedule()
    assert out.num_steps == 5   # max_model_len 12: `long` holds 7 tokens
    answer(sched, out, {long.seq_id: [5, 6, 7, 8, 9]})
    assert long.num_tokens == 12 and long.finish_reason == "length"


def test_a_stop_inside_the_steps_drops_the_tokens_after_it():
    sched = make_scheduler(steps=4)
    seq = make_seq(temperature=0.0, eos=9)
    run_prefill(sched, seq)
    out = sched.schedule()
    step = answer(sched, out, {seq.seq_id: [2, 9, 3, 4]})
    assert seq.output_token_ids == [1, 2, 9] and seq.finish_reason == "stop"
    assert [t for _, t, _ in step.sampled] == [2, 9]
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_blocks_filled_before_a_stop_are_published_to_the_prefix_cache():
    sched = make_scheduler(steps=4, prefix_caching=True)
    seq = make_seq(temperature=0.0, eos=9)
    run_prefill(sched, seq)
    answer(sched, sched.schedule(), {seq.seq_id: [2, 3, 9, 4]})
    assert seq.output_token_ids == [1, 2, 3, 9]
    again = make_seq(prompt=[7] * 5 + [1, 2, 3, 5], **GREEDY)
    assert sched.block_manager.match_prefix(again) == 8   # positions 4-7 (7, 1, 2, 3) were filled by the step


def test_a_runner_may_return_fewer_tokens():
    """(the loop ends after a stop token; a step the loop's LM head does not take runs plain)"""
    sched = make_scheduler(steps=4)
    seq = make_seq(**GREEDY)
    run_prefill(sched, seq)
    out = sched.schedule()
    assert out.num_steps == 4
    sched.update_from_output(out, ModelRunnerOutput(sampled={seq.seq_id: 2}))
    assert seq.output_token_ids == [1, 2] and seq.num_computed_tokens == 6
    answer(sched, sched.schedule(), {seq.seq_id: [3, 4]})
    assert seq.output_token_ids == [1, 2, 3, 4] and seq.num_computed_tokens == 8


def test_stop_token_ids_and_min_tokens():
    sched = make_scheduler(steps=4)
    seq = make_seq(temperature=0.0, stop_token_ids=[5], min_tokens=3)
    run_prefill(sched, seq)
    out = sched.schedule()
    assert out.num_steps == 1   # under min_tokens the sampler bans the stop token: a plain step
    answer(sched, out, {seq.seq_id: [2]})
    answer(sched, sched.schedule(), {seq.seq_id: [3]})
    out = sched.schedule()
    assert out.num_steps == 4
    answer(sched, out, {seq.seq_id: [4, 5, 6, 7]})
    assert seq.output_token_ids == [1, 2, 3, 4, 5] and seq.stop_reason == 5


def test_unseeded_random_rows_run_in_the_loop_too():
    sched = make_scheduler(steps=4)
    greedy, random = make_seq(**GREEDY), make_seq(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05)
    assert decodes_in_the_loop(random)
    run_prefill(sched, greedy, random)
    assert sched.schedule().num_steps == 4


@pytest.mark.parametrize("params", [
    dict(temperature=0.7, seed=1), dict(temperature=0.0, repetition_penalty=1.2),
    dict(temperature=0.0, presence_penalty=0.5),
    dict(temperature=0.0, frequency_penalty=0.5), dict(temperature=0.0, logit_bias={3: 1.0}),
    dict(temperature=0.0, logprobs=0), dict(temperature=0.0, structured_outputs={"choice": ["a", "b"]}),
])
def test_a_row_the_loop_cannot_compute_makes_a_plain_step(params):
    sched = make_scheduler(steps=4)
    plain, other = make_seq(**GREEDY), make_seq(**params)
    assert not decodes_in_the_loop(other)
    run_prefill(sched, plain, other)
    assert sched.schedule().num_steps == 1


def test_an_adapter_row_and_a_prefill_in_the_step_make_it_plain():
    sched = make_scheduler(steps=4)
    adapted = make_seq(**GREEDY)
    adapted.lora_request = LoRARequest("a", 1, "/nowhere")
    assert not decodes_in_the_loop(adapted)
    plain = make_seq(**GREEDY)
    run_prefill(sched, plain)
    sched.add(make_seq(prompt_len=6, **GREEDY))   # admitted this step: its prompt is in it
    assert sched.schedule().num_steps == 1


def test_a_step_wider_than_the_workers_loop_runs_is_plain():
    """(a tied LM head's kernel takes a few rows: the workers report how many)"""
    sched = make_scheduler(steps=4, max_rows=1)
    a, b = make_seq(**GREEDY), make_seq(**GREEDY)
    run_prefill(sched, a, b)
    out = sched.schedule()
    assert out.num_steps == 1 and len(a.block_table) == 2   # and no lookahead taken
    answer(sched, out, {a.seq_id: [2], b.seq_id: [2]})
    sched.finish(b)
    assert sched.schedule().num_steps == 4


def test_one_step_unless_asked():
    sched = make_scheduler(steps=1)
    seq = make_seq(**GREEDY)
    run_prefill(sched, seq)
    assert sched.schedule().num_steps == 1


def test_no_free_blocks_for_the_lookahead_means_a_plain_step():
    sched = make_scheduler(steps=8, num_blocks=2)   # 8 slots: the prompt (5) and a few tokens
    seq = make_seq(**GREEDY)
    run_prefill(sched, seq)
    out = sched.schedule()
    assert out.num_steps == 1 and len(seq.block_table) == 2
    answer(sched, out, {seq.seq_id: [2]})
    assert sched.last_preempted == []


def test_the_lookahead_is_allocated_for_every_row_or_for_none():
    sched = make_scheduler(steps=4, num_blocks=5)
    a, b = make_seq(prompt_len=7, **GREEDY), make_seq(prompt_len=7, **GREEDY)
    run_prefill(sched, a, b)   # 2 blocks each; 4 steps would need a third each, 1 is free
    assert sched.block_manager.num_free_blocks == 1
    assert sched.schedule().num_steps == 1
    assert len(a.block_table) == len(b.block_table) == 2 and sched.block_manager.num_free_blocks == 1
