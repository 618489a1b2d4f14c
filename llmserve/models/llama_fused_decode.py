"""The CPU decode step of a Llama-shaped model in one call into C (:mod:`llmserve.layers.cpu_decode_layers`).

A batch-1 decode step of a small model on CPU is bound by the fixed cost of a few hundred operator calls from
Python, not by the weights it streams. Where the model is one the C step reproduces exactly (Llama, Mistral,
Qwen2 with its q/k/v bias, Qwen3 with its per-head q/k norms: RMSNorm, gated SiLU MLP, neox rotary over the whole
head, full attention at the default KV-cache dtype, float32 / bfloat16 / GGUF group-int8 weights, one rank) and a
step is all decode rows (or rows that verify a few speculated tokens: each token a decode row of its own), the
model runner runs the step's decoder layers here; anything else takes the module path,
which gives the same hidden states. Steps with LoRA adapter rows run here too where every adapted projection runs
the compiled CPU LoRA kernel (:mod:`llmserve.lora.cpu_ops`): the C step calls it after each projection with the
module path's operands. :func:`fused_decode_for` decides once per model and
says why not; :meth:`FusedDecode.forward` decides per step.

Where the token embedding and the LM head are ones the C code reads too (the model's own ``compute_logits``; a head
stored blocked or as GGUF group-int8, or tied to the embedding, which the module path multiplies row-major with a
compiled kernel for up to a few rows and oneDNN above), :meth:`FusedDecode.decode_steps` runs several decode
steps in one call, each step's argmax (or a draw under the row's sampling) fed back as the next step's token: the
multi-step decoding of
``--num-scheduler-steps`` (:mod:`llmserve.worker.multi_step`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from llmserve.distributed.parallel_state import get_pp_group, get_tp_group
from llmserve.layers.activation import SiluAndMul
from llmserve.layers.attention.backend import BatchLayout
from llmserve.layers.attention.cpu_backend import CPUAttentionBackend
from llmserve.layers.attention.layer import Attention
from llmserve.layers.attention.torch_metadata import TorchAttentionMetadata
from llmserve.layers.cpu_decode_layers import (DecodeLayersKernel, DecoderLayerWeights, FusedDecodeUnsupported,
                                               LoRAStepArgs, SampleParams, attach_lora, linear_descriptor,
                                               row_major_descriptor)
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmserve.layers.layernorm import RMSNorm
from llmserve.layers.rotary import RotaryEmbedding
from llmserve.lora.layers import LoRABatchState, LoRALinearMethod
from llmserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from llmserve.quantization.unquantized import ROW_MAJOR_BF16_MAX_ROWS

logger = logging.getLogger(__name__)

# Tokens a row that is not a decode may bring to a step run here (each token costs a decode row that reads the
# row's whole context again; a speculating sequence brings 1 + k): longer chunks take the module path.
MAX_ROW_TOKENS = 16


def _norm_weight(norm: nn.Module | None, eps: float, what: str) -> torch.Tensor:
    """A plain RMSNorm's weight in float32 (what the kernel multiplies by, as :class:`RMSNorm` passes it)."""
    if type(norm) is not RMSNorm:
        raise FusedDecodeUnsupported(f"{what} is {type(norm).__name__}, not RMSNorm")
    if norm.eps != eps:
        raise FusedDecodeUnsupported(f"{what} has eps {norm.eps}, the first norm {eps}")
    return norm.weight.detach().float().contiguous()


def _check_attention(attn: nn.Module, i: int) -> None:
    if type(attn) is not LlamaAttention:
        raise FusedDecodeUnsupported(f"layer {i}'s attention is {type(attn).__name__}")
    rotary = attn.rotary_emb
    if type(rotary) is not RotaryEmbedding or rotary.interleaved or rotary.rotary_dim != attn.head_dim \
            or rotary.cos_cache.dtype != torch.float32:
        raise FusedDecodeUnsupported(f"layer {i}'s rotary embedding is not neox-style over the whole head "
                                     f"({type(rotary).__name__})")
    layer = attn.attn
    spec = layer.spec
    if type(layer) is not Attention or spec.sliding_window is not None or spec.logits_soft_cap is not None \
            or spec.alibi_slopes is not None or spec.kv_format is not None:
        raise FusedDecodeUnsupported(f"layer {i}'s attention has a sliding window, soft-cap, ALiBi or a quantised "
                                     f"KV cache")


