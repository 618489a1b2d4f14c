"""Turns a scheduled step into model inputs, runs the model and the sampler, and returns tokens.

It holds its own copy of the running sequences (:class:`~llmserve.worker.input_batch.InputBatch`),
patched from each :class:`~llmserve.engine.messages.SchedulerOutput`. Per step it gathers the flat batch
(decodes first, then prefill chunks), the slot mapping and block tables from that batch's rows, asks the
attention backend for its metadata once, runs one forward over every token of the step, computes
logits only where a token is sampled or a prompt logprob is asked for, and samples. Pooling (embedding)
sequences are never sampled: the driver returns their share of the pooled final hidden states
(:mod:`llmserve.layers.pooler`).
On the driver, rows with a structured-output constraint are sampled under their grammar's token bitmask
(:mod:`llmserve.worker.structured_output_manager`), filled while the forward pass runs. A row with
speculative drafts is sampled at its last token and at each draft, and the rejection sampler
(:mod:`llmserve.spec_decode.rejection_sampler`) keeps the drafts the samples agree with. With a draft model
(:mod:`llmserve.spec_decode.draft_model_proposer`), once the target has sampled, the draft is fed what it
has not seen of the step and drafts the next step's tokens; its KV layers are grouped and bound with the
target's in the one pool (:mod:`llmserve.worker.kv_cache_groups`), so every KV-cache operation here covers both.

On CUDA, decode-only steps replay CUDA graphs (:mod:`llmserve.worker.cuda_graphs`) unless
``enforce_eager`` is set or the attention backend cannot be captured (steps with LoRA adapter rows replay
graphs captured with the adapter kernels, when the layers run them in Triton), and
:meth:`ModelRunner.profile_kv_cache_budget` sizes the KV cache from a profiled forward pass. On CPU none
of this runs. The only host sync of a step is reading the sampled token ids back (plus the logprobs a
request asked for).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from llmserve.distributed.parallel_state import get_pp_group, get_tp_group
from llmserve.distributed.shm_all_reduce import CollectiveAbortedError
from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from llmserve.layers import pooler
from llmserve.layers.attention.backend import AttentionBackend, BatchLayout, KVCacheGroupMetadata
from llmserve.layers.attention.layer import Attention
from llmserve.layers.sampler import Sampler, compute_logprobs
from llmserve.layers.sampling_batch import SamplingBatch, SamplingRow
from llmserve.lora.model_manager import LoRAModelManager
from llmserve.models.llama_fused_decode import fused_decode_or_reason, run_step
from llmserve.sampling_params import SamplingParams
from llmserve.spec_decode import rejection_sampler
from llmserve.spec_decode.draft_model_proposer import DraftModelProposer
from llmserve.models.interface import IntermediateTensors
from llmserve.worker.cpu_tuning import keep_large_allocations_in_heap
from llmserve.worker.cuda_graphs import DecodeGraphs
from llmserve.worker.input_batch import CachedSequence, InputBatch
from llmserve.worker.kv_cache_budget import kv_cache_budget, profile_batch
from llmserve.worker.kv_cache_groups import bind_kv_caches, group_metadata, kv_cache_groups_for, shared_pages
from llmserve.worker.multi_step import multi_step_decode, run_multi_step
from llmserve.worker.structured_output_manager import StructuredOutputManager

if TYPE_CHECKING:
    from llmserve.structured_output import GrammarCompiler

logger = logging.getLogger(__name__)

# The status word a pipeline stage sends ahead of its hidden states (see ModelRunner.fail_step).
_STAGE_OK, _STAGE_FAILED = 1, 0


class ModelRunner:
    def __init__(self, model: nn.Module, backend: AttentionBackend, block_size: int, vocab_size: int,
                 device: torch.device, dtype: torch.dtype, *, max_num_seqs: int = 256,
                 enforce_eager: bool = False, max_seq_len_to_capture: int = 8192,
                 max_model_len: int | None = None,
                 load_grammar_compiler: Callable[[], GrammarCompiler] | None = None,
                 lora_manager: LoRAModelManager | None = None, drafter: DraftModelProposer | None = None,
                 num_scheduler_steps: int = 1) -> None:
        """``load_grammar_compiler`` is given to the driver only (the rank that samples keeps the grammars);
        ``lora_manager`` (LoRA on) has wrapped the model's linear layers and is told each step's adapters;
        ``drafter`` (a draft model's speculative decoding) runs eagerly after the target each step;
        ``num_scheduler_steps`` above 1: multi-step steps may come (raises
        :class:`~llmserve.worker.multi_step.MultiStepUnsupported` where they cannot run)."""
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.dtype = dtype
        self.sampler = Sampler()
        self.structured_output = (None if load_grammar_compiler is None
                                  else StructuredOutputManager(load_grammar_compiler, max_num_seqs))
        self.drafter = drafter
        self.kv_cache_groups = kv_cache_groups_for(self.kv_layers(), get_pp_group())
        self.kv_buffers: list[torch.Tensor] = []   # the pool's byte buffers, each once (bind_kv_caches)
        self.input_batch = InputBatch(device, block_size, max_num_seqs, max_model_len or 2048, self.structured_output,
                                      self.kv_cache_groups.num_groups)
        self.num_blocks = 0
        self.max_num_seqs = max_num_seqs
        self.enforce_eager = enforce_eager
        # No graph needs to be wider than the longest sequence the engine accepts.
        self.max_seq_len_to_capture = min(max_seq_len_to_capture, max_model_len or max_seq_len_to_capture)
        self.graphs: DecodeGraphs | None = None
        self.lora_manager = lora_manager
        fused = fused_decode_or_reason(model, backend, dtype, device)
        self.fused_decode = None if isinstance(fused, str) else fused
        self.multi_step = (None if num_scheduler_steps == 1
                           else multi_step_decode(fused, self.kv_cache_groups.num_groups))
        self._calibrate_kv: list[Attention] = []   # attention layers whose KV-cache scales the next eager step fits
        self._received = self._sent = False   # this step's pipeline hand-offs, for fail_step
        if device.type == "cpu":
            keep_large_allocations_in_heap()

    @property
    def use_cuda_graphs(self) -> bool:
        return (self.device.type == "cuda" and not self.enforce_eager and self.drafter is None
                and getattr(self.backend, "supports_cuda_graphs", False))

    def kv_layers(self) -> list[Attention]:
        """Every attention layer holding K/V in the pool: the model's, then the draft model's."""
        layers = self.model.attention_layers()
        return layers if self.drafter is None else [*layers, *self.drafter.attention_layers()]

    def kv_cache_bytes_per_block(self, model_dtype: bool = False, with_draft: bool = True) -> int:
        """Bytes a block takes in the pool: the padded page of every cache tensor the KV-cache groups share
        (:mod:`llmserve.worker.kv_cache_pages`). ``model_dtype``: were every cache in the model's dtype, the
        baseline a quantised cache's capacity gain is measured against; ``with_draft`` False: were there no
        draft model (its layers out of the groups)."""
        layers, groups = self.kv_layers(), self.kv_cache_groups
        if not with_draft and self.drafter is not None:
            layers = self.model.attention_layers()
            groups = kv_cache_groups_for(layers, get_pp_group())
        return sum(p.block_bytes for p in shared_pages(layers, groups, self.block_size, self.dtype, model_dtype))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Zeroed so padded (masked) reads of never-written slots stay finite. On CUDA (unless
        ``enforce_eager``) the decode graphs are captured here, since they read these caches."""
        self.graphs = None   # graphs captured against an older cache must never replay
        self._bind_cache(num_blocks)
        # int8 caches without checkpoint scales fit them to the first real batch (not to a capture's dummy one).
        self._calibrate_kv = [a for a in self.kv_layers() if a.needs_kv_calibration()]
        if self.use_cuda_graphs:
            lora = self.lora_manager
            self.graphs = DecodeGraphs(self.model, self.backend, self.block_size, self.max_num_seqs,
                                       self.max_seq_len_to_capture, self.device, self.kv_cache_groups.num_groups,
                                       lora.graph_inputs if lora is not None and lora.supports_cuda_graphs else None)
            self.graphs.capture()

    def _bind_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        backends = [self.backend] * len(self.model.attention_layers())
        if self.drafter is not None:
            backends += [self.drafter.backend] * len(self.drafter.attention_layers())
        self.kv_buffers = bind_kv_caches(self.kv_layers(), self.kv_cache_groups, backends, num_blocks,
                                         self.block_size, self.dtype, self.device)

    @torch.inference_mode()
    def profile_kv_cache_budget(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                                gpu_memory_utilization: float) -> int:
        """CUDA only, before :meth:`allocate_kv_cache`: run the worst-case step (a full
        ``max_num_batched_tokens`` prefill, logits for ``max_num_seqs`` rows and a top-k/top-p sampler
        pass over them) against a throwaway cache, and return the bytes the KV cache may take
        (:func:`kv_cache_budget`)."""
        if self.device.type != "cuda":
            raise RuntimeError("KV-cache profiling measures GPU memory; on CPU the cache size is configured")
        lengths = profile_batch(max_num_batched_tokens, max_num_seqs, max_model_len)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._bind_cache(sum(-(-n // self.block_size) for n in lengths))
        scratch_cache = self.num_blocks * self.kv_cache_bytes_per_block()
        try:
            self.run_worst_case_step(lengths, max_num_seqs)
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - scratch_cache
            free, total = torch.cuda.mem_get_info(self.device)
            non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        finally:
            for attn in self.kv_layers():
                attn.bind_cache(attn.backend, torch.empty(0), torch.empty(0))
            self.kv_buffers = []
            self.num_blocks = 0
            torch.cuda.empty_cache()
        budget = kv_cache_budget(total, gpu_memory_utilization, peak, non_torch)
        logger.info("Memory profile: peak %.2f GiB in PyTorch (weights + a %d-token step), %.2f GiB outside it; "
                    "%.2f GiB left for the KV cache (%.2f GiB x %.2f)", peak / 2**30, sum(lengths),
                    non_torch / 2**30, budget / 2**30, total / 2**30, gpu_memory_utilization)
        return budget

    @torch.inference_mode()
    def run_worst_case_step(self, lengths: list[int], max_num_seqs: int) -> torch.Tensor:
        """Prefill fresh prompts of ``lengths`` (into blocks 0, 1, ... of the bound cache), then compute
        logits for the last ``max_num_seqs`` tokens and sample them with top-k, top-p and logprobs on:
        the step that needs the most activation memory. Returns the sampled ids."""
        bs = self.block_size
        tables, slots, next_block = [], [], 0
        for n in lengths:
            used = -(-n // bs)
            tables.append(list(range(next_block, next_block + used)))
            slots.append(np.arange(next_block * bs, next_block * bs + n))
            next_block += used
        if next_block > self.num_blocks:
            raise ValueError(f"the worst-case step needs {next_block} KV blocks, {self.num_blocks} are bound")
        layout = BatchLayout(query_lens=lengths, context_lens=[0] * len(lengths), block_tables=tables,
                             slot_mapping=torch.from_numpy(np.concatenate(slots)).to(self.device),
                             num_decodes=0, block_size=bs)   # all prefills, even a 1-token tail
        tokens = sum(lengths)
        lengths_t = torch.tensor(lengths, device=self.device)
        metadata = self.backend.build_metadata(layout, self.device)
        if self.kv_cache_groups.num_groups > 1:   # a throwaway cache: every group may use the same blocks
            metadata = KVCacheGroupMetadata([metadata] * self.kv_cache_groups.num_groups)
        hidden = self.model(torch.zeros(tokens, dtype=torch.long, device=self.device),
                            torch.cat([torch.arange(n, device=self.device) for n in lengths]), metadata,
                            rotary_lengths=lengths_t.repeat_interleave(lengths_t))
        rows = min(max_num_seqs, tokens)
        logits = self.model.compute_logits(hidden[tokens - rows:])
        params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, logprobs=5)
        batch = SamplingBatch.build([SamplingRow(params, [], [], None, None)] * rows, self.vocab_size, self.device)
        return self.sampler(logits, batch).sampled_token_ids

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate shared blocks (every layer's K and V) before a sequence writes into its copy."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for buffer in self.kv_buffers:   # whole pages, as bytes: every layer's view of the block at once
            buffer[dst] = buffer[src]

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """Apply the step's changes to the input batch and run it. The driver (first tensor-parallel rank of
        the last pipeline stage) returns the sampled tokens; other ranks return None. If it raises, the
        caller hands the failure on with :meth:`fail_step`."""
        output = self._execute(sched)
        self._received = self._sent = False   # only a failed step leaves them set, for fail_step
        return output

    @torch.inference_mode()
    def _execute(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        self.input_batch.update(sched)
        self.copy_blocks(sched.block_copies)
        if sched.is_empty:
            return ModelRunnerOutput()
        step = self.input_batch.prepare(sched.num_scheduled_tokens, sched.num_steps - 1)
        if self.lora_manager is not None:
            self.lora_manager.set_active(step.lora_ids, step.query_lens, self.input_batch.lora_requests)
        if sched.num_steps > 1:   # (or, rows the loop's LM head does not take, a plain step: one token each)
            if self.multi_step is None:
                raise RuntimeError("a multi-step step came to a runner built for one step at a time")
            if self.multi_step.takes_steps(len(step.input_ids)):
                return run_multi_step(self.multi_step, self.input_batch, step, sched.num_steps)
        layout = BatchLayout(query_lens=step.query_lens, context_lens=step.context_lens,
                             block_tables=step.block_tables[0], slot_mapping=torch.from_numpy(step.slot_mapping[0]),
                             num_decodes=step.num_decodes, block_size=self.block_size)
        sample_rows, sample_seqs, prompt_rows = step.sample_rows, step.sample_seqs, step.prompt_rows
        pp = get_pp_group()
        with_lora = self.lora_manager is not None and self.lora_manager.active
        if (self.graphs is not None and not prompt_rows and not step.pool_rows and pp.world_size == 1
                and (not with_lora or self.graphs.lora is not None) and self.graphs.can_run(layout)):
            layouts = [layout, *(dataclasses.replace(layout, block_tables=tables, slot_mapping=torch.from_numpy(slots))
                                 for tables, slots in zip(step.block_tables[1:], step.slot_mapping[1:]))]
            hidden = self.graphs.run(layouts, step.input_ids, step.positions, step.rotary_lengths, with_lora)
        else:
            layout.slot_mapping = layout.slot_mapping.to(self.device)
            metadata = group_metadata(self.backend, layout, step.block_tables, step.slot_mapping, self.device)
            ids = torch.from_numpy(step.input_ids).to(self.device)
            pos = torch.from_numpy(step.positions).to(self.device)
            lengths = torch.from_numpy(step.rotary_lengths).to(self.device)
            received = None if pp.is_first_rank else self._receive(len(step.input_ids))
            for attn in self._calibrate_kv:
                attn.calibrate_kv_scales = True
            self._calibrate_kv = []
            hidden = self.forward(layout, metadata, ids, pos, lengths, received)
        # Parallel samples join every rank's batch (the scheduler sends them as deltas from now on).
        for i, seq in enumerate(list(sample_seqs)):
            for fork in sched.forks.get(seq.seq_id, ()):
                sample_rows.append(sample_rows[i])
                sample_seqs.append(self.input_batch.fork(seq, fork.seq_id, fork.sample_index))
        if not pp.is_last_rank:
            self._send_to_next_stage(hidden)
            return None
        # Every tensor-parallel rank computes the logits (the LM head gathers over them); the driver samples.
        driver = get_tp_group().is_first_rank
        out = ModelRunnerOutput()
        if sample_seqs:
            # The grammars' masks are filled on the CPU while a GPU still runs the forward pass.
            bitmask = (None if self.structured_output is None
                       else self.structured_output.fill_bitmask(sample_seqs))
            drafts = None
            if sched.scheduled_spec_decode_tokens:   # a row with drafts is sampled at each of them too
                drafts = [sched.scheduled_spec_decode_tokens.get(s.seq_id, []) for s in sample_seqs]
                sample_rows = rejection_sampler.logit_rows(sample_rows, drafts)
            logits = self.model.compute_logits(hidden[sample_rows])
            if driver:
                self._sample(logits, sample_seqs, out, bitmask, drafts)
        if self.drafter is not None:
            sampled, accepted = self.drafter.decisions_on_every_rank(sample_seqs, out)
            out.draft_token_ids = self.drafter.draft_after_step(self.input_batch, step, sample_seqs, sched, sampled,
                                                                accepted)
        for seq, flat, start, n in prompt_rows:
            entries = self._prompt_logprobs(hidden, seq, flat, start, n, driver)
            if driver:
                out.prompt_logprobs[seq.seq_id] = (start, entries)
        if step.pool_rows and driver:
            out.pooled = pooler.step_shares(hidden, step.pool_rows)
        return out if driver else None

    def forward(self, layout: BatchLayout, metadata: object, ids: torch.Tensor, pos: torch.Tensor,
                lengths: torch.Tensor, received: IntermediateTensors | None = None) -> torch.Tensor:
        """A step's hidden states: through the fused decode step where it takes the step, else the model's modules."""
        return run_step(self.model, self.fused_decode, layout, metadata, ids, pos, lengths, received)

    def fail_step(self, sched: SchedulerOutput) -> None:
        """This rank's step raised: make every other rank drop the step too rather than wait for this one.
        The rank's tensor-parallel peers see their collectives aborted; the next pipeline stage gets a failed
        status instead of hidden states, and whatever the previous stage sends is still received, so no rank
        is left blocked in a send or a receive."""
        get_tp_group().abort_step()
        pp = get_pp_group()
        try:
            if sched.is_empty or pp.world_size == 1:
                return
            if not pp.is_first_rank and not self._received:
                try:
                    self._receive(sched.total_num_scheduled_tokens)
                except CollectiveAbortedError:
                    pass
            if not pp.is_last_rank and not self._sent:
                self._send_to_next_stage(None)
        finally:
            self._received = self._sent = False

    def _send_to_next_stage(self, hidden: IntermediateTensors | None) -> None:
        """A status word, then (unless this stage failed: ``None``) the hidden states and residual."""
        pp = get_pp_group()
        self._sent = True
        pp.send(torch.tensor([_STAGE_FAILED if hidden is None else _STAGE_OK], device=self.device), pp.rank + 1)
        if hidden is not None:
            pp.send(hidden.hidden, pp.rank + 1)
            pp.send(hidden.residual, pp.rank + 1)

    def _receive(self, num_tokens: int) -> IntermediateTensors:
        """The previous pipeline stage's hidden states and residual for this step's tokens; raises
        :class:`CollectiveAbortedError` when that stage failed the step."""
        pp = get_pp_group()
        status = torch.empty(1, dtype=torch.long, device=self.device)
        pp.recv(status, pp.rank - 1)
        self._received = True
        if int(status.item()) != _STAGE_OK:
            raise CollectiveAbortedError("an earlier pipeline stage failed this step")
        hidden_size = self.model.config.hidden_size
        hidden = torch.empty(num_tokens, hidden_size, dtype=self.dtype, device=self.device)
        residual = torch.empty_like(hidden)
        pp.recv(hidden, pp.rank - 1)
        pp.recv(residual, pp.rank - 1)
        return IntermediateTensors(hidden, residual)

    def _sample(self, logits: torch.Tensor, seqs: list[CachedSequence], out: ModelRunnerOutput,
                bitmask: tuple[torch.Tensor, list[int]] | None, drafts: list[list[int]] | None) -> None:
        """Sample a token per row (``bitmask``: the grammar bitmask and the rows it constrains), and advance
        the constrained rows' matchers by it. With ``drafts`` (per row; constrained rows have none), every
        position of a row is sampled and the rejection sampler keeps the drafts the samples agree with."""
        token_bitmask, bitmask_rows = bitmask if bitmask is not None else (None, [])
        if drafts is None:
            rows = [SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, s.seeded_generator(),
                                s.eos_token_id) for s in seqs]
        else:
            rows = rejection_sampler.sampling_rows(seqs, drafts, self.device)
            if token_bitmask is not None:   # row i's mask moves to its (only) position
                last = rejection_sampler.last_positions(drafts)
                spread = token_bitmask.new_full((len(rows), token_bitmask.shape[1]), -1)
                spread[last] = token_bitmask[:len(seqs)]
                token_bitmask, bitmask_rows = spread, [last[i] for i in bitmask_rows]
        result = self.sampler(logits, SamplingBatch.build(rows, self.vocab_size, self.device, token_bitmask,
                                                          bitmask_rows))
        tokens = result.sampled_token_ids.tolist()
        if drafts is None:
            emitted = [[i] for i in range(len(seqs))]
        else:
            accepted = rejection_sampler.num_accepted(tokens, drafts).tolist()
            emitted = rejection_sampler.emitted_positions(drafts, accepted)
            for seq, row_drafts, count in zip(seqs, drafts, accepted):
                if row_drafts:
                    out.num_accepted_drafts[seq.seq_id] = count
        if bitmask is not None:
            assert self.structured_output is not None
            self.structured_output.accept(seqs, [tokens[p[-1]] for p in emitted])
        wants_logprobs = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wants_logprobs:
            chosen = result.sampled_token_ids[:, None]
            ranks = ((logits > logits.gather(1, chosen)).sum(1) + 1).tolist()
            assert result.sampled_logprobs is not None   # computed whenever a row asks
            sampled_lp = result.sampled_logprobs.tolist()
            top_ids = result.topk_token_ids.tolist() if result.topk_token_ids is not None else None
            top_lp = result.topk_logprobs.tolist() if result.topk_logprobs is not None else None
            for i in wants_logprobs:
                k = seqs[i].params.logprobs
                entries = [TokenLogprobs(tokens[p], sampled_lp[p], ranks[p], top_ids[p][:k] if k and top_ids else [],
                                         top_lp[p][:k] if k and top_lp else []) for p in emitted[i]]
                out.logprobs[seqs[i].seq_id] = entries[-1]
                if len(entries) > 1:
                    out.draft_logprobs[seqs[i].seq_id] = entries[:-1]
        for seq, positions in zip(seqs, emitted):
            out.sampled[seq.seq_id] = tokens[positions[-1]]

    def _prompt_logprobs(self, hidden: torch.Tensor, seq: CachedSequence, flat: int, start: int, n: int,
                         driver: bool) -> list[TokenLogprobs]:
        """Logprob of each prompt token given the ones before it, for the prompt positions in this chunk."""
        stop = min(start + n, seq.num_prompt_tokens - 1)   # position p predicts prompt token p + 1
        count = stop - start
        logits = self.model.compute_logits(hidden[flat:flat + count])
        if not driver:
            return []
        logprobs = compute_logprobs(logits)
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
