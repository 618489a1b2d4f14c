"""Gemma 4 (text): ``Gemma4ForCausalLM`` and the language model of ``Gemma4ForConditionalGeneration``, as
transformers' ``modeling_gemma4`` computes them.

- Embedding scaled by ``sqrt(hidden_size)`` in its dtype, GeGLU MLP, four norms per layer (pre and post
  attention and MLP), tied embeddings, final logits soft-capped by ``final_logit_softcapping`` (Gemma 2's
  blocks and head). The norms scale by ``w``, not Gemma 2/3's ``1 + w``.
- Sliding (``sliding_window``) and full layers from ``layer_types`` (the last layer is always full). Full
  layers have their own head size and, with ``attention_k_eq_v``, their own KV-head count
  (``per_layer_config``), and there the values are the keys' projection (no ``v_proj``).
- Per-head norms on queries and keys (scaled) and values (unscaled), attention scale 1 (the norms set it).
- Rotary per layer type (``rope_parameters``): sliding layers the usual rope, full layers "proportional"
  rope (:mod:`~llmserve.layers.proportional_rotary`).
- Per-layer inputs (``hidden_size_per_layer_input``): a second embedding holds a small vector per token and
  layer; mixed with a projection of the embedded tokens, it is gated into each layer's residual stream.
- Each layer's output is multiplied by its ``layer_scalar``.
- KV sharing: the last ``num_kv_shared_layers`` layers compute no K/V; each attends over the K/V of the last
  earlier layer of its type (:class:`~llmserve.layers.attention.shared_kv.SharedKVAttention`), and holds
  no KV cache. With ``use_double_wide_mlp`` their MLPs are twice as wide.
- The MoE block (``enable_moe_block``): routed experts beside each layer's dense MLP
  (:mod:`~llmserve.models.gemma4_moe`), the two outputs normed apart and summed.

Refused at load: bidirectional attention over all tokens, and pipeline parallelism (a later stage would need the
per-layer inputs and the shared K/V of earlier stages).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from llmserve.distributed.parallel_state import get_pp_group, get_tp_group
from llmserve.layers.activation import Activation
from llmserve.layers.attention.layer import Attention
from llmserve.layers.attention.shared_kv import SharedKVAttention
from llmserve.layers.embedding import VocabParallelEmbedding
from llmserve.layers.fused_moe import expert_checkpoint_target
from llmserve.layers.layernorm import Gemma4RMSNorm, UnscaledRMSNorm
from llmserve.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    qkv_head_partition,
)
from llmserve.layers.longrope import rotary_embedding
from llmserve.layers.proportional_rotary import ProportionalRotaryEmbedding
from llmserve.layers.rotary import RotaryEmbedding, rope_parameters
from llmserve.models.gemma2 import Gemma2ForCausalLM
from llmserve.models.gemma3 import language_model_tensor
from llmserve.models.gemma4_moe import Gemma4Router, check_moe_config, gemma4_experts, moe_routing
from llmserve.models.interface import IntermediateTensors
from llmserve.models.llama import (
    LlamaBlockSpec,
    LlamaMLP,
    UnsupportedModelConfigError,
    hidden_act_of,
    layer_index,
    sliding_window_of,
)
from llmserve.quantization.base import QuantizationConfig

KV = tuple[torch.Tensor, torch.Tensor]


def first_shared_layer(config: Any) -> int:
    """Index of the first layer that reuses an earlier layer's K/V (``num_hidden_layers`` when none do)."""
    return config.num_hidden_layers - (getattr(config, "num_kv_shared_layers", 0) or 0)


def kv_source_layer(config: Any, layer: int) -> int | None:
    """The layer whose K/V ``layer`` reuses: the last layer of its type before the shared ones (None: its own)."""
    first = first_shared_layer(config)
    if layer < first:
        return None
    kind = config.layer_types[layer]
    sources = [i for i in range(first) if config.layer_types[i] == kind]
    if not sources:
        raise UnsupportedModelConfigError(f"Gemma 4: layer {layer} ({kind}) shares K/V, but no earlier layer of "
                                          f"that type computes any")
    return sources[-1]