def _layer_weights(layer: nn.Module, i: int, dtype: torch.dtype, eps: float,
                   keep: list[torch.Tensor]) -> DecoderLayerWeights:
    if type(layer) is not LlamaDecoderLayer:
        raise FusedDecodeUnsupported(f"layer {i} is {type(layer).__name__}")
    attn, mlp = layer.self_attn, layer.mlp
    _check_attention(attn, i)
    if type(mlp) is not LlamaMLP or not mlp.gated or type(mlp.act_fn) is not SiluAndMul:
        raise FusedDecodeUnsupported(f"layer {i}'s MLP is not a gated SiLU MLP")
    q_norm = k_norm = None
    if attn.q_norm is not None:
        q_norm, k_norm = _norm_weight(attn.q_norm, eps, "q_norm"), _norm_weight(attn.k_norm, eps, "k_norm")
    return DecoderLayerWeights(
        _norm_weight(layer.input_layernorm, eps, "input_layernorm"),
        _norm_weight(layer.post_attention_layernorm, eps, "post_attention_layernorm"), q_norm, k_norm,
        *(linear_descriptor(p, dtype, keep) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)),
        attn.attn.scale)


class FusedDecode:
    """A model's decoder layers as one C call per all-decode step (built by :func:`fused_decode_for`)."""

    def __init__(self, model: LlamaModel, dtype: torch.dtype, causal_lm: nn.Module | None = None) -> None:
        """``causal_lm``: the model ``model`` is the decoder of, whose LM head :meth:`decode_steps` runs (None: no
        multi-step decoding)."""
        kernels = cpu_kernels()
        if kernels is None:
            raise FusedDecodeUnsupported("the CPU kernels are not available")
        if dtype not in (torch.float32, torch.bfloat16):
            raise FusedDecodeUnsupported(f"activations in {dtype} (float32 or bfloat16 only)")
        if not isinstance(model, LlamaModel) or type(model).forward is not LlamaModel.forward:
            raise FusedDecodeUnsupported(f"{type(model).__name__} is not a Llama-shaped decoder")
        if model.norm is None or model.embed_tokens is None:
            raise FusedDecodeUnsupported("the model is split over pipeline stages")
        layers = model.stage_layers()
        eps = model.norm.eps
        keep: list[torch.Tensor] = []
        weights = [_layer_weights(layer, i, dtype, eps, keep) for i, layer in enumerate(layers)]
        first = layers[0].self_attn
        if any(layer.self_attn.rotary_emb.cos_cache is not first.rotary_emb.cos_cache
               and not torch.equal(layer.self_attn.rotary_emb.cos_cache, first.rotary_emb.cos_cache)
               for layer in layers):
            raise FusedDecodeUnsupported("the layers rotate by different tables")
        self._lora: LoRABatchState | None = None
        self._lora_width = 0
        self._lora_here = self._attach_lora(layers, weights)
        self.model = model
        self.attention = [layer.self_attn.attn for layer in layers]
        rotary = first.rotary_emb
        self.kernel = DecodeLayersKernel(
            kernels, weights, _norm_weight(model.norm, eps, "the final norm"), hidden=model.norm.weight.numel(),
            num_heads=first.num_heads, num_kv_heads=first.num_kv_heads, head_dim=first.head_dim,
            intermediate=layers[0].mlp.down_proj.input_size_per_partition, eps=eps, dtype=dtype,
            cos=rotary.cos_cache.contiguous(), sin=rotary.sin_cache.contiguous(), keep=keep)
        self._bound: list[torch.Tensor] = []
        self.calls = 0   # steps run here (the tests count them)
        # why decode_steps cannot run (None: it can), and the most rows it takes (None: any number)
        self.steps_unsupported: str | None = "no LM head given"
        self.steps_max_rows: int | None = None
        if causal_lm is not None:
            try:
                self._attach_ends(causal_lm, dtype)
                self.steps_unsupported = None
            except FusedDecodeUnsupported as exc:
                self.steps_unsupported = str(exc)

    def _attach_ends(self, causal_lm: nn.Module, dtype: torch.dtype) -> None:
        """The embedding and LM head for :meth:`decode_steps`, if the C loop computes what the modules do."""
        model, head = self.model, getattr(causal_lm, "lm_head", None)
        if type(causal_lm).compute_logits is not LlamaForCausalLM.compute_logits:
            raise FusedDecodeUnsupported(f"{type(causal_lm).__name__} computes its logits its own way")
        if type(model).embed is not LlamaModel.embed or type(model.embed_tokens) is not VocabParallelEmbedding:
            raise FusedDecodeUnsupported(f"{type(model).__name__} embeds its tokens its own way")
        if type(head) is not ParallelLMHead:
            raise FusedDecodeUnsupported(f"the LM head is {type(head).__name__}")
        keep: list[torch.Tensor] = []
        embedding = model.embed_tokens.weight.detach()
        if head.tied:   # the module path runs it row-major for a few rows (apply_linear), oneDNN above
            descriptor = row_major_descriptor(head.weight.detach(), dtype)
            self.steps_max_rows = (cpu_kernels().max_linear_rows if dtype == torch.float32
                                   else ROW_MAJOR_BF16_MAX_ROWS)
        else:
            descriptor = linear_descriptor(head, dtype, keep)
        self.kernel.attach_ends(embedding, descriptor, keep)

    def _attach_lora(self, layers: list[nn.Module], weights: list[DecoderLayerWeights]) -> bool:
        """Attaches each LoRA-wrapped projection's slots to its descriptor; whether steps with adapter rows run
        here (False, logged once, when an adapted projection does not run the compiled CPU LoRA kernel)."""
        methods = [(desc, linear.quant_method) for layer, w in zip(layers, weights)
                   for linear, desc in zip((layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                            layer.mlp.down_proj), (w.qkv, w.o, w.gate_up, w.down))
                   if isinstance(linear.quant_method, LoRALinearMethod)]
        if not methods:
            return True
        states = {id(m.state): m.state for _, m in methods}
        self._lora = next(iter(states.values()))
        why = None
        if len(states) > 1:
            why = "the layers keep separate adapter states"
        elif any(m.cpu_kernel is None or m.use_triton for _, m in methods):
            why = "an adapter stack the compiled CPU LoRA kernel does not take (float16, or no kernel library)"
        if why is not None:
            logger.info("Fused CPU decode step: steps with LoRA adapter rows take the module path (%s)", why)
            return False
        for desc, method in methods:
            kernel = method.cpu_kernel
            attach_lora(desc, kernel.slot_args, kernel.in_features, kernel.w_bf16)
            self._lora_width = max(self._lora_width, kernel.width)
        return True

    def _lora_step(self) -> LoRAStepArgs | None:
        """This step's adapter rows for the C step (the segment table and scratch the module path's LoRA method
        would use), None without any."""
        if self._lora is None or not self._lora.mapping.segments:
            return None
        step = self._lora.mapping.cpu_step()
        shrunk = step.shrunk(self._lora_width)   # kept by the step for the call
        rows, table, count = step.segment_args
        return LoRAStepArgs(rows, table, count, shrunk.data_ptr(), shrunk.shape[1])

    def accepts(self, layout: BatchLayout, metadata: object) -> bool:
        """Whether this step runs here: every row decodes one token or continues its cached context by at most
        :data:`MAX_ROW_TOKENS` (a running sequence verifying its speculated tokens), one KV-cache group read by
        the compiled decode attention, and no LoRA adapter row unless the adapters run here
        (:meth:`_attach_lora`)."""
        return (len(layout.query_lens) > 0 and isinstance(metadata, TorchAttentionMetadata)
                and isinstance(metadata.backend, CPUAttentionBackend)
                and (layout.num_decodes == len(layout.query_lens)
                     or all(q == 1 or 0 < c and q <= MAX_ROW_TOKENS
                            for q, c in zip(layout.query_lens, layout.context_lens)))
                and (self._lora_here or not self._lora.mapping.segments))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: TorchAttentionMetadata) -> torch.Tensor:
        """The final norm's output for an all-decode step (:meth:`accepts`), as the module path computes it."""
        block_tables, seq_lens = token_rows(metadata.layout)
        return self.decode_tokens(input_ids, positions, metadata.slot_mapping.to(torch.int64), block_tables, seq_lens)

    def decode_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """The final norm's output for tokens given as decode rows of one KV-cache group (int64 ``slots``, int32
        ``block_tables`` [tokens, width] and ``seq_lens``: token i attends to its sequence's first
        ``seq_lens[i]`` positions), with no attention metadata to build: every token's K/V is written before
        any attends, so several tokens of one sequence each get exactly their causal attention."""
        self._bind()
        hidden = self.model.embed(input_ids, positions).contiguous()
        self.calls += 1
        return self.kernel.forward(hidden, positions.contiguous(), slots, block_tables, seq_lens, self._lora_step())

    def decode_steps(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                     steps: int, stops: list[list[int]] | None = None, sampling: list[SampleParams] | None = None,
                     seed: int = 0) -> torch.Tensor:
        """Up to ``steps`` decode steps of rows that each decode one token (int64 ``input_ids`` and ``positions``
        [rows], int32 ``block_tables`` [rows, width] covering the positions the steps reach): the tokens int64
        [steps run, rows] that as many one-step decodes would give, each fed back: a greedy row's argmax, a row
        with ``sampling`` (per row; None: all greedy) a draw from the sampler's distribution (a generator seeded
        with ``seed``); they end after the first step in which a row samples one of its ``stops`` (per row)."""
        if self.steps_unsupported is not None:
            raise FusedDecodeUnsupported(self.steps_unsupported)
        if not self.takes_steps(input_ids.shape[0]):
            raise FusedDecodeUnsupported(f"{input_ids.shape[0]} rows: the LM head runs at most {self.steps_max_rows} "
                                         f"here")
        self._bind()
        tokens = self.kernel.steps(input_ids, positions, block_tables, steps, stops, sampling, seed, self._lora_step())
        self.calls += tokens.shape[0]
        return tokens

    def takes_steps(self, rows: int) -> bool:
        """Whether :meth:`decode_steps` runs ``rows`` rows (a tied LM head: as many as the module path runs through
        the same kernel)."""
        return self.steps_unsupported is None and (self.steps_max_rows is None or rows <= self.steps_max_rows)

    def _bind(self) -> None:
        """Hands the kernel the layers' current KV caches (again after the pool was rebound)."""
        caches = [a.key_cache for a in self.attention]
        if len(self._bound) != len(caches) or any(c is not b for c, b in zip(caches, self._bound)):
            self.kernel.bind_caches([(a.key_cache, a.value_cache) for a in self.attention])
            self._bound = caches


