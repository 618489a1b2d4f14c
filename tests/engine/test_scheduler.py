"""The continuous-batching scheduler, without a model.

Specified, each step: the scheduled tokens fit ``max_num_batched_tokens`` and the running set fits
``max_num_seqs``; running sequences are scheduled before waiting ones, in admission order, and waiting
ones are admitted first come first served; a prompt longer than the remaining budget is split into
contiguous chunks over several steps (chunked prefill), or, with chunked prefill disabled, only ever
scheduled whole; every scheduled sequence has blocks for all the tokens it will hold after the step.
When a running sequence cannot get a block, the most recently admitted running sequence is preempted:
its blocks are freed, its progress reset, and it goes to the front of the queue; nothing is admitted in
a step that preempted. ``finish`` removes a waiting or running sequence and frees its blocks.

The scheduler is driven as the engine core drives it, with no model: ``schedule()`` gives the step's
:class:`SchedulerOutput` and :func:`complete_step` answers it with a ``ModelRunnerOutput`` that samples
token 1 for every sequence whose tokens are all computed; ``update_from_output`` does the rest (advance
``num_computed_tokens``, append the token, finish at max_tokens and free the blocks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from llmserve.engine.block_manager import BlockManager
from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.sequence import Sequence, SequenceStatus
from llmserve.sampling_params import SamplingParams

_ids = iter(range(10**9))
_seqs: dict[int, Sequence] = {}


def make_seq(prompt_len: int, max_tokens: int = 4) -> Sequence:
    seq_id = next(_ids)
    seq = Sequence(seq_id, f"r{seq_id}", 0, [7] * prompt_len, SamplingParams(max_tokens=max_tokens),
                   max_tokens, None)
    _seqs[seq_id] = seq
    return seq


@dataclass
class Step:
    """One ``schedule()`` as a test reads it: the message, and the sequences it names."""

    message: SchedulerOutput
    scheduled: list[tuple[Sequence, int]]
    preempted: list[Sequence]

    @property
    def num_batched_tokens(self) -> int:
        return self.message.total_num_scheduled_tokens


def schedule(sched: Scheduler) -> Step:
    message = sched.schedule()
    return Step(message, [(_seqs[i], n) for i, n in message.num_scheduled_tokens.items()],
                list(sched.last_preempted))


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                   chunked=True, prefix_caching=False) -> Scheduler:
    """Prefix caching is off unless a test is about it: the prompts here are all the same token."""
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_num_seqs, max_num_batched_tokens,
                     chunked)


def complete_step(sched: Scheduler, out: Step) -> list[Sequence]:
    """Answer a step as a model would (token 1 for every sequence that reaches its end); returns the
    sequences that finished."""
    sampled = {seq.seq_id: 1 for seq, n in out.scheduled if seq.num_computed_tokens + n == seq.num_tokens}
    result = sched.update_from_output(out.message, ModelRunnerOutput(sampled=sampled))
    for seq, _ in out.scheduled:
        assert seq.num_computed_tokens <= seq.num_tokens
    return [seq for seq, _, _ in result.sampled if seq.is_finished]


def check_step(sched: Scheduler, out: Step, computed_before: dict[int, int]) -> None:
    """The per-step invariants every schedule must satisfy."""
    seqs = [s for s, _ in out.scheduled]
    assert len({s.seq_id for s in seqs}) == len(seqs), "a sequence scheduled twice in one step"
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    bs = sched.block_manager.block_size
    for seq, n in out.scheduled:
        assert n >= 1
        assert seq.status is SequenceStatus.RUNNING and seq.seq_id in sched.running
        # Contiguous: the step starts where the cache ends (0 after a preemption).
        assert seq.num_computed_tokens == computed_before.get(seq.seq_id, 0)
        assert seq.num_computed_tokens + n <= seq.num_tokens
        assert len(seq.block_table) >= -(-(seq.num_computed_tokens + n) // bs)
        if not sched.enable_chunked_prefill and seq.num_computed_tokens == 0:
            assert n == seq.num_tokens, "a prompt was split with chunked prefill disabled"
    for seq in out.preempted:
        assert seq not in seqs and seq.block_table == [] and seq.num_computed_tokens == 0
        assert seq.status is SequenceStatus.WAITING and seq in sched.waiting
    tables = [b for s in sched.running.values() for b in s.block_table]
    assert len(tables) == len(set(tables))
    assert sched.block_manager.num_free_blocks + len(tables) == sched.block_manager.num_blocks
    assert all(s.block_table == [] for s in sched.waiting)


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> list[Step]:
    outs = []
    for _ in range(max_steps):
        if not sched.num_unfinished:
            return outs
        before = {s.seq_id: s.num_computed_tokens for s in sched.running.values()}
        out = schedule(sched)
        check_step(sched, out, before)
        outs.append(out)
        complete_step(sched, out)
    raise AssertionError("the scheduler made no progress")


# ------------------------------------------------------------------ budgets


def test_token_budget_and_seq_cap_respected():
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=10)
    seqs = [make_seq(n, max_tokens=3) for n in (7, 12, 3, 25, 1, 9)]
    for seq in seqs:
        sched.add(seq)
    outs = run_to_completion(sched)
    assert max(o.num_batched_tokens for o in outs) == 10          # the budget is actually used
    assert max(len(o.scheduled) for o in outs) == 3
    assert all(len(s.output_token_ids) == 3 for s in seqs)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(2) for _ in range(5)]
    for seq in seqs:
        sched.add(seq)
    out = schedule(sched)
    assert [s for s, _ in out.scheduled] == seqs[:2]
    assert list(sched.waiting) == seqs[2:]


def test_empty_queue_schedules_nothing():
    assert schedule(make_scheduler()).scheduled == []


# ------------------------------------------------------------------ order


def test_running_before_waiting_in_admission_order():
    sched = make_scheduler(max_num_batched_tokens=100)
    first = [make_seq(5, max_tokens=10) for _ in range(3)]
    for seq in first:
        sched.add(seq)
    complete_step(sched, schedule(sched))
    late = [make_seq(4) for _ in range(2)]
    for seq in late:
        sched.add(seq)
    out = schedule(sched)
    assert [s for s, _ in out.scheduled] == first + late
    assert [n for _, n in out.scheduled] == [1, 1, 1, 4, 4]


def test_fcfs_admission_even_when_a_later_request_would_fit():
    """The head of the queue blocks later ones: no overtaking (with chunking off, a big head waits)."""
    sched = make_scheduler(max_num_batched_tokens=10, chunked=False)
    runner = make_seq(2, max_tokens=50)
    sched.add(runner)
    complete_step(sched, schedule(sched))
    big, small = make_seq(10), make_seq(1)
    sched.add(big)
    sched.add(small)
    out = schedule(sched)      # the runner's decode leaves 9 < 10 tokens of budget
    assert [s for s, _ in out.scheduled] == [runner]
    assert list(sched.waiting) == [big, small]


def test_admission_order_is_arrival_order():
    sched = make_scheduler(max_num_seqs=1, max_num_batched_tokens=100)
    seqs = [make_seq(3, max_tokens=2) for _ in range(4)]
    for seq in seqs:
        sched.add(seq)
    admitted = []
    for out in run_to_completion(sched):
        for seq, _ in out.scheduled:
            if seq not in admitted:
                admitted.append(seq)
    assert admitted == seqs


# ------------------------------------------------------------------ chunked prefill


def test_chunked_prefill_splits_a_long_prompt_into_contiguous_chunks():
    sched = make_scheduler(max_num_batched_tokens=4)
    seq = make_seq(10, max_tokens=2)
    sched.add(seq)
    chunks = []
    while sched.num_unfinished:
        out = schedule(sched)
        chunks += [(s.num_computed_tokens, n) for s, n in out.scheduled]
        complete_step(sched, out)
    # (start, length) of each step: prompt in 4 + 4 + 2, then one decode of the first sampled token
    assert chunks == [(0, 4), (4, 4), (8, 2), (10, 1)]
    assert len(seq.output_token_ids) == 2


def test_max_tokens_zero_finishes_when_the_prompt_is_computed_with_no_token():
    """The step that completes the prompt finishes it with "length", reported with no token: the one
    sampled there is dropped, never appended, and there is no first-token time."""
    sched = make_scheduler(max_num_batched_tokens=4)
    seq = make_seq(6, max_tokens=0)
    sched.add(seq)
    assert complete_step(sched, schedule(sched)) == []   # 4 of 6 prompt tokens
    out = schedule(sched)
    assert out.scheduled == [(seq, 2)]
    result = sched.update_from_output(out.message, ModelRunnerOutput(sampled={seq.seq_id: 9}))
    assert [(s, token) for s, token, _ in result.sampled] == [(seq, None)]
    assert seq.is_finished and seq.finish_reason == "length"
    assert seq.output_token_ids == [] and seq.num_tokens == 6 and seq.first_token_time is None
    assert sched.num_unfinished == 0
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_chunk_shares_the_budget_with_decodes():
    sched = make_scheduler(max_num_batched_tokens=6)
    a = make_seq(2, max_tokens=20)
    sched.add(a)
    complete_step(sched, schedule(sched))
    b = make_seq(20)
    sched.add(b)
    out = schedule(sched)
    assert out.scheduled == [(a, 1), (b, 5)]
    complete_step(sched, out)
    out = schedule(sched)
    assert out.scheduled == [(a, 1), (b, 5)]
    assert b.num_computed_tokens == 5


def test_without_chunked_prefill_a_prompt_is_only_scheduled_whole():
    sched = make_scheduler(max_num_batched_tokens=8, chunked=False)
    a = make_seq(3, max_tokens=3)
    b = make_seq(8, max_tokens=2)
    sched.add(a)
    sched.add(b)
    out = schedule(sched)
    assert out.scheduled == [(a, 3)]          # b (8 tokens) does not fit the 5 left: not split
    complete_step(sched, out)
    out = schedule(sched)
    assert out.scheduled == [(a, 1)]          # 7 left, still not enough for b
    complete_step(sched, out)
    run_to_completion(sched)                  # b runs whole once a is done
    assert len(b.output_token_ids) == 2


@pytest.mark.parametrize("chunked", [True, False])
def test_random_workloads_keep_every_invariant(chunked):
    rng = random.Random(1234)
    for _ in range(30):
        budget = rng.randint(16, 24)
        sched = make_scheduler(num_blocks=rng.randint(6, 20), block_size=rng.choice([1, 2, 4]),
                               max_num_seqs=rng.randint(1, 5), max_num_batched_tokens=budget, chunked=chunked)
        bm = sched.block_manager
        seqs = []
        for _ in range(rng.randint(1, 8)):
            # Every request fits the cache alone (the engine refuses the others at admission).
            total = min(bm.num_blocks * bm.block_size, budget)
            prompt = rng.randint(1, total - 1)
            seqs.append(make_seq(prompt, max_tokens=rng.randint(1, total - prompt)))
        for seq in seqs:
            sched.add(seq)
        run_to_completion(sched)
        assert all(len(s.output_token_ids) == s.max_tokens for s in seqs)
        assert bm.num_free_blocks == bm.num_blocks


# ------------------------------------------------------------------ preemption


def fill_cache():
    """Three running sequences that exactly fill a 6-block cache (block_size 2), plus one waiting."""
    sched = make_scheduler(num_blocks=6, block_size=2, max_num_batched_tokens=100)
    a, b, c = (make_seq(4, max_tokens=10) for _ in range(3))
    for seq in (a, b, c):
        sched.add(seq)
    out = schedule(sched)
    assert [s for s, _ in out.scheduled] == [a, b, c]
    complete_step(sched, out)      # each now has 5 tokens, 4 computed, 2 full blocks
    assert sched.block_manager.num_free_blocks == 0
    d = make_seq(1)
    sched.add(d)
    return sched, a, b, c, d


def test_preemption_takes_the_most_recently_admitted():
    sched, a, b, c, d = fill_cache()
    c_blocks = list(c.block_table)
    out = schedule(sched)         # a needs a third block: c goes; b then needs one too: ... see below
    assert out.preempted[0] is c
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.status is SequenceStatus.WAITING and c.num_preemptions >= 1
    assert sched.num_preemptions == len(out.preempted)
    # c's blocks went to a and b, which both run
    assert [s for s, _ in out.scheduled] == [a, b]
    assert set(c_blocks) == {a.block_table[2], b.block_table[2]}
    assert out.preempted == [c]


def test_preempted_goes_to_the_front_of_the_queue_and_nothing_is_admitted():
    sched, a, b, c, d = fill_cache()
    out = schedule(sched)
    assert list(sched.waiting) == [c, d]
    assert d not in [s for s, _ in out.scheduled], "admitted in a step that preempted"
    assert d.status is SequenceStatus.WAITING


def test_no_admission_in_a_step_that_preempted_even_with_room():
    """After c's preemption a block and a token of budget are left: c could restart with a 1-token
    chunk, but a step that preempted admits nothing (that would thrash)."""
    sched = make_scheduler(num_blocks=5, block_size=2, max_num_batched_tokens=100)
    a, b, c = make_seq(4, max_tokens=10), make_seq(1, max_tokens=10), make_seq(4, max_tokens=10)
    for seq in (a, b, c):
        sched.add(seq)
    complete_step(sched, schedule(sched))    # a: 2 blocks, b: 1, c: 2; none free
    sched.max_num_batched_tokens = 3
    out = schedule(sched)
    assert out.preempted == [c]
    assert out.scheduled == [(a, 1), (b, 1)]
    assert sched.block_manager.num_free_blocks == 1
    assert list(sched.waiting) == [c]
    assert schedule(sched).scheduled == [(a, 1), (b, 1), (c, 1)]   # the next step takes it back


def test_preempted_sequence_recomputes_from_scratch():
    sched, a, b, c, d = fill_cache()
    complete_step(sched, schedule(sched))
    sched.finish(a)
    sched.finish(b)
    out = schedule(sched)
    # c is first in line and recomputes prompt + generated token (5) in one go; then d
    assert out.scheduled == [(c, 5), (d, 1)]


def test_a_sequence_that_cannot_grow_preempts_itself_last():
    """With several preemptions in one step, victims leave in reverse admission order and keep it in the queue."""
    sched = make_scheduler(num_blocks=3, block_size=2, max_num_batched_tokens=100)
    a, b, c = (make_seq(2, max_tokens=10) for _ in range(3))
    for seq in (a, b, c):
        sched.add(seq)
    complete_step(sched, schedule(sched))    # each has 3 tokens, 2 computed, 1 block; no block free
    out = schedule(sched)                    # a needs a block: c goes; b needs one: b itself goes
    assert out.preempted == [c, b]
    assert out.scheduled == [(a, 1)]
    assert list(sched.waiting) == [b, c]
    assert list(sched.running.values()) == [a]


def test_preemption_under_random_load_finishes_everything():
    rng = random.Random(7)
    sched = make_scheduler(num_blocks=10, block_size=2, max_num_seqs=6, max_num_batched_tokens=12)
    seqs = [make_seq(rng.randint(1, 6), max_tokens=rng.randint(4, 12)) for _ in range(12)]
    for seq in seqs:
        sched.add(seq)
    run_to_completion(sched)
    assert sched.num_preemptions > 0
    assert all(len(s.output_token_ids) == s.max_tokens for s in seqs)
    assert sched.block_manager.num_free_blocks == 10


# ------------------------------------------------------------------ finish


def test_finish_running_frees_its_blocks():
    sched = make_scheduler()
    a, b = make_seq(9), make_seq(3)
    sched.add(a)
    sched.add(b)
    complete_step(sched, schedule(sched))
    free = sched.block_manager.num_free_blocks
    sched.finish(a)
    assert a.block_table == [] and a.is_finished
    assert sched.block_manager.num_free_blocks == free + 3
    assert a.seq_id not in sched.running
    assert [s for s, _ in schedule(sched).scheduled] == [b]


def test_finish_waiting_removes_it_from_the_queue():
    sched = make_scheduler(max_num_seqs=1)
    a, b, c = make_seq(3), make_seq(3), make_seq(3)
    for seq in (a, b, c):
        sched.add(seq)
    schedule(sched)
    sched.finish(b)
    assert list(sched.waiting) == [c] and b.is_finished
    sched.finish(a)
    out = schedule(sched)
    assert [s for s, _ in out.scheduled] == [c]
    assert sched.num_unfinished == 1


def test_finish_of_a_preempted_sequence_frees_everything():
    sched, a, b, c, d = fill_cache()
    schedule(sched)                          # c preempted, waiting at the front
    for seq in (c, d, a, b):
        sched.finish(seq)
    assert sched.num_unfinished == 0
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_cached_tokens_count_prompt_tokens_only_after_a_preemption():
    """A preempted sequence is recomputed from the prefix cache, which also holds the blocks of its own output:
    ``num_cached_tokens`` (the usage's cached prompt tokens) never counts those."""
    sched = make_scheduler(num_blocks=5, block_size=2, max_num_batched_tokens=100, prefix_caching=True)
    seqs = [make_seq(2, max_tokens=8) for _ in range(2)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(100):
        if not sched.num_unfinished:
            break
        complete_step(sched, schedule(sched))
        assert all(s.num_cached_tokens <= s.num_prompt_tokens for s in seqs)
    assert not sched.num_unfinished and sched.num_preemptions > 0
