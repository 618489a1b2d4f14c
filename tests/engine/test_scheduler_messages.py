"""What the scheduler tells the workers, and how it applies their answer, with no model.

Specified: a sequence is sent in full once (``new_seqs``) and afterwards as deltas (``cached_seqs``: the
tokens the workers have not seen, the changed tail of its block table, its computed count); a preempted,
finished or aborted sequence is named in ``finished_seq_ids`` on the next step that runs and is sent in
full again if it comes back; copy-on-write moves ``block_table_start`` back to the copied block; the
messages survive msgpack unchanged. A step that fails commits nothing: its requests run alone until a
step of their own succeeds, and a request whose solo step fails is failed. Forks of ``n > 1`` samples
are announced in the step that completes the parent's prompt. A pooling sequence travels with its pooling
config, is never answered with a token, adds the share of its vector of each step that commits (not of a
failed one) and finishes with the vector once its prompt is computed.
"""

from __future__ import annotations

import numpy as np

from llmserve.config import PoolerConfig
from llmserve.engine.block_manager import BlockManager
from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput, decode, encode
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.sequence import Sequence, SequenceStatus
from llmserve.sampling_params import SamplingParams

_next_id = iter(range(10**9))


def make_seq(prompt: list[int], max_tokens: int = 8, request_id: str | None = None, index: int = 0,
             params: SamplingParams | None = None) -> Sequence:
    seq_id = next(_next_id)
    return Sequence(seq_id, request_id or f"r{seq_id}", index, prompt, params or SamplingParams(max_tokens=max_tokens),
                    max_tokens, None)


def make_scheduler(num_blocks=32, block_size=4, budget=64, prefix_caching=False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), 8, budget)


def answer(sched: Scheduler, out: SchedulerOutput, token: int = 5, fail: str | None = None):
    """A model's answer: ``token`` for every sequence whose tokens are all computed after the step."""
    if fail is not None:
        return sched.update_from_output(out, ModelRunnerOutput(error=fail))
    sampled = {}
    for seq in list(sched.running.values()):
        n = out.num_scheduled_tokens.get(seq.seq_id)
        if n is not None and seq.num_computed_tokens + n == seq.num_tokens:
            sampled[seq.seq_id] = token
            for fork in out.forks.get(seq.seq_id, ()):
                sampled[fork.seq_id] = token + 1 + fork.sample_index
    return sched.update_from_output(out, ModelRunnerOutput(sampled=sampled))


def test_new_then_cached_deltas_and_msgpack_round_trip():
    sched = make_scheduler()
    seq = make_seq([1, 2, 3, 4, 5, 6])
    sched.add(seq)
    first = sched.schedule()
    assert decode(encode(first), SchedulerOutput) == first
    [new] = first.new_seqs
    assert (new.seq_id, new.prompt_token_ids, new.output_token_ids) == (seq.seq_id, [1, 2, 3, 4, 5, 6], [])
    assert new.block_ids == [seq.block_table] and len(new.block_ids[0]) == 2 and new.num_computed_tokens == 0
    assert first.num_scheduled_tokens == {seq.seq_id: 6} and first.cached_seqs == []
    answer(sched, first)
    second = sched.schedule()
    assert second.new_seqs == []
    [cached] = second.cached_seqs
    # The token sampled last step, no block change (7 tokens fit in 2 blocks), 6 computed.
    assert (cached.new_token_ids, cached.block_table_start, cached.new_block_ids, cached.num_computed_tokens) == (
        [5], 2, [[]], 6)
    answer(sched, second)
    answer(sched, sched.schedule())          # 8 tokens: still 2 blocks
    fourth = sched.schedule()                # the 9th token needs a third block
    [cached] = fourth.cached_seqs
    assert cached.block_table_start == 2 and cached.new_block_ids == [seq.block_table[2:]] and len(seq.block_table) == 3


def test_preempted_sequence_is_forgotten_then_sent_in_full():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq([1] * 7, max_tokens=20), make_seq([2] * 7, max_tokens=20)
    sched.add(a)
    sched.add(b)
    for _ in range(3):                       # 7 -> 8 -> 9 tokens: a needs a third block -> b preempted
        out = sched.schedule()
        answer(sched, out)
    assert sched.num_preemptions == 1 and b.status is SequenceStatus.WAITING
    assert b.seq_id in out.finished_seq_ids          # the step that preempted it tells the workers to drop it
    assert b.seq_id not in out.num_scheduled_tokens
    nxt = sched.schedule()
    sched.finish(a)
    answer(sched, nxt)
    back = sched.schedule()
    [new] = back.new_seqs                            # resumed: everything again, outputs included
    assert new.seq_id == b.seq_id and new.output_token_ids == b.output_token_ids and new.num_computed_tokens == 0
    assert a.seq_id in back.finished_seq_ids


