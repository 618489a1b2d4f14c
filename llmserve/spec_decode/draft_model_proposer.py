"""The draft-model proposer: a smaller model sharing the target's tokenizer drafts each sequence's next tokens
in the worker, beside the target (same device, same dtype), batched like it.

Its KV cache lives in the same paged pool, in the target's KV format (``--kv-cache-dtype``; an int8 cache fits
its scales to the same first batch as the target's): the model runner groups the draft's attention layers with
the target's by their window (:mod:`llmserve.worker.kv_cache_groups`), so each draft layer reads and writes
through its KV-cache group's block tables and slots, which address its K/V exactly as they address the target
layers' of that group, and a sliding draft layer's group frees the blocks that left its window.

After the target has sampled, each step feeds the draft what it has not seen, one row per sequence, and
drafts: a prompt or prefill chunk (the very tokens and slots the target computed) with the prompt's first
sampled token; for a drafting sequence, its new last token (the bonus token), after the last of the previous
step's drafts when all were accepted; then each draft it proposes, ``k - 1`` more forwards over the drafting
rows, each writing its token's K/V at the slot after the previous one. Those slots lie after the sequence's
computed tokens (the scheduler reserves them: ``num_lookahead_slots``); the drafts the target accepts next step
are then already in the draft's cache, and a rejected draft's slot is written again with the token the sequence
really has. What the draft holds per sequence is tracked (:class:`DraftedKV`) and checked against the tokens the
target accepted, so each token is fed once.

A sequence asked for no drafts after the step (grammar-constrained, or capped at none by adaptive speculation)
is not fed at all, prompt included, so a step in which nobody drafts costs the draft nothing; when it drafts
again, its row feeds every token it missed. With a fixed ``k`` every other sequence is fed every step, so the
draft's K/V holds every position the target has computed for it: a prefix-cache hit serves both models (a new
sequence takes what its hit brought as the draft's too), preemption recomputes both, copy-on-write copies both
(the runner copies every KV layer it binds). A block cached while its sequence was not fed holds no draft K/V: a
later hit on it drafts from a partial context, with lower acceptance and the same output. A draft with a
sliding-window layer is fed every sequence every step: its group hands back the blocks that leave the window,
so the positions a paused sequence missed may no longer have a slot.

Drafts are the draft's argmax (greedy): the proposal ``q`` is one-hot, which the rejection sampler treats
exactly (:mod:`llmserve.spec_decode.rejection_sampler`), so sampled output keeps the target's distribution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from llmserve.distributed.parallel_state import get_tp_group
from llmserve.layers.attention.backend import AttentionBackend, BatchLayout, get_attention_backend
from llmserve.worker.kv_cache_groups import group_metadata
from llmserve.layers.attention.layer import Attention, set_kv_cache_dtype
from llmserve.model_loader.loader import load_config, load_model, resolve_model_path
from llmserve.models.llama_fused_decode import MAX_ROW_TOKENS, fused_decode_for, run_step
from llmserve.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from llmserve.config import EngineConfig
    from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput
    from llmserve.worker.input_batch import CachedSequence, InputBatch, StepInputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftedKV:
    """What the draft's cache holds for one sequence: its tokens at every position below ``valid``, then
    ``drafts`` (its own proposals, written while drafting), which are the sequence's tokens where accepted."""

    valid: int
    drafts: tuple[int, ...] = ()

    def accepted(self, tokens: np.ndarray, end: int) -> int:
        """How many of ``drafts`` the sequence's ``tokens`` (its row, valid below ``end``) kept."""
        n = 0
        for n, (draft, token) in enumerate(zip(self.drafts, tokens[self.valid:end].tolist()), start=1):
            if draft != token:
                return n - 1
        return n