def token_rows(layout: BatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block tables, sequence lengths)`` with one decode row per token of the step: token j of a row with
    context c attends to the first c + j + 1 positions of its sequence. The C step writes every token's K/V
    before any row attends, so these rows give each token exactly its causal attention."""
    if layout.num_decodes == len(layout.query_lens):   # a row a token already
        tables = np.ascontiguousarray(layout.block_tables)
        return torch.from_numpy(tables), torch.from_numpy(np.asarray(layout.context_lens, dtype=np.int32) + 1)
    query = np.asarray(layout.query_lens)
    starts = np.repeat(np.cumsum(query) - query, query)
    seq_lens = (np.repeat(np.asarray(layout.context_lens), query) + np.arange(int(query.sum())) - starts + 1)
    width = int(-(-seq_lens.max() // layout.block_size))
    tables = np.ascontiguousarray(np.repeat(layout.block_tables[:, :width], query, axis=0))
    return torch.from_numpy(tables), torch.from_numpy(seq_lens.astype(np.int32))


def run_step(model: nn.Module, fused: FusedDecode | None, layout: BatchLayout, metadata: object,
             input_ids: torch.Tensor, positions: torch.Tensor, rotary_lengths: torch.Tensor,
             intermediate_tensors: object = None) -> torch.Tensor:
    """A step's hidden states: through ``fused`` (the model's fused decode step, or None) where it takes the step,
    else through the model's modules."""
    if fused is not None and fused.accepts(layout, metadata):
        return fused.forward(input_ids, positions, metadata)
    return model(input_ids, positions, metadata, intermediate_tensors=intermediate_tensors,
                 rotary_lengths=rotary_lengths)