def test_a_failed_step_commits_nothing_and_isolates_its_requests():
    sched = make_scheduler()
    a, b = make_seq([1, 2, 3]), make_seq([4, 5, 6])
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    result = answer(sched, out, fail="RuntimeError: boom")
    assert result.failed == {} and result.sampled == []
    assert a.num_computed_tokens == b.num_computed_tokens == 0 and a.suspect and b.suspect
    # Each suspect runs alone, resent in full (the workers dropped what the failed step built).
    solo = sched.schedule()
    assert list(solo.num_scheduled_tokens) == [a.seq_id]
    assert [n.seq_id for n in solo.new_seqs] == [a.seq_id]
    assert set(solo.finished_seq_ids) == {a.seq_id, b.seq_id}
    answer(sched, solo)
    assert not a.suspect and a.output_token_ids == [5]
    solo = sched.schedule()
    assert list(solo.num_scheduled_tokens) == [b.seq_id]
    result = answer(sched, solo, fail="RuntimeError: bad request")   # b fails alone: b is the culprit
    assert result.failed == {b.request_id: "RuntimeError: bad request"}
    assert b.is_finished and b.finish_reason == "error" and b.block_table == []
    # Nothing is suspect any more: a runs on in ordinary steps.
    assert list(sched.schedule().num_scheduled_tokens) == [a.seq_id]


def test_a_failed_step_of_one_request_fails_it_at_once():
    sched = make_scheduler()
    seq = make_seq([1, 2, 3])
    sched.add(seq)
    result = answer(sched, sched.schedule(), fail="ValueError: x")
    assert result.failed == {seq.request_id: "ValueError: x"}


def test_forks_are_announced_with_the_step_that_completes_the_prompt():
    sched = make_scheduler(budget=4)
    params = SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=1)
    seqs = [make_seq([1, 2, 3, 4, 5, 6], request_id="req", index=i, params=params) for i in range(3)]
    seqs[0].pending_forks = seqs[1:]
    sched.add(seqs[0])
    chunk = sched.schedule()                 # 4 of 6 prompt tokens: no fork yet
    assert chunk.forks == {}
    answer(sched, chunk)
    last = sched.schedule()
    assert [(f.seq_id, f.sample_index) for f in last.forks[seqs[0].seq_id]] == [(s.seq_id, s.index) for s in seqs[1:]]
    result = answer(sched, last)
    assert [(s.index, t) for s, t, _ in result.sampled] == [(0, 5), (1, 7), (2, 8)]
    # The children share the parent's blocks and are held by the workers already (deltas from now on).
    assert all(s.block_table == seqs[0].block_table and s.on_workers for s in seqs[1:])
    nxt = sched.schedule()
    assert nxt.new_seqs == [] and {c.seq_id for c in nxt.cached_seqs} == {s.seq_id for s in seqs}
    # Copy-on-write of the shared partial block: the first two writers copy it and their tables change
    # there; the last one is then its only holder and writes in place.
    assert len(nxt.block_copies) == 2
    starts = {c.seq_id: c.block_table_start for c in nxt.cached_seqs}
    assert (starts[seqs[0].seq_id], starts[seqs[1].seq_id], starts[seqs[2].seq_id]) == (1, 1, 2)


def test_cache_salt_separates_prefix_cache_entries():
    sched = make_scheduler(prefix_caching=True)
    prompt = list(range(1, 10))
    first = make_seq(prompt, max_tokens=1)
    sched.add(first)
    answer(sched, sched.schedule())
    salted = make_seq(prompt, max_tokens=1)
    salted.extra_hash_keys = b"tenant-a"
    plain = make_seq(prompt, max_tokens=1)
    sched.add(salted)
    sched.add(plain)
    sched.schedule()
    assert salted.num_cached_tokens == 0 and plain.num_cached_tokens == 8


def test_a_pooling_sequence_adds_the_shares_of_committed_steps_and_finishes_with_its_vector():
    sched = make_scheduler(budget=6)
    other = make_seq([2, 3], max_tokens=20)
    pool = make_seq([1] * 10, max_tokens=0)
    pool.pooling = PoolerConfig("MEAN", normalize=False)
    sched.add(other)
    sched.add(pool)

    def run(out: SchedulerOutput, error: str | None = None):
        """Each step's share of the vector is [1, 1, 1] per token computed, so the mean of the 10 is [1, 1, 1]."""
        n = out.num_scheduled_tokens.get(pool.seq_id)
        pooled = {} if n is None else {pool.seq_id: np.full(3, float(n), dtype="<f4").tobytes()}
        sampled = {other.seq_id: 5} if other.seq_id in out.num_scheduled_tokens else {}
        return sched.update_from_output(out, ModelRunnerOutput(sampled=sampled, pooled=pooled, error=error))

    first = sched.schedule()                                   # other's prompt, pooling tokens 0-3
    assert decode(encode(first), SchedulerOutput).new_seqs[1].pooling == PoolerConfig("MEAN", normalize=False)
    step = run(first)
    assert step.pooled == [] and [seq for seq, _, _ in step.sampled] == [other]
    run(sched.schedule(), error="boom")                        # a decode and tokens 4-8: nothing of it commits
    assert pool.num_computed_tokens == 4 and pool.suspect and pool.pooled_sum.tolist() == [4.0] * 3
    while not pool.is_finished:                                # each request alone, then both again
        step = run(sched.schedule())
    assert [seq for seq, _ in step.pooled] == [pool] and pool.finish_reason == "stop"
    assert np.frombuffer(step.pooled[0][1], dtype="<f4").tolist() == [1.0] * 3
    assert other.output_token_ids and not other.is_finished