class DraftModelProposer:
    def __init__(self, model: nn.Module, backend: AttentionBackend, num_speculative_tokens: int, block_size: int,
                 vocab_size: int, max_model_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.backend = backend
        self.fused = fused_decode_for(model, backend, dtype, device)   # the draft's one-token forwards, on a CPU
        self.num_speculative_tokens = num_speculative_tokens
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.device = device
        self._held: dict[int, DraftedKV] = {}   # by seq id: what the draft's cache holds of each sequence
        # A sequence asked for no drafts is not fed, unless a draft layer slides (module docstring).
        self._pauses = not any(a.spec.sliding_window is not None for a in model.attention_layers())

    @classmethod
    def load(cls, spec: SpeculativeConfig, config: EngineConfig, target_hf_config: Any, dtype: torch.dtype,
             device: torch.device, max_model_len: int) -> DraftModelProposer:
        """Load ``spec.model`` in the target's dtype on its device, its KV cache in ``--kv-cache-dtype``; refuse a
        draft whose vocabulary differs from the target's (its token ids would mean other tokens) or whose
        context is shorter than ``max_model_len``."""
        assert spec.model is not None
        path = resolve_model_path(spec.model, None, config.download_dir)
        hf_config = load_config(path, config.trust_remote_code)
        vocab, target_vocab = int(hf_config.vocab_size), int(target_hf_config.vocab_size)
        if vocab != target_vocab:
            raise ValueError(f"--speculative-config: the draft model {spec.model} has a vocabulary of {vocab} tokens, "
                             f"the target {target_vocab}; a draft must share the target's tokenizer")
        draft_len = getattr(hf_config, "max_position_embeddings", None)
        if draft_len is not None and draft_len < max_model_len:
            raise ValueError(f"--speculative-config: the draft model {spec.model} holds {draft_len} positions, "
                             f"fewer than the target's context ({max_model_len}); lower --max-model-len")
        model = load_model(hf_config, path, dtype, device)
        set_kv_cache_dtype(model, config.kv_cache_dtype)
        layers = model.attention_layers()
        backend = get_attention_backend(device, dtype, num_kv_heads=layers[0].num_kv_heads,
                                        latent_attention=any(a.values_in_key_cache for a in layers))
        logger.info("Draft model %s (%s, %d attention layers) proposes %d tokens per step", path,
                    type(model).__name__, len(layers), spec.num_speculative_tokens)
        return cls(model, backend, spec.num_speculative_tokens, config.block_size, target_vocab, max_model_len,
                   device, dtype)

    @property
    def num_lookahead_slots(self) -> int:
        """Slots after a sequence's step that drafting writes (``k``: the new token and ``k - 1`` drafts)."""
        return self.num_speculative_tokens

    def attention_layers(self) -> list[Attention]:
        return self.model.attention_layers()

    def decisions_on_every_rank(self, seqs: list[CachedSequence],
                                out: ModelRunnerOutput | None) -> tuple[np.ndarray, np.ndarray]:
        """Each of ``seqs``' last token after this step and its number of accepted drafts, as the driver sampled
        them (only the driver's ``out`` holds them), on every tensor-parallel rank. The draft model's forwards
        are collective over the ranks (it is sharded like the target), so each rank must feed it the same tokens
        at the same positions: the driver decides acceptance once, the others receive its decision."""
        if not seqs:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        tp = get_tp_group()
        result = torch.zeros((2, len(seqs)), dtype=torch.int64, device=self.device)
        if tp.is_first_rank:
            result[0] = torch.tensor([out.sampled[s.seq_id] for s in seqs], dtype=torch.int64)
            result[1] = torch.tensor([out.num_accepted_drafts.get(s.seq_id, 0) for s in seqs], dtype=torch.int64)
        result = tp.broadcast(result).cpu().numpy()
        return result[0], result[1]

    def draft_after_step(self, batch: InputBatch, step: StepInputs, seqs: list[CachedSequence],
                         sched: SchedulerOutput, sampled: np.ndarray, accepted: np.ndarray) -> dict[int, list[int]]:
        """Feed the draft what it has not seen of this step's sequences and return drafts to follow the sampled
        ``seqs`` (``sampled[i]``: the token ``seqs[i]`` ends the step with, after its ``accepted[i]`` accepted
        drafts), as many as the scheduler asks (adaptive speculation). A sequence asked for none (a
        grammar-constrained one, or one adaptive speculation caps at none) is not fed, unless a draft layer
        slides; when it drafts again its row feeds every token it missed. A request's samples in the step they
        fork are fed their first tokens next step: they still share their prompt's last block. Under tensor
        parallelism every rank calls this with the same arguments (the draft's forwards are collective)."""
        held = self._held
        for seq_id in sched.finished_seq_ids:
            held.pop(seq_id, None)
        outcome = {s.seq_id: (int(sampled[i]), int(accepted[i])) for i, s in enumerate(seqs)}
        spec, wanted = sched.scheduled_spec_decode_tokens, sched.num_drafts_after_step
        fed, starts, fed_ids, limits = [], [], [], []
        for seq_id, q, c in zip(step.seq_ids, step.query_lens, step.context_lens):
            seq = batch.seqs[seq_id]
            h = held.get(seq_id)
            if h is None:   # first seen: what a prefix-cache hit brought is taken as the draft's too
                h = held[seq_id] = DraftedKV(c)
            want = 0 if seq.params.structured_outputs is not None else wanted.get(seq_id, self.num_speculative_tokens)
            if want == 0 and self._pauses:
                continue
            result = outcome.get(seq_id)
            end = c + q - len(spec.get(seq_id, ())) + (result[1] if result is not None else 0)   # tokens it has
            valid = min(h.valid + h.accepted(batch.token_ids[seq.row], end), end)
            row = batch.token_ids[seq.row, valid:end].tolist()
            last = result is not None and seq_id not in sched.forks
            if last:
                row.append(result[0])
            if row:
                fed.append(row)
                starts.append(valid)
                fed_ids.append(seq_id)
                limits.append(want if last else 0)
        proposals = {}
        if fed:
            rows = np.fromiter((batch.seqs[i].row for i in fed_ids), dtype=np.int64, count=len(fed_ids))
            drafts, written = self.propose(fed, np.asarray(starts, dtype=np.int64),
                                           batch.num_blocks[rows] * self.block_size, batch.block_tables[:, rows],
                                           batch.num_prompt[rows], np.asarray(limits, dtype=np.int64))
            for i, seq_id in enumerate(fed_ids):
                d = drafts[i]
                held[seq_id] = DraftedKV(starts[i] + len(fed[i]), tuple(d[:-1])) if written[i] \
                    else DraftedKV(starts[i])
                if d:
                    proposals[seq_id] = d
        for parent, forks in sched.forks.items():   # a fork holds what its parent held of their shared prompt
            for fork in forks:
                held[fork.seq_id] = DraftedKV(held[parent].valid)
        return proposals

    def propose(self, fed: list[list[int]], starts: np.ndarray, capacities: np.ndarray, block_tables: np.ndarray,
                num_prompt: np.ndarray, limits: np.ndarray | None = None) -> tuple[list[list[int]], np.ndarray]:
        """Greedy drafts for each row: ``fed[i]`` (tokens at positions ``starts[i]``..., its last the sequence's
        last token) is fed first, then each draft; a row gets at most ``k`` drafts (and ``limits[i]``: adaptive
        speculation's choice) and writes no slot at or past ``capacities[i]`` (its blocks' end) or the context
        length: a row with no room for its last token is not fed at all. ``block_tables``: the rows' block ids
        per KV-cache group ``[groups, rows, blocks]``, ``num_prompt``: their prompt lengths (rotary scaling).
        Returns the drafts and whether each row was fed."""
        lens = np.fromiter((len(f) for f in fed), dtype=np.int64, count=len(fed))
        last = starts + lens - 1
        room = np.minimum(capacities, self.max_model_len) - last
        written = room >= 1
        counts = np.clip(room if limits is None else np.minimum(room, limits), 0, self.num_speculative_tokens)
        drafts = np.zeros((len(fed), self.num_speculative_tokens), dtype=np.int64)
        first = np.flatnonzero(written)
        if len(first):
            tokens = np.fromiter((t for i in first for t in fed[i]), dtype=np.int64, count=int(lens[first].sum()))
            hidden = self._forward(tokens, lens[first], starts[first], block_tables[:, first], num_prompt[first])
            drafting = np.flatnonzero(counts[first] > 0)
            if len(drafting):
                drafts[first[drafting], 0] = self._argmax(hidden[torch.from_numpy(drafting)])
        for j in range(1, int(counts.max(initial=0))):
            active = np.flatnonzero(counts > j)
            hidden = self._forward(drafts[active, j - 1], np.ones(len(active), dtype=np.int64), last[active] + j,
                                   block_tables[:, active], num_prompt[active])
            drafts[active, j] = self._argmax(hidden)
        return [drafts[i, :counts[i]].tolist() for i in range(len(fed))], written

    def _argmax(self, hidden: torch.Tensor) -> np.ndarray:
        return self.model.compute_logits(hidden)[:, :self.vocab_size].argmax(dim=-1).cpu().numpy()

    def _forward(self, tokens: np.ndarray, query_lens: np.ndarray, starts: np.ndarray, block_tables: np.ndarray,
                 num_prompt: np.ndarray) -> torch.Tensor:
        """The draft's hidden state at each row's last token, feeding row i's ``query_lens[i]`` tokens (flat in
        ``tokens``) at positions ``starts[i]``... over its cached context: on a CPU, rows of at most
        :data:`MAX_ROW_TOKENS` straight into the fused step (each token a decode row), longer ones (prompt
        chunks) and every row elsewhere through the model's modules."""
        short = (query_lens <= MAX_ROW_TOKENS if self.fused is not None and len(block_tables) == 1
                 else np.zeros(len(query_lens), dtype=bool))
        if short.all():
            return self._fused_forward(tokens, query_lens, starts, block_tables)
        if not short.any():
            return self._module_forward(tokens, query_lens, starts, block_tables, num_prompt)
        ends = np.cumsum(query_lens)
        parts = []
        for rows in (np.flatnonzero(short), np.flatnonzero(~short)):
            flat = np.concatenate([np.arange(e - n, e) for e, n in zip(ends[rows], query_lens[rows])])
            parts.append((rows, (tokens[flat], query_lens[rows], starts[rows], block_tables[:, rows])))
        (fused_rows, fused_args), (module_rows, module_args) = parts
        first = self._fused_forward(*fused_args)
        hidden = first.new_empty((len(query_lens), first.shape[1]))
        hidden[torch.from_numpy(fused_rows)] = first
        hidden[torch.from_numpy(module_rows)] = self._module_forward(*module_args, num_prompt[module_rows])
        return hidden

    @staticmethod
    def _token_positions(query_lens: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each token's row and position, and each row's end in the flat tokens."""
        ends = np.cumsum(query_lens)
        row_of = np.repeat(np.arange(len(query_lens)), query_lens)
        return row_of, starts[row_of] + np.arange(int(ends[-1])) - np.repeat(ends - query_lens, query_lens), ends

    def _fused_forward(self, tokens: np.ndarray, query_lens: np.ndarray, starts: np.ndarray,
                       block_tables: np.ndarray) -> torch.Tensor:
        bs = self.block_size
        single = len(tokens) == len(query_lens)   # a drafting pass: each row's one token is its decode row
        row_of, pos, ends = (None, starts, None) if single else self._token_positions(query_lens, starts)
        tables = block_tables[0, :, :int(pos.max()) // bs + 1]
        if not single:
            tables = tables[row_of]
        slots = tables[np.arange(len(pos)), pos // bs].astype(np.int64) * bs + pos % bs
        hidden = self.fused.decode_tokens(torch.from_numpy(tokens), torch.from_numpy(pos), torch.from_numpy(slots),
                                          torch.from_numpy(tables), torch.from_numpy((pos + 1).astype(np.int32)))
        return hidden if single else hidden[torch.from_numpy(ends - 1)]

    def _module_forward(self, tokens: np.ndarray, query_lens: np.ndarray, starts: np.ndarray,
                        block_tables: np.ndarray, num_prompt: np.ndarray) -> torch.Tensor:
        bs = self.block_size
        order = np.argsort(query_lens != 1, kind="stable")   # decodes first, as a step's layout has them
        q = query_lens[order]
        row_of, pos, ends = self._token_positions(query_lens, starts)
        flat = np.concatenate([np.arange(e - n, e) for e, n in zip(ends[order], q)])
        row_of, pos = row_of[flat], pos[flat]
        tables = block_tables[:, :, :int(pos.max()) // bs + 1]
        slots = tables[:, row_of, pos // bs].astype(np.int64) * bs + pos % bs
        layout = BatchLayout(query_lens=q.tolist(), context_lens=starts[order].tolist(), block_tables=tables[0, order],
                             slot_mapping=torch.from_numpy(slots[0]).to(self.device),
                             num_decodes=int((q == 1).sum()), block_size=bs)
        pos_t = torch.from_numpy(pos).to(self.device)
        hidden = run_step(self.model, self.fused, layout,
                          group_metadata(self.backend, layout, tables[:, order], slots, self.device),
                          torch.from_numpy(tokens[flat]).to(self.device), pos_t,
                          torch.maximum(torch.from_numpy(num_prompt[row_of]).to(self.device), pos_t + 1))
        last = np.empty(len(q), dtype=np.int64)
        last[order] = np.cumsum(q) - 1
        return hidden[torch.from_numpy(last).to(hidden.device)]
