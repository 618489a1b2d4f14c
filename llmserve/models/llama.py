"""Llama decoder blocks, shared by the Llama-shaped families (``mistral.py``, ``qwen2.py``, ``qwen3.py``).

A family differs only in a few block choices, which its file states explicitly as a
:class:`LlamaBlockSpec` (biases, per-head q/k norm). Model code is backend-agnostic (attention
metadata goes to each :class:`Attention` layer untouched) and parallelism-agnostic: layers shard
themselves over the TP group, and the model builds only its pipeline stage's layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmserve.distributed.parallel_state import get_pp_group
from llmserve.layers.activation import SiluAndMul
from llmserve.layers.attention.layer import Attention
from llmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmserve.layers.layernorm import RMSNorm
from llmserve.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                    default_weight_loader)
from llmserve.layers.rotary import RotaryEmbedding, rope_parameters
from llmserve.models.interface import IntermediateTensors, layer_range
from llmserve.quantization.base import QuantizationConfig


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the architecture (missing, unexpected or mis-shaped)."""


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class LlamaBlockSpec:
    """The choices that tell the Llama-shaped families apart."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False    # per-head RMSNorm on queries and keys before rotary (Qwen3)
    mlp_bias: bool = False


def layer_index(prefix: str) -> int:
    """The decoder-layer index in a parameter prefix such as ``model.layers.5.self_attn``."""
    parts = prefix.split(".")
    return int(parts[parts.index("layers") + 1])


def sliding_window_of(config: Any, layer: int) -> int | None:
    """The attention window of decoder layer ``layer`` (None: full attention), as transformers decides it:
    ``layer_types`` where the config has them (Qwen2's ``use_sliding_window`` / ``max_window_layers``), else
    ``sliding_window`` on every layer (Mistral)."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if layer_types[layer] == "sliding_attention" else None
    return int(window)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads,
                                          spec.qkv_bias, quant_config, f"{prefix}.qkv_proj")
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads   # this rank's
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, spec.o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        theta, scaling = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, scaling)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if spec.qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                              sliding_window=sliding_window_of(config, layer_index(prefix)))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: object) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(
            [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        t = hidden.shape[0]
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v.contiguous(), attn_metadata)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' is implemented")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       spec.mlp_bias, quant_config, f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, spec.mlp_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, spec, quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, spec, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: object) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class PPMissingLayer(nn.Identity):
    """Holds the place of a decoder layer another pipeline stage runs (no parameters), so the layers
    that are here keep their global index: ``model.layers.5...`` names checkpoint tensors directly."""


class LlamaModel(nn.Module):
    """Embedding (first stage), this stage's decoder layers, final norm (last stage)."""

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "model") -> None:
        super().__init__()
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.start_layer, self.end_layer = layer_range(config.num_hidden_layers, pp.rank, pp.world_size)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                    prefix=f"{prefix}.embed_tokens")
                             if self.is_first_stage else None)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, spec, quant_config, f"{prefix}.layers.{i}")
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last_stage else None

    def stage_layers(self) -> list[LlamaDecoderLayer]:
        return [self.layers[i] for i in range(self.start_layer, self.end_layer)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: object,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if self.is_first_stage:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            if intermediate_tensors is None:
                raise ValueError("a pipeline stage after the first needs the previous stage's IntermediateTensors")
            hidden, residual = intermediate_tensors.hidden, intermediate_tensors.residual
        for i in range(self.start_layer, self.end_layer):
            hidden, residual = self.layers[i](positions, hidden, residual, attn_metadata)
        if not self.is_last_stage:
            return IntermediateTensors(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class LlamaForCausalLM(nn.Module):
    """The Llama family; other families subclass it and override :meth:`block_spec` only."""

    # (fused parameter, checkpoint name, shard id); a checkpoint that ships the fused tensor loads as is.
    stacked_params = (
        ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    )
    ignored_suffixes = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        """Llama: one ``attention_bias`` switch for q/k/v and o, ``mlp_bias`` for the MLP."""
        attention_bias = bool(getattr(config, "attention_bias", False))
        return LlamaBlockSpec(qkv_bias=attention_bias, o_bias=attention_bias,
                              mlp_bias=bool(getattr(config, "mlp_bias", False)))

    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.block_spec(config), quant_config, prefix="model")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None
        if self.model.is_last_stage:
            # A last stage without the embedding holds its own copy of a tied matrix.
            tie_to = self.model.embed_tokens if self.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config, prefix="lm_head",
                                          tie_to=tie_to)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: object,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, attn_metadata, intermediate_tensors)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None, "logits are computed on the last pipeline stage"
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.stage_layers()]

    def _on_other_stage(self, name: str) -> bool:
        match = _LAYER_INDEX.match(name)
        if match:
            index = int(match.group(1))
            return index < len(self.model.layers) and not self.model.start_layer <= index < self.model.end_layer
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is None
        if name.startswith(("model.norm.", "lm_head.")):
            return self.lm_head is None
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into this rank's (fused, sharded) parameters, one tensor at a time;
        tensors of other pipeline stages are skipped.

        Raises :class:`CheckpointMismatchError` naming every unexpected, missing or mis-shaped tensor.
        """
        params = dict(self.named_parameters())

        def shard_ids(param_name: str) -> tuple[object, ...]:
            return getattr(self.get_submodule(param_name.rsplit(".", 1)[0]), "shard_ids", (None,))

        expected = {(name, s) for name in params for s in shard_ids(name)}
        loaded: set[tuple[str, object]] = set()
        unexpected: list[str] = []
        tied_copy = self.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is None
        for ckpt_name, tensor in weights:
            if ckpt_name.endswith(self.ignored_suffixes):
                continue
            if self.tie_word_embeddings and ckpt_name == "lm_head.weight":
                continue  # some tied checkpoints store the shared matrix twice
            target, shard = ckpt_name, None
            if tied_copy and ckpt_name == "model.embed_tokens.weight":
                target = "lm_head.weight"
            elif self._on_other_stage(ckpt_name):
                continue
            for fused, part, shard_id in self.stacked_params:
                if f".{part}." in ckpt_name:
                    target, shard = ckpt_name.replace(f".{part}.", f".{fused}."), shard_id
                    break
            param = params.get(target)
            if param is None:
                unexpected.append(ckpt_name)
                continue
            try:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
            except ValueError as exc:
                raise CheckpointMismatchError(f"{ckpt_name}: {exc}") from None
            loaded.update([(target, shard)] if shard is not None else [(target, s) for s in shard_ids(target)])
        missing = sorted(f"{n}" + (f" (shard {s})" if s is not None else "") for n, s in expected - loaded)
        if unexpected or missing:
            parts = []
            if missing:
                parts.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
            if unexpected:
                parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}"
                             + (" ..." if len(unexpected) > 10 else ""))
            raise CheckpointMismatchError(f"checkpoint does not match {type(self).__name__}: " + "; ".join(parts))
