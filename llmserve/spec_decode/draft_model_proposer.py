"""The draft-model proposer: a smaller model sharing the target's tokenizer drafts each sequence's next tokens
in the worker, beside the target (same device, same dtype), batched like it.

Its KV cache lives in the same paged pool, in the target's KV format (``--kv-cache-dtype``; an int8 cache fits
its scales to the same first batch as the target's): the model runner groups the draft's attention layers with
the target's by their window (:mod:`llmserve.worker.kv_cache_groups`), so each draft layer reads and writes
through its KV-cache group's block tables and slots, which address its K/V exactly as they address the target
layers' of that group, and a sliding draft layer's group frees the blocks that left its window. Two passes keep
the draft's K/V right:

- **Catch-up.** Every step, after the target's forward, the draft runs over the very same flat batch (the
  step's tokens, positions, slots): prompts, prefill chunks, the last token and the drafts being verified.
  So the draft holds valid K/V exactly where the target does (every computed position, of every sequence,
  whichever step computed it), and the rules that keep the target's cache right keep the draft's right too:
  rejected drafts are never counted as computed and are written again later; a prefix-cache block was
  written by the draft in the same step as by the target, so a hit serves both; preemption recomputes both;
  copy-on-write copies both (the runner copies every KV layer it binds).
- **Drafting.** After the target has sampled, each drafting sequence's new last token (the bonus token, or
  the prompt's first sampled token) is fed to the draft, then each draft it proposes, ``k`` decode-like
  forwards over the whole batch; each writes its token's K/V at the slot after the previous one. These
  slots lie after the sequence's computed tokens (the scheduler reserves them: ``num_lookahead_slots``), so
  the next catch-up writes them again with the tokens the sequence really has.

Drafts are the draft's argmax (greedy): the proposal ``q`` is one-hot, which the rejection sampler treats
exactly (:mod:`llmserve.spec_decode.rejection_sampler`), so sampled output keeps the target's distribution.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from llmserve.distributed.parallel_state import get_tp_group
from llmserve.layers.attention.backend import AttentionBackend, BatchLayout, get_attention_backend
from llmserve.worker.kv_cache_groups import group_metadata
from llmserve.layers.attention.layer import Attention, set_kv_cache_dtype
from llmserve.model_loader.loader import load_config, load_model, resolve_model_path
from llmserve.models.llama_fused_decode import fused_decode_for, run_step
from llmserve.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from llmserve.config import EngineConfig
    from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput
    from llmserve.worker.input_batch import CachedSequence, InputBatch

logger = logging.getLogger(__name__)


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

    def catch_up(self, layout: BatchLayout, metadata: object, input_ids: torch.Tensor, positions: torch.Tensor,
                 rotary_lengths: torch.Tensor) -> None:
        """Run the draft over the target's step (same tokens, same slots; ``metadata``: this proposer's backend's,
        per KV-cache group): its K/V follows the target's."""
        run_step(self.model, self.fused, layout, metadata, input_ids, positions, rotary_lengths)

    def decisions_on_every_rank(self, seqs: list[CachedSequence],
                                out: ModelRunnerOutput | None) -> tuple[np.ndarray, np.ndarray]:
        """Each of ``seqs``' last token after this step and its number of accepted drafts, as the driver sampled
        them (only the driver's ``out`` holds them), on every tensor-parallel rank. The draft model's forwards
        are collective over the ranks (it is sharded like the target), so each rank must feed it the same tokens
        at the same positions: the driver decides acceptance once, the others receive its decision."""
        tp = get_tp_group()
        result = torch.zeros((2, len(seqs)), dtype=torch.int64, device=self.device)
        if tp.is_first_rank:
            result[0] = torch.tensor([out.sampled[s.seq_id] for s in seqs], dtype=torch.int64)
            result[1] = torch.tensor([out.num_accepted_drafts.get(s.seq_id, 0) for s in seqs], dtype=torch.int64)
        result = tp.broadcast(result).cpu().numpy()
        return result[0], result[1]

    def draft_after_step(self, batch: InputBatch, seqs: list[CachedSequence], sched: SchedulerOutput,
                         sampled: np.ndarray, accepted: np.ndarray) -> dict[int, list[int]]:
        """Drafts to follow the step's tokens (``sampled[i]``: the token ``seqs[i]`` ends the step with, after its
        ``accepted[i]`` accepted drafts) for the sampled ``seqs`` the scheduler would check them for (not
        grammar-constrained ones, nor a request's samples in the step they fork: they still share their prompt's
        last block), as many as it asks (adaptive speculation). Under tensor parallelism every rank calls this
        with the same arguments (the draft's forwards are collective)."""
        forked = {f.seq_id for forks in sched.forks.values() for f in forks} | set(sched.forks)
        wanted = sched.num_drafts_after_step
        keep = [i for i, s in enumerate(seqs) if s.params.structured_outputs is None and s.seq_id not in forked
                and wanted.get(s.seq_id, 1) > 0]
        if not keep:
            return {}
        seqs = [seqs[i] for i in keep]
        rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
        limits = np.fromiter((wanted.get(s.seq_id, self.num_speculative_tokens) for s in seqs), dtype=np.int64,
                             count=len(seqs))
        # the new last token sits after the row's tokens and its accepted drafts
        drafts = self.propose(sampled[keep].tolist(), batch.num_tokens[rows] + accepted[keep],
                              batch.num_blocks[rows] * self.block_size, batch.block_tables[:, rows],
                              batch.num_prompt[rows], limits)
        return {s.seq_id: d for s, d in zip(seqs, drafts) if d}

    def propose(self, last_tokens: list[int], positions: np.ndarray, capacities: np.ndarray,
                block_tables: np.ndarray, num_prompt: np.ndarray, limits: np.ndarray | None = None) -> list[list[int]]:
        """Greedy drafts for each row: ``last_tokens[i]`` (at ``positions[i]``) is fed first, then each draft;
        a row gets at most ``k`` drafts (and ``limits[i]``: adaptive speculation's choice) and writes no slot at
        or past ``capacities[i]`` (its blocks' end) or the context length. ``block_tables``: the rows' block
        ids per KV-cache group ``[groups, rows, blocks]``, ``num_prompt``: their prompt lengths (rotary scaling)."""
        room = np.minimum(capacities, self.max_model_len) - positions
        counts = np.clip(room if limits is None else np.minimum(room, limits), 0, self.num_speculative_tokens)
        drafts = np.zeros((len(positions), self.num_speculative_tokens), dtype=np.int64)
        tokens = np.asarray(last_tokens, dtype=np.int64)
        bs = self.block_size
        for j in range(int(counts.max(initial=0))):
            active = np.flatnonzero(counts > j)
            pos = positions[active] + j
            width = int((pos // bs).max()) + 1
            tables = block_tables[:, active, :width]
            slots = tables[:, np.arange(len(active)), pos // bs].astype(np.int64) * bs + pos % bs
            layout = BatchLayout(query_lens=[1] * len(active), context_lens=pos.tolist(), block_tables=tables[0],
                                 slot_mapping=torch.from_numpy(slots[0]).to(self.device), num_decodes=len(active),
                                 block_size=bs)
            pos_t = torch.from_numpy(pos).to(self.device)
            hidden = run_step(self.model, self.fused, layout,
                              group_metadata(self.backend, layout, tables, slots, self.device),
                              torch.from_numpy(tokens[active]).to(self.device), pos_t,
                              torch.maximum(torch.from_numpy(num_prompt[active]).to(self.device), pos_t + 1))
            logits = self.model.compute_logits(hidden)[:, :self.vocab_size]
            tokens[active] = drafts[active, j] = logits.argmax(dim=-1).cpu().numpy()
        return [drafts[i, :counts[i]].tolist() for i in range(len(positions))]
