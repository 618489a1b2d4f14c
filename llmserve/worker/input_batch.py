"""The worker's own copy of the sequences it runs, patched from each step's SchedulerOutput.

A worker is told a sequence in full once (``new_seqs``) and afterwards only what changed: tokens to
append, the tail of its block table, how many tokens are computed. It never sees the engine's objects,
so it can live in another process, and nothing is rebuilt per step that did not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmserve.engine.messages import NewSequenceData, SchedulerOutput
from llmserve.layers.sampler import position_seed
from llmserve.sampling_params import SamplingParams

@dataclass
class CachedSequence:
    seq_id: int
    sample_index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions ``[start, end)`` (prompt and output alike)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def append_tokens(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)

    def slots(self, start: int, end: int, block_size: int) -> np.ndarray:
        """The flat cache slots of positions ``[start, end)``."""
        pos = np.arange(start, end)
        return np.asarray(self.block_ids)[pos // block_size] * block_size + pos % block_size

    def seeded_generator(self) -> torch.Generator | None:
        """This sequence's generator, set for its next output position (None when unseeded)."""
        if self.generator is not None:
            self.generator.manual_seed(position_seed(self.params.seed or 0, self.sample_index,
                                                     len(self.output_token_ids)))
        return self.generator


class InputBatch:
    """Every sequence this worker holds, by seq id."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seqs: dict[int, CachedSequence] = {}

    def update(self, sched: SchedulerOutput) -> None:
        """Apply a step's changes: drop forgotten sequences, add new ones, patch the others."""
        for seq_id in sched.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in sched.new_seqs:
            self.seqs[new.seq_id] = self._make(new)
        for cached in sched.cached_seqs:
            seq = self.seqs[cached.seq_id]
            seq.append_tokens(cached.new_token_ids)
            del seq.block_ids[cached.block_table_start:]
            seq.block_ids.extend(cached.new_block_ids)
            seq.num_computed_tokens = cached.num_computed_tokens

    def fork(self, parent: CachedSequence, seq_id: int, sample_index: int) -> CachedSequence:
        """A parallel sample of ``parent`` that shares its prompt and blocks (copied on write by the scheduler)."""
        child = CachedSequence(seq_id, sample_index, parent.prompt_token_ids, list(parent.output_token_ids),
                               parent.params, parent.eos_token_id, list(parent.block_ids),
                               parent.num_computed_tokens, self._generator(parent.params))
        self.seqs[seq_id] = child
        return child

    def _make(self, new: NewSequenceData) -> CachedSequence:
        return CachedSequence(new.seq_id, new.sample_index, new.prompt_token_ids, list(new.output_token_ids),
                              new.params, new.eos_token_id, list(new.block_ids), new.num_computed_tokens,
                              self._generator(new.params))

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.is_greedy:
            return None
        return torch.Generator(device=self.device)
