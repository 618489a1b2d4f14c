"""The scheduler with ``max_loras`` (no model): the running sequences never use more distinct adapters than
that; a waiting request whose adapter would be one too many is passed over, keeps its place at the head of
the queue, and is admitted as soon as an adapter frees up; base-model requests behind it are admitted
meanwhile, requests with an adapter are not (not even a running adapter's: that is what lets the running
adapters drain, so a steady stream of requests for them cannot starve it)."""

from __future__ import annotations

import random

from llmserve.engine.block_manager import BlockManager
from llmserve.engine.scheduler import Scheduler
from llmserve.lora.request import LoRARequest
from tests.engine.test_scheduler import complete_step, make_seq, schedule

ADAPTERS = [LoRARequest(f"a{i}", i, f"/adapters/a{i}") for i in range(1, 5)]


def with_adapter(prompt_len: int, lora: LoRARequest | None, max_tokens: int = 4):
    seq = make_seq(prompt_len, max_tokens)
    seq.lora_request = lora
    return seq


def lora_scheduler(max_loras: int, num_blocks: int = 64, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 32) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4, False), max_num_seqs, max_num_batched_tokens, True,
                     max_loras=max_loras)


def running_adapters(sched) -> set[int]:
    return {s.lora_request.lora_int_id for s in sched.running.values() if s.lora_request is not None}


def test_an_adapter_over_the_limit_waits_in_its_place():
    sched = lora_scheduler(2)
    a1, a2, a3, base, a1_again = (with_adapter(4, ADAPTERS[0]), with_adapter(4, ADAPTERS[1], max_tokens=8),
                                  with_adapter(4, ADAPTERS[2]), with_adapter(4, None), with_adapter(4, ADAPTERS[0]))
    for seq in (a1, a2, a3, base, a1_again):
        sched.add(seq)
    step = schedule(sched)
    assert [s for s, _ in step.scheduled] == [a1, a2, base]   # a3 passed over; a1_again does not overtake it
    assert list(sched.waiting) == [a3, a1_again]
    while a3.seq_id not in sched.running:
        complete_step(sched, step)
        step = schedule(sched)
        assert len(running_adapters(sched)) <= 2
    assert a1.is_finished and not a2.is_finished and not a1_again.is_finished   # a1's slot went to a3


def test_a_stream_of_requests_for_running_adapters_cannot_starve_another():
    """max_loras 1, adapter 1 running with a new request for it every step: adapter 2's request still runs,
    as soon as adapter 1's requests admitted before it finish."""
    sched = lora_scheduler(1, max_num_seqs=4)
    first = with_adapter(4, ADAPTERS[0], max_tokens=3)
    sched.add(first)
    step = schedule(sched)
    other = with_adapter(4, ADAPTERS[1], max_tokens=2)
    sched.add(other)
    for _ in range(10):
        if other.is_finished:
            break
        sched.add(with_adapter(4, ADAPTERS[0], max_tokens=3))
        complete_step(sched, step)
        step = schedule(sched)
        assert len(running_adapters(sched)) <= 1
    assert first.is_finished and other.is_finished


def test_random_workloads_never_exceed_max_loras():
    rng = random.Random(0)
    sched = lora_scheduler(2, num_blocks=48, max_num_seqs=6, max_num_batched_tokens=16)
    pending = [with_adapter(rng.randint(1, 12), rng.choice([None, *ADAPTERS]), rng.randint(1, 6))
               for _ in range(40)]
    finished = 0
    for _ in range(2000):
        while pending and rng.random() < 0.3:
            sched.add(pending.pop())
        step = schedule(sched)
        assert len(running_adapters(sched)) <= 2
        assert len({s.lora_request.lora_int_id for s, _ in step.scheduled if s.lora_request}) <= 2
        finished += len(complete_step(sched, step))
        if not pending and not sched.num_unfinished:
            break
    assert finished == 40


def test_adapter_counts_follow_admission_preemption_and_finish():
    """The per-adapter running counts equal a recount of the running set after every step, preemptions
    included (a pool too small for every sequence at once)."""
    rng = random.Random(1)
    sched = lora_scheduler(3, num_blocks=10, max_num_seqs=6, max_num_batched_tokens=16)
    for _ in range(30):
        sched.add(with_adapter(rng.randint(1, 12), rng.choice([None, *ADAPTERS]), rng.randint(1, 8)))
    for _ in range(2000):
        step = schedule(sched)
        complete_step(sched, step)
        recount: dict[int, int] = {}
        for seq in sched.running.values():
            if seq.lora_request is not None:
                recount[seq.lora_request.lora_int_id] = recount.get(seq.lora_request.lora_int_id, 0) + 1
        assert sched.adapters.counts == recount
        if not sched.num_unfinished:
            break
    assert not sched.num_unfinished and sched.num_preemptions > 0
