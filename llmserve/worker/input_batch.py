"""The worker's own copy of the sequences it runs, patched from each step's SchedulerOutput.

A worker is told a sequence in full once (``new_seqs``) and afterwards only what changed: tokens to
append, the tail of its block table, how many tokens are computed. It never sees the engine's objects,
so it can live in another process.

Each sequence owns a row of persistent numpy arrays (token ids, block table, counts, adapter id), written
only where a step's message changes them. A step's flat inputs (token ids, positions, rotary lengths, cache slots,
the block-table rows of its sequences) are then gathered from those rows with a few vectorised numpy
calls, whatever the batch size, instead of being rebuilt from per-sequence Python lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmserve.config import PoolerConfig
from llmserve.engine.messages import NewSequenceData, SchedulerOutput
from llmserve.layers.pooler import PoolRow
from llmserve.layers.sampler import position_seed
from llmserve.lora.request import LoRARequest
from llmserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmserve.worker.structured_output_manager import StructuredOutputManager


@dataclass
class CachedSequence:
    """What the sampler needs of one sequence (its token lists feed penalties) and its row in the arrays."""

    seq_id: int
    sample_index: int
    row: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None
    generator: torch.Generator | None
    pooling: PoolerConfig | None = None   # a pooling sequence: its hidden states are pooled, never sampled
    lora_request: LoRARequest | None = None   # the adapter it runs with

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def seeded_generator(self) -> torch.Generator | None:
        """This sequence's generator, set for its next output position (None when unseeded)."""
        if self.generator is not None:
            self.generator.manual_seed(position_seed(self.params.seed or 0, self.sample_index,
                                                     len(self.output_token_ids)))
        return self.generator


@dataclass
class StepInputs:
    """One step's flat batch, decodes (one query token) first.

    ``seq_ids[i]`` is row i of the batch; ``sample_rows`` are the flat indices whose logits are sampled,
    for ``sample_seqs`` (the rows whose step reaches their last token, or their last draft, pooling
    sequences excepted);
    ``prompt_rows`` lists (sequence, first flat index, first position, tokens) for rows that want prompt
    logprobs, ``pool_rows`` the same for pooling sequences.
    """

    seq_ids: list[int]
    input_ids: np.ndarray        # int64 [tokens]
    positions: np.ndarray        # int64 [tokens]
    rotary_lengths: np.ndarray   # int64 [tokens]: max(its sequence's prompt length, position + 1)
    slot_mapping: np.ndarray     # int64 [KV-cache groups, tokens]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: np.ndarray     # int32 [KV-cache groups, rows, blocks of the longest row], padded with 0
    num_decodes: int
    sample_rows: list[int]
    sample_seqs: list[CachedSequence]
    prompt_rows: list[tuple[CachedSequence, int, int, int]]
    pool_rows: list[PoolRow]
    lora_ids: np.ndarray | None = None   # int64 [rows]: each row's adapter id (0: base); None: no adapter held


def _grown(array: np.ndarray, rows: int = 0, cols: int = 0) -> np.ndarray:
    """``array`` zero-padded to at least ``rows`` rows and (2-D) ``cols`` columns, at least doubling a
    dimension that grows so that growth is amortised."""
    shape = tuple(n if want <= n else max(want, 2 * n) for n, want in zip(array.shape, (rows, cols)))
    if shape == array.shape:
        return array
    out = np.zeros(shape, dtype=array.dtype)
    out[tuple(slice(0, n) for n in array.shape)] = array
    return out


# Token columns allocated up front; a longer sequence widens every row (amortised doubling).
INITIAL_TOKEN_COLUMNS = 4096