def fused_decode_for(model: nn.Module, backend: object, dtype: torch.dtype, device: torch.device) -> FusedDecode | None:
    """The fused decode step for ``model`` (a causal LM whose decoder is ``model.model``), or None; logs which,
    and why not, once."""
    fused = fused_decode_or_reason(model, backend, dtype, device)
    return None if isinstance(fused, str) else fused


def fused_decode_or_reason(model: nn.Module, backend: object, dtype: torch.dtype,
                           device: torch.device) -> FusedDecode | str:
    """:func:`fused_decode_for`, with why not in place of None."""
    try:
        if device.type != "cpu":
            raise FusedDecodeUnsupported(f"the model runs on {device.type}")
        if get_tp_group().world_size > 1 or get_pp_group().world_size > 1:
            raise FusedDecodeUnsupported("tensor or pipeline parallelism")
        if not isinstance(backend, CPUAttentionBackend):
            raise FusedDecodeUnsupported(f"the {getattr(backend, 'name', type(backend).__name__)} attention backend")
        if not isinstance(model, LlamaForCausalLM) or type(model).forward is not LlamaForCausalLM.forward:
            raise FusedDecodeUnsupported(f"{type(model).__name__} is not a Llama-shaped causal LM")
        fused = FusedDecode(model.model, dtype, model)
    except FusedDecodeUnsupported as exc:
        logger.info("Fused CPU decode step: off (%s)", exc)
        return str(exc)
    logger.info("Fused CPU decode step: on (%d layers, one C call per all-decode step)", len(fused.attention))
    return fused
