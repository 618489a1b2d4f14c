"""Continuous batching: decides, every step, which sequences run and how many tokens each computes.

Running sequences go first, in admission order, then waiting ones (FCFS) while the token budget
(``max_num_batched_tokens``), the sequence cap (``max_num_seqs``) and free blocks allow. A long prompt
takes what is left of the budget and continues next step (chunked prefill). When a running sequence
cannot get a block, the most recently admitted running sequence is preempted: its blocks are freed and
it goes back to the front of the queue to be recomputed later. A waiting sequence first takes the
blocks of its longest cached prefix (prefix caching), so only the rest of its prompt is computed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from llmserve.engine.block_manager import BlockManager
from llmserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)   # (sequence, tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}   # insertion order = admission order; O(1) removal
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose K/V already exists (a forked parallel sample)."""
        seq.status = SequenceStatus.RUNNING
        self.running[seq.seq_id] = seq

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if self.running.pop(seq.seq_id, None) is None:
            try:
                self.waiting.remove(seq)   # aborts of queued requests only; rare
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for seq in list(self.running.values()):
            if budget == 0:
                break
            if seq.seq_id not in self.running:
                continue   # preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._allocate_or_preempt(seq, num_new, out):
                out.scheduled.append((seq, num_new))
                budget -= num_new
        if not out.preempted:
            self._admit_waiting(out, budget)
        now = time.monotonic()
        for seq, _ in out.scheduled:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        return out

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Find blocks for ``seq`` by preempting from the tail of the running set; False if ``seq`` itself went."""
        while not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new):
            victim = self.running[next(reversed(self.running))]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_hit = self.block_manager.match_prefix(seq)   # cached prefix blocks count as computed
            num_new = seq.num_tokens - seq.num_computed_tokens
            if (num_new > budget and not self.enable_chunked_prefill) or not self.block_manager.allocate(
                    seq, seq.num_computed_tokens + min(num_new, budget)):
                self.block_manager.free(seq)   # give the prefix hits back; they stay cached
                seq.num_computed_tokens = 0
                break
            num_new = min(num_new, budget)
            self.block_manager.record_prefix_query(seq.num_tokens, num_hit)
            seq.num_cached_tokens = max(seq.num_cached_tokens, num_hit)
            self.waiting.popleft()
            self.running[seq.seq_id] = seq
            seq.status = SequenceStatus.RUNNING
            out.scheduled.append((seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.seq_id]
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
