"""Turns a scheduled step into model inputs, runs the model and the sampler, and returns tokens.

Per step it builds the flat batch (decodes first, then prefill chunks), the slot mapping and block
tables, asks the attention backend for its metadata once, runs one forward over every token of the
step, computes logits only where a token is sampled or a prompt logprob is asked for, and samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from llmserve.engine.sequence import Sequence
from llmserve.layers.attention.backend import AttentionBackend, BatchLayout
from llmserve.layers.sampler import Sampler, SamplingBatch, SamplingRow, compute_logprobs
from llmserve.worker.cpu_tuning import keep_large_allocations_in_heap


@dataclass
class TokenLogprobs:
    """Logprobs at one position: the chosen token's, its rank, and the top-k alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class StepOutput:
    sampled: dict[int, int] = field(default_factory=dict)                   # seq_id -> new token
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)        # seq_id -> its logprobs
    # seq_id -> (first position p, logprobs of prompt tokens p+1, p+2, ...)
    prompt_logprobs: dict[int, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)

    def merge(self, other: StepOutput) -> None:
        self.sampled.update(other.sampled)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)


class ModelRunner:
    def __init__(self, model: nn.Module, backend: AttentionBackend, block_size: int, vocab_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.dtype = dtype
        self.sampler = Sampler()
        self.num_blocks = 0
        if device.type == "cpu":
            keep_large_allocations_in_heap()

    def kv_cache_bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        per_layer = 2 * self.block_size * sum(a.num_kv_heads * a.head_dim for a in layers)
        return per_layer * torch.tensor([], dtype=self.dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Zeroed so padded (masked) reads of never-written slots stay finite."""
        self.num_blocks = num_blocks
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.bind_cache(self.backend, torch.zeros(shape, dtype=self.dtype, device=self.device),
                            torch.zeros(shape, dtype=self.dtype, device=self.device))

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate shared blocks (every layer's K and V) before a sequence writes into its copy."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for attn in self.model.attention_layers():
            attn.key_cache.index_copy_(0, dst, attn.key_cache.index_select(0, src))
            attn.value_cache.index_copy_(0, dst, attn.value_cache.index_select(0, src))

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]],
                forks: dict[int, list[Sequence]] | None = None) -> StepOutput:
        """Run one step. ``forks`` maps a sequence whose prompt completes now to the parallel samples that
        share its prompt: each gets its own token sampled from the same logits."""
        batch = sorted(scheduled, key=lambda item: item[1] != 1)   # decodes first (stable)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[np.ndarray] = []
        sample_rows: list[int] = []          # flat index of the token whose logits are sampled
        sample_seqs: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []   # (seq, first flat row, first position, n)
        bs = self.block_size
        for seq, n in batch:
            start = seq.num_computed_tokens
            end = start + n
            flat = len(input_ids)
            input_ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            pos = np.arange(start, end)
            slots.append(np.asarray(seq.block_table)[pos // bs] * bs + pos % bs)
            if end == seq.num_tokens:
                sample_rows.append(flat + n - 1)
                sample_seqs.append(seq)
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                prompt_rows.append((seq, flat, start, n))
        layout = BatchLayout(
            query_lens=[n for _, n in batch],
            context_lens=[seq.num_computed_tokens for seq, _ in batch],
            block_tables=[seq.block_table for seq, _ in batch],
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(self.device),
            num_decodes=sum(1 for _, n in batch if n == 1),
            block_size=bs,
        )
        metadata = self.backend.build_metadata(layout, self.device)
        hidden = self.model(torch.tensor(input_ids, device=self.device),
                            torch.tensor(positions, device=self.device), metadata)
        for i, seq in enumerate(list(sample_seqs)):
            for child in (forks or {}).get(seq.seq_id, ()):
                sample_rows.append(sample_rows[i])
                sample_seqs.append(child)
        out = StepOutput()
        if sample_seqs:
            self._sample(hidden, sample_rows, sample_seqs, out)
        for seq, flat, start, n in prompt_rows:
            out.prompt_logprobs[seq.seq_id] = (start, self._prompt_logprobs(hidden, seq, flat, start, n))
        return out

    def _sample(self, hidden: torch.Tensor, rows: list[int], seqs: list[Sequence], out: StepOutput) -> None:
        logits = self.model.compute_logits(hidden[rows])
        sampling_batch = SamplingBatch.build(
            [SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, s.generator, s.eos_token_id)
             for s in seqs], self.vocab_size, self.device)
        result = self.sampler(logits, sampling_batch)
        tokens = result.sampled_token_ids.tolist()
        wants_logprobs = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wants_logprobs:
            chosen = result.sampled_token_ids[:, None]
            ranks = ((logits > logits.gather(1, chosen)).sum(1) + 1).tolist()
            sampled_lp = result.sampled_logprobs.tolist()
            top_ids = result.topk_token_ids.tolist() if result.topk_token_ids is not None else None
            top_lp = result.topk_logprobs.tolist() if result.topk_logprobs is not None else None
            for i in wants_logprobs:
                k = seqs[i].params.logprobs
                out.logprobs[seqs[i].seq_id] = TokenLogprobs(
                    tokens[i], sampled_lp[i], ranks[i],
                    top_ids[i][:k] if k and top_ids else [], top_lp[i][:k] if k and top_lp else [])
        for seq, token in zip(seqs, tokens):
            out.sampled[seq.seq_id] = token

    def _prompt_logprobs(self, hidden: torch.Tensor, seq: Sequence, flat: int, start: int,
                         n: int) -> list[TokenLogprobs]:
        """Logprob of each prompt token given the ones before it, for the prompt positions in this chunk."""
        stop = min(start + n, seq.num_prompt_tokens - 1)   # position p predicts prompt token p + 1
        count = stop - start
        logprobs = compute_logprobs(self.model.compute_logits(hidden[flat:flat + count]))
        targets = torch.tensor(seq.prompt_token_ids[start + 1:stop + 1], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
        ranks = ((logprobs > chosen[:, None]).sum(1) + 1).tolist()
        k = seq.params.prompt_logprobs
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        result = []
        for i, (token, lp) in enumerate(zip(targets.tolist(), chosen.tolist())):
            result.append(TokenLogprobs(token, lp, ranks[i],
                                        top_ids[i].tolist() if k else [], top_lp[i].tolist() if k else []))
        return result
