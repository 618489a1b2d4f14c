"""Continuous batching: decides, every step, which sequences run and how many tokens each computes, and
owns every counter that moves when a step's result comes back.

``schedule`` takes running sequences first, in admission order, then waiting ones (FCFS) while the token
budget (``max_num_batched_tokens``), the sequence cap (``max_num_seqs``) and free blocks allow. A long
prompt takes what is left of the budget and continues next step (chunked prefill). When a running
sequence cannot get a block, the most recently admitted running sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later. A waiting sequence first takes
the blocks of its longest cached prefix (prefix caching), so only the rest of its prompt is computed.
With ``max_loras`` set (LoRA on), the running sequences never use more than that many distinct adapters: a
waiting sequence whose adapter would exceed it is passed over (it keeps its place) until one frees up, and
no request with an adapter behind it is admitted meanwhile (requests of a running adapter that kept
arriving would otherwise keep its slot forever); base-model requests are.
The step is described to the workers as a :class:`~llmserve.engine.messages.SchedulerOutput`.

With speculative decoding, a decoding sequence may be scheduled for 1 + k tokens, its k drafts through the same
rule and allocation (:mod:`llmserve.spec_decode.scheduling` decides which and how many, and keeps what the
accepted ones move). With ``--num-scheduler-steps`` above 1, a step of decodes only (greedy or unseeded) may run
several decode steps at once (:mod:`llmserve.engine.multi_step` decides how many and allocates their slots).

``update_from_output`` applies the workers' :class:`~llmserve.engine.messages.ModelRunnerOutput`: it
advances ``num_computed_tokens``, publishes newly full blocks to the prefix cache, forks parallel
samples, appends sampled tokens and finishes sequences on EOS, stop token ids and length (a sequence with
``max_tokens`` 0 finishes once its prompt is computed, with no token appended). When a step brings several
tokens (accepted drafts, a multi-step step's tokens), they are appended in order and the sequence stops at the
first stop. Stop strings
need text, so the engine's output processing applies them through :meth:`finish`. A pooling sequence
samples nothing: it adds each committed step's share of its pooled vector and finishes with the vector
once its prompt is computed (:mod:`llmserve.layers.pooler`); preemption starts its sum again from zero.

A step that fails as a whole commits nothing. Its sequences become suspects: while there are any, each
step runs the sequences of one suspect request alone, through the normal path (so every rank of a
parallel job runs the same steps). A request whose solo step fails is failed; the others are cleared and
continue with exactly the output they would have had.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from llmserve.engine.block_manager import BlockManager
from llmserve.engine.messages import (CachedSequenceData, ForkData, ModelRunnerOutput, NewSequenceData,
                                      SchedulerOutput, TokenLogprobs)
from llmserve.engine.multi_step import multi_step_count
from llmserve.engine.running_adapters import RunningAdapters, adapter_id
from llmserve.engine.sequence import Sequence, SequenceStatus
from llmserve.engine.stop_conditions import check_token_stop
from llmserve.layers import pooler
from llmserve.spec_decode.adaptive import AdaptiveSpeculation
from llmserve.spec_decode.metrics import SpecDecodingStats
from llmserve.spec_decode.proposer import Proposer
from llmserve.spec_decode.scheduling import DraftScheduling


@dataclass
class StepResult:
    """What a step did to the sequences, for the engine's output processing."""

    # (sequence, token appended this step, its logprobs if asked); finish_reason set if it finished. A
    # max_tokens=0 sequence is here with no token (None) once its prompt is computed.
    sampled: list[tuple[Sequence, int | None, TokenLogprobs | None]] = field(default_factory=list)
    # (sequence, first position p, logprobs of prompt tokens p+1, ...)
    prompt_logprobs: list[tuple[Sequence, int, list[TokenLogprobs]]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # request id -> why its solo step failed
    # (pooling sequence, its finished vector as float32 little-endian bytes); the sequence is finished
    pooled: list[tuple[Sequence, bytes]] = field(default_factory=list)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, max_model_len: int | None = None,
                 proposer: Proposer | None = None, max_loras: int | None = None,
                 adaptive: AdaptiveSpeculation | None = None, num_scheduler_steps: int = 1,
                 multi_step_max_rows: int | None = None) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_model_len = max_model_len
        self.adapters = RunningAdapters(max_loras)   # adapter id -> running sequences using it
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}   # insertion order = admission order; O(1) removal
        self.num_preemptions = 0
        self.last_preempted: list[Sequence] = []
        self._scheduled: list[tuple[Sequence, int]] = []      # the step awaiting its result
        self._forks: dict[int, list[Sequence]] = {}
        self._forget: list[int] = []                          # seq ids the workers must drop
        self.speculation = DraftScheduling(proposer, adaptive, max_model_len)
        self.num_scheduler_steps = num_scheduler_steps
        self.multi_step_max_rows = multi_step_max_rows   # (the workers' loop runs at most this many rows)

    @property
    def spec_stats(self) -> SpecDecodingStats:
        return self.speculation.stats

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; its ``pending_forks`` join the running set when its prompt is computed."""
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence (and samples still waiting to fork from it); free its blocks."""
        if self.running.pop(seq.seq_id, None) is not None:
            self.adapters.remove(seq)
        else:
            try:
                self.waiting.remove(seq)   # aborts of queued requests only; rare
            except ValueError:
                pass
        self.block_manager.free(seq)
        self._release_from_workers(seq)
        self.speculation.finished(seq)
        seq.status = SequenceStatus.FINISHED
        for child in seq.pending_forks:
            child.status = SequenceStatus.FINISHED
            child.finish_reason = child.finish_reason or seq.finish_reason
        seq.pending_forks = []

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        self.last_preempted = []
        suspects = self._next_suspects()
        speculation = self.speculation
        speculation.begin_step(self.running.values())
        for seq in list(self.running.values()):
            if budget == 0:
                break
            if seq.seq_id not in self.running or (suspects and seq.seq_id not in suspects):
                continue   # preempted earlier in this loop, or not this step's suspect
            gap = seq.num_tokens - seq.num_computed_tokens
            num_new = min(gap, budget)
            drafts = speculation.drafts_for(seq, budget)
            lookahead = speculation.num_lookahead_slots if num_new == gap else 0
            if self._allocate_or_preempt(seq, num_new + len(drafts), lookahead):
                scheduled.append((seq, num_new + len(drafts)))
                budget -= num_new + len(drafts)
                speculation.scheduled(seq, drafts)
        if not self.last_preempted and not suspects:
            self._admit_waiting(scheduled, budget)
        now = time.monotonic()
        for seq, _ in scheduled:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        self._scheduled = scheduled
        speculation.end_schedule(scheduled)
        num_steps = multi_step_count(scheduled, self.num_scheduler_steps, self.max_model_len, self.block_manager,
                                     self.multi_step_max_rows)
        out = self._make_output(scheduled)
        out.num_steps = num_steps
        return out

    def _next_suspects(self) -> set[int]:
        """The running sequences of the first suspect request (empty when there is none)."""
        for seq in self.running.values():
            if seq.suspect:
                return {s.seq_id for s in self.running.values() if s.request_id == seq.request_id}
        return set()

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, lookahead: int = 0) -> bool:
        """Find blocks for ``seq`` (its ``num_new`` tokens and ``lookahead`` slots after them) by preempting from
        the tail of the running set; False if ``seq`` itself went."""
        while not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new + lookahead):
            victim = self.running[next(reversed(self.running))]
            self._preempt(victim)
            self.last_preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, scheduled: list[tuple[Sequence, int]], budget: int) -> None:
        passed_over: list[Sequence] = []
        try:
            self._admit_in_order(scheduled, budget, passed_over)
        finally:
            self.waiting.extendleft(reversed(passed_over))

    def _admit_in_order(self, scheduled: list[tuple[Sequence, int]], budget: int,
                        passed_over: list[Sequence]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.adapters.admits(seq) or (passed_over and adapter_id(seq) is not None):
                # its adapter would be one too many this step; and no adapter request overtakes one passed
                # over, so that the running adapters drain and it gets a slot (base-model requests still go)
                passed_over.append(self.waiting.popleft())
                continue
            num_hit = self.block_manager.match_prefix(seq)   # cached prefix blocks count as computed
            num_new = seq.num_tokens - seq.num_computed_tokens
            # its step samples: room to draft
            lookahead = self.speculation.num_lookahead_slots if num_new <= budget else 0
            if (num_new > budget and not self.enable_chunked_prefill) or not self.block_manager.allocate(
                    seq, seq.num_computed_tokens + min(num_new, budget) + lookahead):
                self.block_manager.free(seq)   # give the prefix hits back; they stay cached
                seq.num_computed_tokens = 0
                break
            num_new = min(num_new, budget)
            self.block_manager.record_prefix_query(seq.num_tokens, num_hit)
            # (a recomputed, preempted sequence also hits its own output's blocks: those are no prompt tokens)
            seq.num_cached_tokens = max(seq.num_cached_tokens, min(num_hit, seq.num_prompt_tokens))
            self.waiting.popleft()
            self.running[seq.seq_id] = seq
            self.adapters.add(seq)
            seq.status = SequenceStatus.RUNNING
            scheduled.append((seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.seq_id]
        self.adapters.remove(seq)
        self.block_manager.free(seq)
        self._release_from_workers(seq)
        self.speculation.preempted(seq)
        seq.num_computed_tokens = 0
        seq.pooled_sum = None
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release_from_workers(self, seq: Sequence) -> None:
        if seq.on_workers:
            self._forget.append(seq.seq_id)
            seq.on_workers = False
        seq.num_sent_tokens = seq.num_sent_blocks = 0

    def _make_output(self, scheduled: list[tuple[Sequence, int]]) -> SchedulerOutput:
        if not scheduled:
            return SchedulerOutput()   # copies and sequences to forget wait for a step that runs
        out = SchedulerOutput(block_copies=self.block_manager.take_pending_copies(),
                              finished_seq_ids=self._forget)
        self._forget = []
        self._forks = {}
        out.scheduled_spec_decode_tokens = self.speculation.step_drafts()
        out.num_drafts_after_step = self.speculation.drafts_after_step(scheduled)
        for seq, n in scheduled:
            out.num_scheduled_tokens[seq.seq_id] = n
            if not seq.on_workers:
                out.new_seqs.append(NewSequenceData(
                    seq.seq_id, seq.index, seq.prompt_token_ids, list(seq.output_token_ids), seq.params,
                    seq.eos_token_id, [list(t) for t in seq.block_tables], seq.num_computed_tokens, seq.pooling,
                    seq.lora_request))
                seq.on_workers = True
            else:
                out.cached_seqs.append(CachedSequenceData(
                    seq.seq_id, seq.all_token_ids[seq.num_sent_tokens:], seq.num_sent_blocks,
                    [t[seq.num_sent_blocks:] for t in seq.block_tables], seq.num_computed_tokens))
            seq.num_sent_tokens = seq.num_tokens
            seq.num_sent_blocks = len(seq.block_table)
            if seq.pending_forks and seq.num_computed_tokens + n == seq.num_tokens and not seq.output_token_ids:
                self._forks[seq.seq_id] = seq.pending_forks
                out.forks[seq.seq_id] = [ForkData(c.seq_id, c.index) for c in seq.pending_forks]
        return out

    # ------------------------------------------------------------------ results
    def update_from_output(self, sched_out: SchedulerOutput, result: ModelRunnerOutput) -> StepResult:
        """Apply a step's result; every counter the step moved is moved here."""
        scheduled, self._scheduled = self._scheduled, []
        forks, self._forks = self._forks, {}
        drafts = self.speculation.take_drafts()
        step = StepResult()
        if result.error is not None:
            self._fail_step(scheduled, forks, sched_out, result.error, step)
            return step
        now = time.monotonic()
        for seq, num_new in scheduled:
            if seq.status is not SequenceStatus.RUNNING:
                continue   # finished by an abort between schedule and update
            seq_drafts = drafts.get(seq.seq_id, ())
            seq.num_computed_tokens += num_new - len(seq_drafts)   # drafts count once accepted
            seq.suspect = False
            self.block_manager.cache_full_blocks(seq)
            if seq.seq_id in result.prompt_logprobs:
                start, entries = result.prompt_logprobs[seq.seq_id]
                step.prompt_logprobs.append((seq, start, entries))
            if seq.pooling is not None:
                self._pool(seq, result, step)
                continue
            if seq.seq_id not in result.sampled:
                continue   # a prefill chunk that did not reach the end of the prompt
            children = forks.get(seq.seq_id, [])
            for child in children:   # share the prompt's blocks before the parent may finish and free them
                self.block_manager.fork(seq, child)
                child.first_scheduled_time = seq.first_scheduled_time
                child.status = SequenceStatus.RUNNING
                child.on_workers = True
                child.num_sent_tokens = seq.num_sent_tokens
                child.num_sent_blocks = len(child.block_table)
                self.running[child.seq_id] = child
                self.adapters.add(child)
            if children:
                seq.pending_forks = []
            if seq_drafts:
                self._append_drafts(seq, seq_drafts, result, now, step)
            elif seq.seq_id in result.multi_step_tokens:
                self._append_computed(seq, result.multi_step_tokens[seq.seq_id], None, now, step)
            if seq.status is not SequenceStatus.RUNNING:
                continue   # stopped on an accepted draft or an earlier token of a multi-step step
            for sampled_seq in (seq, *children):
                self._append_token(sampled_seq, result, now, step)
        if result.draft_token_ids:
            self.speculation.keep_drafts(result.draft_token_ids, self.running)
        return step

    def _append_drafts(self, seq: Sequence, seq_drafts: list[int], result: ModelRunnerOutput, now: float,
                       step: StepResult) -> None:
        """Append the drafts the target accepted (their K/V is computed), stopping at the first stop."""
        accepted = result.num_accepted_drafts[seq.seq_id]
        self.speculation.observe_accepted(seq.seq_id, len(seq_drafts), accepted)
        self._append_computed(seq, seq_drafts[:accepted], result.draft_logprobs.get(seq.seq_id), now, step)

    def _append_computed(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs] | None, now: float,
                         step: StepResult) -> None:
        """Append tokens whose K/V the step computed (accepted drafts, a multi-step step's tokens before its last),
        stopping at the first stop."""
        block_size = self.block_manager.block_size
        for i, token in enumerate(tokens):
            self._emit(seq, token, logprobs[i] if logprobs is not None else None, now, step)
            if seq.is_finished:
                return
            seq.num_computed_tokens += 1
            if seq.num_computed_tokens % block_size == 0:   # published as it fills, before a later stop frees it
                self.block_manager.cache_full_blocks(seq)

    def _pool(self, seq: Sequence, result: ModelRunnerOutput, step: StepResult) -> None:
        """Add the step's share of ``seq``'s pooled vector; finish it with the vector once its prompt is computed."""
        share = result.pooled.get(seq.seq_id)
        if share is not None:
            seq.pooled_sum = pooler.add_share(seq.pooled_sum, share)
        if seq.num_computed_tokens < seq.num_tokens:
            return
        assert seq.pooling is not None and seq.pooled_sum is not None, "a finished prompt with nothing pooled"
        step.pooled.append((seq, pooler.finish(seq.pooled_sum, seq.pooling, seq.num_prompt_tokens)))
        seq.finish_reason = "stop"
        self.finish(seq)

    def _append_token(self, seq: Sequence, result: ModelRunnerOutput, now: float, step: StepResult) -> None:
        if seq.max_tokens == 0:
            # Only the prompt was asked for (scoring it): the token its last step sampled is dropped.
            seq.finish_reason = "length"
            step.sampled.append((seq, None, None))
            self.finish(seq)
            return
        self._emit(seq, result.sampled[seq.seq_id], result.logprobs.get(seq.seq_id), now, step)

    def _emit(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None, now: float, step: StepResult) -> None:
        """Append one generated token and finish ``seq`` if a token stop condition holds."""
        seq.append_token(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        check_token_stop(seq, token, self.max_model_len)
        step.sampled.append((seq, token, logprobs))
        if seq.finish_reason is not None:
            self.finish(seq)

    def _fail_step(self, scheduled: list[tuple[Sequence, int]], forks: dict[int, list[Sequence]],
                   sched_out: SchedulerOutput, error: str, step: StepResult) -> None:
        """Commit nothing; the workers drop what they built, and the step's requests become suspects (or,
        if the step was one request's alone, that request fails)."""
        self.block_manager.pending_copies[:0] = sched_out.block_copies   # idempotent: redone next step
        self._forget.extend(sched_out.finished_seq_ids)   # in case a worker failed before dropping them
        for children in forks.values():
            self._forget.extend(child.seq_id for child in children)
        live = [seq for seq, _ in scheduled if seq.status is SequenceStatus.RUNNING]
        for seq in live:
            self._release_from_workers(seq)
        requests = {seq.request_id for seq in live}
        if len(requests) == 1:
            step.failed[requests.pop()] = error
            for seq in live:
                seq.finish_reason = "error"
                self.finish(seq)
            return
        for seq in live:
            seq.suspect = True