def make_rotary(config: Any, layer_type: str, head_dim: int) -> RotaryEmbedding:
    """Proportional rope where the layer type's ``rope_type`` says so (Gemma 4's full layers), else the usual."""
    theta, params = rope_parameters(config, layer_type)
    if params.get("rope_type") == "proportional":
        return ProportionalRotaryEmbedding(head_dim, config.max_position_embeddings, theta,
                                           float(params.get("partial_rotary_factor", 1.0)),
                                           float(params.get("factor", 1.0)))
    return rotary_embedding(config, head_dim, head_dim, layer_type)


class Gemma4Attention(nn.Module):
    """Projections, per-head norms and rotary of one layer; a layer sharing K/V projects queries only."""

    def __init__(self, config: Any, rotary_emb: RotaryEmbedding, source: Attention | None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        layer = layer_index(prefix)
        layer_config = config.per_layer_config[layer]
        self.head_dim = head_dim = layer_config.head_dim
        total_heads, total_kv_heads = config.num_attention_heads, layer_config.num_key_value_heads
        bias, eps = bool(config.attention_bias), config.rms_norm_eps
        self.num_heads, self.num_kv_heads, _ = qkv_head_partition(total_heads, total_kv_heads,
                                                                  get_tp_group().world_size)
        self.q_norm = Gemma4RMSNorm(head_dim, eps)
        if source is None:
            self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, total_heads, total_kv_heads, bias,
                                              quant_config, f"{prefix}.qkv_proj")
            self.k_norm = Gemma4RMSNorm(head_dim, eps)
            self.v_norm = UnscaledRMSNorm(eps)
        else:
            self.q_proj = ColumnParallelLinear(config.hidden_size, total_heads * head_dim, bias,
                                               quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.o_proj = RowParallelLinear(total_heads * head_dim, config.hidden_size, bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = rotary_emb
        window = sliding_window_of(config, layer)
        if source is None:
            self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, 1.0, sliding_window=window)
        else:
            if (source.head_dim, source.num_kv_heads, source.spec.sliding_window) != (head_dim, self.num_kv_heads,
                                                                                      window):
                raise UnsupportedModelConfigError(
                    f"Gemma 4: layer {layer} shares the K/V of a layer with another head size, KV-head count or "
                    f"window")
            self.attn = SharedKVAttention(source, self.num_heads, 1.0)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: object, shared_kv: KV | None,
                rotary_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """The attention output and the K/V it attended over (its own, or ``shared_kv``)."""
        t = hidden.shape[0]
        if shared_kv is None:
            qkv = self.qkv_proj
            q, k, v = qkv(hidden).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
            q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))
            q, k = self.rotary_emb(positions, q, k, rotary_lengths)
            kv = (k.reshape(t, -1), self.v_norm(v.reshape(t, self.num_kv_heads, self.head_dim)).reshape(t, -1))
        else:
            q = self.q_norm(self.q_proj(hidden).reshape(t, self.num_heads, self.head_dim))
            q, _ = self.rotary_emb(positions, q, q[:, :0], rotary_lengths)   # queries only: keys are the source's
            kv = shared_kv
        return self.o_proj(self.attn(q.reshape(t, -1), kv[0], kv[1], attn_metadata)), kv


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, config: Any, spec: LlamaBlockSpec, rotary_emb: RotaryEmbedding, source: Attention | None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4Attention(config, rotary_emb, source, quant_config, f"{prefix}.self_attn")
        if source is not None and getattr(config, "use_double_wide_mlp", False):
            spec = dataclasses.replace(spec, mlp_size=2 * config.intermediate_size)
        self.mlp = LlamaMLP(config, spec, quant_config, f"{prefix}.mlp")
        self.input_layernorm = Gemma4RMSNorm(h, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(h, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(h, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(h, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        self.experts = None
        if getattr(config, "enable_moe_block", False):
            self.router = Gemma4Router(h, moe_routing(config), eps)
            self.experts = gemma4_experts(config, spec.activation, quant_config, prefix)
            self.pre_feedforward_layernorm_2 = Gemma4RMSNorm(h, eps)
            self.post_feedforward_layernorm_1 = Gemma4RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = Gemma4RMSNorm(h, eps)
        self.per_layer_size = getattr(config, "hidden_size_per_layer_input", 0) or 0
        if self.per_layer_size:
            self.act_fn = Activation(spec.activation)
            self.per_layer_input_gate = ReplicatedLinear(h, self.per_layer_size,
                                                         prefix=f"{prefix}.per_layer_input_gate")
            self.per_layer_projection = ReplicatedLinear(self.per_layer_size, h,
                                                         prefix=f"{prefix}.per_layer_projection")
            self.post_per_layer_input_norm = Gemma4RMSNorm(h, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, per_layer_input: torch.Tensor | None,
                attn_metadata: object, shared_kv: KV | None,
                rotary_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        attn, kv = self.self_attn(positions, self.input_layernorm(hidden), attn_metadata, shared_kv, rotary_lengths)
        hidden = hidden + self.post_attention_layernorm(attn)
        hidden = hidden + self.post_feedforward_layernorm(self.feed_forward(hidden))
        if per_layer_input is not None:
            gated = self.act_fn(self.per_layer_input_gate(hidden)) * per_layer_input
            hidden = hidden + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return hidden * self.layer_scalar, kv

    def feed_forward(self, residual: torch.Tensor) -> torch.Tensor:
        """The MLP's output; with the MoE block, plus the experts', each through its own post-norm (the router
        and the experts read the residual, not the MLP's input)."""
        out = self.mlp(self.pre_feedforward_layernorm(residual))
        if self.experts is None:
            return out
        experts = self.experts(self.pre_feedforward_layernorm_2(residual), *self.router(residual))
        return self.post_feedforward_layernorm_1(out) + self.post_feedforward_layernorm_2(experts)


class Gemma4Model(nn.Module):
    """Embeddings (the token's and, with per-layer inputs, its per-layer vectors), the layers, the final norm.

    The layers are built in order, so a layer that shares K/V is given its source layer's attention. Layers of
    one type and head size share one rotary table (a full-length table per layer would take gigabytes at
    Gemma 4's context length). One pipeline stage holds them all (:meth:`Gemma4ForCausalLM.check_config`
    refuses more)."""

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "model") -> None:
        super().__init__()
        self.is_first_stage = self.is_last_stage = True
        self.start_layer, self.end_layer = 0, config.num_hidden_layers
        self.hidden_size = h = config.hidden_size
        eps = config.rms_norm_eps
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h, prefix=f"{prefix}.embed_tokens")
        layers: list[Gemma4DecoderLayer] = []
        rotary: dict[tuple[str, int], RotaryEmbedding] = {}
        for i in range(config.num_hidden_layers):
            kind = (config.layer_types[i], config.per_layer_config[i].head_dim)
            if kind not in rotary:
                rotary[kind] = make_rotary(config, *kind)
            source = kv_source_layer(config, i)
            layers.append(Gemma4DecoderLayer(config, spec, rotary[kind],
                                             None if source is None else layers[source].self_attn.attn,
                                             quant_config, f"{prefix}.layers.{i}"))
        self.layers = nn.ModuleList(layers)
        self.layer_types = list(config.layer_types)
        self.first_shared_layer = first_shared_layer(config)
        self.norm = Gemma4RMSNorm(h, eps)
        # transformers scales the embeddings by constants rounded to their dtype (sqrt(3072) is 55.5 in bf16).
        dtype = torch.get_default_dtype()   # the model's dtype while the loader builds it
        self.embed_scale = float(torch.tensor(h ** 0.5).to(dtype))
        self.per_layer_size = getattr(config, "hidden_size_per_layer_input", 0) or 0
        if self.per_layer_size:
            n, p = config.num_hidden_layers, self.per_layer_size
            self.embed_tokens_per_layer = VocabParallelEmbedding(config.vocab_size_per_layer_input, n * p,
                                                                 prefix=f"{prefix}.embed_tokens_per_layer")
            self.per_layer_embed_scale = float(torch.tensor(p ** 0.5).to(dtype))
            self.per_layer_model_projection = ReplicatedLinear(h, n * p,
                                                               prefix=f"{prefix}.per_layer_model_projection")
            self.per_layer_projection_norm = Gemma4RMSNorm(p, eps)

    def per_layer_inputs(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """[T, layers, per-layer size]: the tokens' per-layer embeddings averaged with a normed projection of
        their embeddings (each scaled by 1/sqrt(2), as transformers sums them)."""
        t, n, p = input_ids.shape[0], len(self.layers), self.per_layer_size
        by_token = self.embed_tokens_per_layer(input_ids).view(t, n, p) * self.per_layer_embed_scale
        projected = self.per_layer_model_projection(embeds) * self.hidden_size ** -0.5
        projected = self.per_layer_projection_norm(projected.view(t, n, p))
        return (projected + by_token) * 2.0 ** -0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: object,
                intermediate_tensors: IntermediateTensors | None = None,
                rotary_lengths: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.embed_scale
        per_layer = self.per_layer_inputs(input_ids, hidden) if self.per_layer_size else None
        kv_by_type: dict[str, KV] = {}   # the last K/V computed by a layer of each type
        for i, layer in enumerate(self.layers):
            kind = self.layer_types[i]
            shared = kv_by_type[kind] if i >= self.first_shared_layer else None
            hidden, kv = layer(positions, hidden, None if per_layer is None else per_layer[:, i], attn_metadata,
                               shared, rotary_lengths)
            kv_by_type[kind] = kv
        return self.norm(hidden)


class Gemma4ForCausalLM(Gemma2ForCausalLM):
    model_cls = Gemma4Model
    # The K/V weights transformers drops for layers that share K/V (released checkpoints may still hold them).
    shared_layer_tensors = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm.")

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        """Only the MLP's choices: the attention and norms are Gemma 4's own modules."""
        return LlamaBlockSpec(activation=hidden_act_of(config))

    @classmethod
    def check_config(cls, config: Any) -> None:
        if getattr(config, "enable_moe_block", False):
            check_moe_config(config, cls.__name__)
        if getattr(config, "use_bidirectional_attention", None) == "all":
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: use_bidirectional_attention='all' (an encoder-style Gemma) is not supported; "
                f"llmserve runs causal decoders only")
        if get_pp_group().world_size > 1:
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: pipeline parallelism is not supported for Gemma 4 (its per-layer inputs and shared "
                f"K/V would have to cross stages); use tensor parallelism")

    def attention_layers(self) -> list[Attention]:
        """The layers that hold a KV cache (not those that share another layer's)."""
        return [layer.self_attn.attn for layer in self.model.layers
                if not isinstance(layer.self_attn.attn, SharedKVAttention)]

    def param_target(self, name: str, params: Mapping[str, nn.Parameter]) -> tuple[str, object]:
        """The MoE block's stacked ``experts.gate_up_proj`` / ``experts.down_proj`` load into the fused experts."""
        expert = expert_checkpoint_target(name)
        if expert is not None and expert[0] in params:
            return expert
        return super().param_target(name, params)

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """A layer sharing K/V keeps only its queries: its K/V weights are dropped, and of a fused ``qkv_proj``
        (llama.cpp's ``--fuse-qkv`` fuses every layer that holds all three) the query rows are its ``q_proj``
        (the leaf may be a packed format's, ``qweight`` rows too)."""
        parts = name.split(".")
        if len(parts) <= 3 or parts[:2] != ["model", "layers"] or int(parts[2]) < self.model.first_shared_layer:
            return name, tensor
        rest = ".".join(parts[3:])
        if rest.startswith(self.shared_layer_tensors):
            return None
        if rest.startswith("self_attn.qkv_proj."):
            queries = self.config.num_attention_heads * self.config.per_layer_config[int(parts[2])].head_dim
            return name.replace(".self_attn.qkv_proj.", ".self_attn.q_proj."), tensor[:queries]
        return name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._values_from_keys(weights))

    def _values_from_keys(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """With ``attention_k_eq_v`` the full layers have no ``v_proj``: their values are the keys' projection,
        loaded into the fused projection's value rows too (one more matmul slice, the fused layer kept)."""
        k_eq_v = bool(getattr(self.config, "attention_k_eq_v", False))
        for name, tensor in weights:
            yield name, tensor
            if k_eq_v and ".self_attn.k_proj." in name:
                mapped = self.checkpoint_tensor(name, tensor)
                if mapped is not None and self.config.layer_types[layer_index(mapped[0])] == "full_attention":
                    yield name.replace(".self_attn.k_proj.", ".self_attn.v_proj."), tensor


class Gemma4ForConditionalGeneration(Gemma4ForCausalLM):
    """The language model of a multimodal Gemma 4 checkpoint (text in, text out)."""

    skipped_prefixes = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        mapped = language_model_tensor(name, tensor, self.skipped_prefixes)
        return None if mapped is None else super().checkpoint_tensor(*mapped)