class InputBatch:
    """Every sequence this worker holds, by seq id, over rows of persistent arrays that grow on demand.

    ``structured_output`` (the driver's only) is told of each constrained sequence added, forked or removed,
    so its grammar matchers follow exactly the sequences held here. A sequence has one block table per
    KV-cache group (``num_kv_cache_groups``; :mod:`llmserve.worker.kv_cache_groups`), all of one length.
    """

    def __init__(self, device: torch.device, block_size: int, max_num_seqs: int = 256,
                 max_model_len: int = 2048, structured_output: StructuredOutputManager | None = None,
                 num_kv_cache_groups: int = 1) -> None:
        self.device = device
        self.block_size = block_size
        self.structured_output = structured_output
        self.seqs: dict[int, CachedSequence] = {}
        rows = max(1, max_num_seqs)
        width = max(1, min(max_model_len, INITIAL_TOKEN_COLUMNS))   # rows widen when a sequence outgrows them
        self.token_ids = np.zeros((rows, width), dtype=np.int32)
        self.block_tables = np.zeros((num_kv_cache_groups, rows, -(-width // block_size)), dtype=np.int32)
        self.num_tokens = np.zeros(rows, dtype=np.int64)
        self.num_prompt = np.zeros(rows, dtype=np.int64)
        self.num_computed = np.zeros(rows, dtype=np.int64)
        self.num_blocks = np.zeros(rows, dtype=np.int64)
        self.pools = np.zeros(rows, dtype=bool)   # rows of pooling sequences
        self.num_drafts = np.zeros(rows, dtype=np.int64)   # this step's draft tokens, after the row's tokens
        # Each row's adapter id (0: the base model) and the adapters rows hold, with how many rows hold each:
        # a step finds out without a look at its rows whether any runs with an adapter.
        self.lora_ids = np.zeros(rows, dtype=np.int64)
        self.lora_requests: dict[int, LoRARequest] = {}
        self._lora_rows: dict[int, int] = {}
        self._draft_rows: list[int] = []
        self._free_rows = list(range(rows - 1, -1, -1))
        self._prompt_logprob_seqs: dict[int, CachedSequence] = {}
        self._pooling_seqs: dict[int, CachedSequence] = {}

    def num_computed_tokens(self, seq_id: int) -> int:
        return int(self.num_computed[self.seqs[seq_id].row])

    def block_ids(self, seq_id: int) -> list[list[int]]:
        """The sequence's block table in each KV-cache group."""
        row = self.seqs[seq_id].row
        return self.block_tables[:, row, :self.num_blocks[row]].tolist()

    # ------------------------------------------------------------------ changes from the scheduler
    def update(self, sched: SchedulerOutput) -> None:
        """Apply a step's changes: drop forgotten sequences, add new ones, patch the others."""
        for seq_id in sched.finished_seq_ids:
            self._remove(seq_id)
        for new in sched.new_seqs:
            self._add(new)
        for cached in sched.cached_seqs:
            seq = self.seqs[cached.seq_id]
            row = seq.row
            if cached.new_token_ids:
                self._write_tokens(row, int(self.num_tokens[row]), cached.new_token_ids)
                seq.output_token_ids.extend(cached.new_token_ids)
            self._write_blocks(row, cached.block_table_start, cached.new_block_ids)
            self.num_computed[row] = cached.num_computed_tokens
        self._set_drafts(sched.scheduled_spec_decode_tokens)

    def _set_drafts(self, drafts: dict[int, list[int]]) -> None:
        """Place this step's drafts after their rows' tokens (the next step's tokens overwrite them)."""
        self.num_drafts[self._draft_rows] = 0
        self._draft_rows = []
        for seq_id, tokens in drafts.items():
            row = self.seqs[seq_id].row
            start = int(self.num_tokens[row])
            self._write_tokens(row, start, tokens)
            self.num_tokens[row] = start
            self.num_drafts[row] = len(tokens)
            self._draft_rows.append(row)

    def fork(self, parent: CachedSequence, seq_id: int, sample_index: int) -> CachedSequence:
        """A parallel sample of ``parent`` that shares its prompt and blocks (copied on write by the scheduler)."""
        row = self._allocate_row()
        p = parent.row
        n, b = int(self.num_tokens[p]), int(self.num_blocks[p])
        self.token_ids[row, :n] = self.token_ids[p, :n]
        self.block_tables[:, row, :b] = self.block_tables[:, p, :b]
        self.num_tokens[row], self.num_blocks[row], self.num_computed[row] = n, b, self.num_computed[p]
        self.num_prompt[row] = self.num_prompt[p]
        child = CachedSequence(seq_id, sample_index, row, parent.prompt_token_ids, list(parent.output_token_ids),
                               parent.params, parent.eos_token_id, self._generator(parent.params),
                               lora_request=parent.lora_request)
        self._register(child)
        return child

    def _add(self, new: NewSequenceData) -> None:
        row = self._allocate_row()
        seq = CachedSequence(new.seq_id, new.sample_index, row, new.prompt_token_ids, list(new.output_token_ids),
                             new.params, new.eos_token_id, self._generator(new.params), new.pooling,
                             new.lora_request)
        self.num_tokens[row] = 0
        self.num_prompt[row] = len(new.prompt_token_ids)
        self._write_tokens(row, 0, new.prompt_token_ids)
        self._write_tokens(row, len(new.prompt_token_ids), new.output_token_ids)
        self._write_blocks(row, 0, new.block_ids)
        self.num_computed[row] = new.num_computed_tokens
        self._register(seq)

    def _register(self, seq: CachedSequence) -> None:
        self.seqs[seq.seq_id] = seq
        if seq.params.prompt_logprobs is not None:
            self._prompt_logprob_seqs[seq.seq_id] = seq
        if seq.pooling is not None:
            self._pooling_seqs[seq.seq_id] = seq
        self.pools[seq.row] = seq.pooling is not None
        if seq.lora_request is not None:
            lora_id = seq.lora_request.lora_int_id
            self.lora_ids[seq.row] = lora_id
            self.lora_requests[lora_id] = seq.lora_request
            self._lora_rows[lora_id] = self._lora_rows.get(lora_id, 0) + 1
        if self.structured_output is not None and seq.params.structured_outputs is not None:
            self.structured_output.add(seq.seq_id, seq.params.structured_outputs)

    def _remove(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        self._prompt_logprob_seqs.pop(seq_id, None)
        self._pooling_seqs.pop(seq_id, None)
        if self.structured_output is not None:
            self.structured_output.remove(seq_id)
        if seq.lora_request is not None:
            self._release_lora(seq.lora_request.lora_int_id)
            self.lora_ids[seq.row] = 0
        self.block_tables[:, seq.row, :self.num_blocks[seq.row]] = 0   # padding reads block 0, never a stale id
        self.num_blocks[seq.row] = self.num_tokens[seq.row] = self.num_computed[seq.row] = 0
        self._free_rows.append(seq.row)

    def _release_lora(self, lora_id: int) -> None:
        left = self._lora_rows.pop(lora_id) - 1
        if left:
            self._lora_rows[lora_id] = left
        else:
            del self.lora_requests[lora_id]

    def _allocate_row(self) -> int:
        if not self._free_rows:
            old = self.token_ids.shape[0]
            self._grow(rows=old + 1)
            self._free_rows = list(range(self.token_ids.shape[0] - 1, old - 1, -1))
        return self._free_rows.pop()

    def _grow(self, rows: int = 0, tokens: int = 0, blocks: int = 0) -> None:
        self.token_ids = _grown(self.token_ids, rows, tokens)
        self.block_tables = np.stack([_grown(table, rows, blocks) for table in self.block_tables])
        self.num_tokens = _grown(self.num_tokens, rows)
        self.num_prompt = _grown(self.num_prompt, rows)
        self.num_computed = _grown(self.num_computed, rows)
        self.num_blocks = _grown(self.num_blocks, rows)
        self.pools = _grown(self.pools, rows)
        self.num_drafts = _grown(self.num_drafts, rows)
        self.lora_ids = _grown(self.lora_ids, rows)

    def _write_tokens(self, row: int, start: int, token_ids: list[int]) -> None:
        end = start + len(token_ids)
        if end > self.token_ids.shape[1]:
            self._grow(tokens=end)
        self.token_ids[row, start:end] = token_ids
        self.num_tokens[row] = end

    def _write_blocks(self, row: int, start: int, block_ids: list[list[int]]) -> None:
        """Replace the row's block table in each group from ``start`` on (a copy-on-write swaps a tail block)."""
        end = start + len(block_ids[0])
        if end > self.block_tables.shape[2]:
            self._grow(blocks=end)
        old_end = int(self.num_blocks[row])
        self.block_tables[:, row, start:end] = block_ids
        if old_end > end:
            self.block_tables[:, row, end:old_end] = 0
        self.num_blocks[row] = end

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.is_greedy:
            return None
        return torch.Generator(device=self.device)

    # ------------------------------------------------------------------ one step's inputs
    def prepare(self, num_scheduled_tokens: dict[int, int], lookahead: int = 0) -> StepInputs:
        """Gather the step's flat inputs from the rows of its sequences (decodes first, in a stable order); the
        block tables reach ``lookahead`` positions past the step's tokens (a multi-step step's later steps)."""
        # (a decode step's batch is small and this runs every step: each NumPy call here costs about what its
        # arithmetic does, so an all-decode step skips the reordering and the per-token expansion)
        seq_ids = list(num_scheduled_tokens)
        num_seqs = len(seq_ids)
        all_decodes = sum(num_scheduled_tokens.values()) == num_seqs   # every row schedules at least one token
        q = np.fromiter(num_scheduled_tokens.values(), dtype=np.int64, count=num_seqs)
        num_decodes = num_seqs if all_decodes else int((q == 1).sum())
        if not all_decodes:   # decodes first, in a stable order
            order = np.argsort(q != 1, kind="stable")
            seq_ids = [seq_ids[i] for i in order]
            q = q[order]
        rows = np.fromiter((self.seqs[i].row for i in seq_ids), dtype=np.int64, count=num_seqs)
        ctx = self.num_computed[rows]
        ends = q.cumsum()
        if all_decodes:
            row_of_token, positions = rows, ctx
        else:
            row_of_token = np.repeat(rows, q)
            positions = np.repeat(ctx - (ends - q), q) + np.arange(int(ends[-1]))
        bs = self.block_size
        # (C order: numpy lays out advanced-index results token-major, and each group's row must be contiguous
        # for the kernels)
        slots = self.block_tables[:, row_of_token, positions // bs].astype(np.int64, order="C") * bs + positions % bs
        reach = ctx + q
        # A row is sampled when its step reaches its last token (or last draft); pooling rows never are.
        last = self.num_tokens[rows] + self.num_drafts[rows] if self._draft_rows else self.num_tokens[rows]
        sampled = np.flatnonzero(reach == last if not self._pooling_seqs else (reach == last) & ~self.pools[rows])
        width = max(1, -(-(int(reach.max()) + lookahead) // bs))
        prompt_rows, pool_rows = [], []
        if self._prompt_logprob_seqs or self._pooling_seqs:
            index = {seq_id: i for i, seq_id in enumerate(seq_ids)}
            for seq_id, seq in self._prompt_logprob_seqs.items():
                i = index.get(seq_id)
                if i is not None and ctx[i] < seq.num_prompt_tokens - 1:
                    prompt_rows.append((seq, int(ends[i] - q[i]), int(ctx[i]), int(q[i])))
            for seq_id, seq in self._pooling_seqs.items():
                i = index.get(seq_id)
                if i is not None:
                    assert seq.pooling is not None
                    pool_rows.append(PoolRow(seq_id, seq.pooling, int(ends[i] - q[i]), int(ctx[i]), int(q[i]),
                                             seq.num_prompt_tokens))
        return StepInputs(
            seq_ids=seq_ids, input_ids=self.token_ids[row_of_token, positions].astype(np.int64), positions=positions,
            rotary_lengths=np.maximum(self.num_prompt[row_of_token], positions + 1),
            slot_mapping=slots, query_lens=q.tolist(), context_lens=ctx.tolist(),
            block_tables=np.ascontiguousarray(self.block_tables[:, rows, :width]), num_decodes=num_decodes,
            sample_rows=(ends[sampled] - 1).tolist(), sample_seqs=[self.seqs[seq_ids[i]] for i in sampled],
            prompt_rows=prompt_rows, pool_rows=pool_rows, lora_ids=self.lora_ids[rows] if self._lora_rows else None)
