"""Llama decoder blocks, shared by the pre-norm decoder families (``mistral.py``, ``qwen2.py``, ``qwen3.py``,
``gemma2.py``, ``gemma3.py``, ``gpt2.py``, ``cohere.py``, ``phi3.py``, ``bloom.py``, ``falcon.py``).

A family differs only in a few block choices, which its file states explicitly as a
:class:`LlamaBlockSpec` (biases, per-head q/k norm, norm kind, activation, attention scale and soft-cap,
rotary layout and which layers rotate, learned positions or ALiBi), plus, where the layout itself differs, a
subclass of the decoder layer (Gemma's four norms, Cohere's parallel residual) or of the embedding (Gemma's
scale, GPT-2's learned positions), and a mapping of its checkpoint's names onto these modules (GPT-2).
Model code is backend-agnostic (attention metadata goes to each :class:`Attention` layer untouched) and
parallelism-agnostic: layers shard themselves over the TP group, and the model builds only its pipeline
stage's layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmserve.distributed.parallel_state import get_pp_group
from llmserve.layers.activation import Activation, gated_activation
from llmserve.layers.attention.layer import Attention
from llmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmserve.layers.layernorm import GemmaRMSNorm, LayerNorm, RMSNorm
from llmserve.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                    RowParallelLinear, default_weight_loader)
from llmserve.layers.longrope import rotary_embedding
from llmserve.models.interface import IntermediateTensors, layer_range
from llmserve.quantization.base import QuantizationConfig
from llmserve.quantization.kv_cache import kv_scale_name

if TYPE_CHECKING:
    from llmserve.models.transformer_names import TransformerNames


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the architecture (missing, unexpected or mis-shaped)."""


class UnsupportedModelConfigError(ValueError):
    """The checkpoint's config asks for something llmserve cannot run yet (refused rather than run wrongly)."""


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def intermediate_size_of(config: Any) -> int:
    """The MLP's inner size (GPT-2: ``n_inner``, default 4 x hidden)."""
    return (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
            or 4 * config.hidden_size)


def norm_eps_of(config: Any) -> float:
    for name in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 1e-6


@dataclass(frozen=True)
class LlamaBlockSpec:
    """The choices that tell the pre-norm decoder families apart."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False    # per-head norm on queries and keys before rotary (Qwen3, Gemma 3)
    mlp_bias: bool = False
    norm: str = "rms"        # "rms"; "gemma_rms" (scales by 1 + w, Gemma); "layer" (LayerNorm with bias, GPT-2);
                             # "layer_no_bias" (Command-R)
    activation: str = "silu"   # the MLP's, by its transformers name
    gated_mlp: bool = True     # act(gate) * up; False: act(up) (GPT-2)
    rotary: bool = True        # False: positions enter as learned embeddings (GPT-2)
    rotary_interleaved: bool = False   # rotate dims (2i, 2i+1) (GPT-J layout, Command-R), not (i, i + D/2)
    rotary_on_sliding_layers_only: bool = False   # full-attention layers have no positional encoding (Cohere2)
    rotary_fraction: float = 1.0   # the share of each head's dims that rotate (partial rotary: Phi-4-mini's 0.75)
    attn_scale: float | None = None   # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_scale_by_inverse_layer: bool = False   # scale / (layer + 1) (GPT-2's scale_attn_by_inverse_layer_idx)
    attn_logit_softcap: float | None = None     # c * tanh(scores / c) before the softmax (Gemma 2)
    alibi_slopes: tuple[float, ...] | None = None   # ALiBi, one slope per query head of the model (BLOOM, Falcon)
    num_kv_heads: int | None = None   # None: the config's num_key_value_heads (Falcon's follow its layout flags)
    mlp_size: int | None = None       # None: the config's intermediate size (BLOOM's is always 4 x hidden)


def make_norm(spec: LlamaBlockSpec, size: int, eps: float) -> nn.Module:
    if spec.norm == "rms":
        return RMSNorm(size, eps)
    if spec.norm == "gemma_rms":
        return GemmaRMSNorm(size, eps)
    if spec.norm == "layer":
        return LayerNorm(size, eps)
    if spec.norm == "layer_no_bias":
        return LayerNorm(size, eps, bias=False)
    raise ValueError(f"unknown norm kind {spec.norm!r}")


def layer_index(prefix: str) -> int:
    """The decoder-layer index in a parameter prefix such as ``model.layers.5.self_attn``."""
    parts = prefix.split(".")
    return int(parts[parts.index("layers") + 1])


def hidden_act_of(config: Any) -> str:
    """The MLP activation's transformers name (``hidden_act``; Gemma's ``hidden_activation``)."""
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "silu"


def layer_type_of(config: Any, layer: int) -> str | None:
    """``config.layer_types[layer]`` (``"sliding_attention"`` / ``"full_attention"``), None where there are none."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types[layer] if layer_types is not None else None


def sliding_window_of(config: Any, layer: int) -> int | None:
    """The attention window of decoder layer ``layer`` (None: full attention), as transformers decides it:
    ``layer_types`` where the config has them (Qwen2's ``use_sliding_window`` / ``max_window_layers``; Gemma 2's
    alternate layers; Gemma 3's 5 local : 1 global, from ``sliding_window_pattern`` in older configs; transformers
    fills ``layer_types`` in from these when it reads the config), else ``sliding_window`` on every layer
    (Mistral)."""
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
        total_kv_heads = spec.num_kv_heads or getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = head_dim_of(config)
        layer = layer_index(prefix)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads,
                                          spec.qkv_bias, quant_config, f"{prefix}.qkv_proj")
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads   # this rank's
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, spec.o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = None
        window = sliding_window_of(config, layer)
        if spec.rotary and (window is not None or not spec.rotary_on_sliding_layers_only):
            # as transformers sizes it: the first int(head_dim * partial_rotary_factor) dims rotate
            self.rotary_emb = rotary_embedding(config, self.head_dim, int(self.head_dim * spec.rotary_fraction),
                                               layer_type_of(config, layer), spec.rotary_interleaved)
        eps = norm_eps_of(config)
        self.q_norm = make_norm(spec, self.head_dim, eps) if spec.qk_norm else None
        self.k_norm = make_norm(spec, self.head_dim, eps) if spec.qk_norm else None
        scale = spec.attn_scale if spec.attn_scale is not None else self.head_dim ** -0.5
        if spec.attn_scale_by_inverse_layer:
            scale /= float(layer + 1)
        slopes = spec.alibi_slopes
        if slopes is not None:   # this rank's heads
            first = self.qkv_proj.tp_rank * self.num_heads
            slopes = slopes[first:first + self.num_heads]
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window=window,
                              logits_soft_cap=spec.attn_logit_softcap, alibi_slopes=slopes)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: object,
                rotary_lengths: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(
            [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        t = hidden.shape[0]
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k, rotary_lengths)
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v.contiguous(), attn_metadata)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """Gated (``gate_up_proj`` -> ``act(gate) * up``) or plain (``up_proj`` -> ``act``), then ``down_proj``."""

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        inner = spec.mlp_size or intermediate_size_of(config)
        if spec.gated_mlp:
            self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inner] * 2, spec.mlp_bias,
                                                           quant_config, f"{prefix}.gate_up_proj")
            self.act_fn = gated_activation(spec.activation)
        else:
            self.up_proj = ColumnParallelLinear(config.hidden_size, inner, spec.mlp_bias, quant_config=quant_config,
                                                prefix=f"{prefix}.up_proj")
            self.act_fn = Activation(spec.activation)
        self.down_proj = RowParallelLinear(inner, config.hidden_size, spec.mlp_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.gated = spec.gated_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x) if self.gated else self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.self_attn = self.make_attention(config, spec, quant_config, f"{prefix}.self_attn")
        self.mlp = self.make_mlp(config, spec, quant_config, f"{prefix}.mlp")
        self.input_layernorm = make_norm(spec, config.hidden_size, norm_eps_of(config))
        self.post_attention_layernorm = make_norm(spec, config.hidden_size, norm_eps_of(config))

    def make_attention(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None,
                       prefix: str) -> nn.Module:
        """The attention block (DeepSeek builds its latent attention here)."""
        return LlamaAttention(config, spec, quant_config, prefix)

    def make_mlp(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
        """The feed-forward block (a mixture-of-experts family builds its sparse block here)."""
        return LlamaMLP(config, spec, quant_config, prefix)

    def input_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_layernorm`` with the previous layer's residual add folded in (none before the first layer)."""
        if residual is None:
            return self.input_layernorm(hidden), hidden
        return self.input_layernorm(hidden, residual)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: object, rotary_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata, rotary_lengths)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class PPMissingLayer(nn.Identity):
    """Holds the place of a decoder layer another pipeline stage runs (no parameters), so the layers
    that are here keep their global index: ``model.layers.5...`` names checkpoint tensors directly."""


class LlamaModel(nn.Module):
    """Embedding (first stage), this stage's decoder layers, final norm (last stage).

    Subclasses change the decoder layer (:attr:`decoder_layer_cls`) or how tokens are embedded (:meth:`embed`).
    """

    decoder_layer_cls: type[nn.Module] = LlamaDecoderLayer

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
            self.decoder_layer_cls(config, spec, quant_config, f"{prefix}.layers.{i}")
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(config.num_hidden_layers))
        self.norm = make_norm(spec, config.hidden_size, norm_eps_of(config)) if self.is_last_stage else None

    def stage_layers(self) -> list[nn.Module]:
        return [self.layers[i] for i in range(self.start_layer, self.end_layer)]

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The first layer's input (first stage only)."""
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: object,
                intermediate_tensors: IntermediateTensors | None = None,
                rotary_lengths: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        if self.is_first_stage:
            hidden, residual = self.embed(input_ids, positions), None
        else:
            if intermediate_tensors is None:
                raise ValueError("a pipeline stage after the first needs the previous stage's IntermediateTensors")
            hidden, residual = intermediate_tensors.hidden, intermediate_tensors.residual
        for i in range(self.start_layer, self.end_layer):
            hidden, residual = self.layers[i](positions, hidden, residual, attn_metadata, rotary_lengths)
        if not self.is_last_stage:
            return IntermediateTensors(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class LlamaForCausalLM(nn.Module):
    """The Llama family; other families subclass it and override :meth:`block_spec` (and, where their layout
    differs, :attr:`model_cls`, :meth:`check_config`, :meth:`checkpoint_tensor` or :meth:`compute_logits`)."""

    model_cls: type[LlamaModel] = LlamaModel
    # (fused parameter, checkpoint name, shard id); a checkpoint that ships the fused tensor loads as is.
    stacked_params = (
        ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    )
    ignored_suffixes = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
    # Parameters only the first pipeline stage holds (the last holds the final norm and the LM head).
    first_stage_prefixes: tuple[str, ...] = ("model.embed_tokens.",)
    # A family whose checkpoints name tensors ``transformer.h.N.*``: its map onto the shared modules' names.
    checkpoint_names: TransformerNames | None = None

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        """Llama: one ``attention_bias`` switch for q/k/v and o, ``mlp_bias`` for the MLP."""
        attention_bias = bool(getattr(config, "attention_bias", False))
        return LlamaBlockSpec(qkv_bias=attention_bias, o_bias=attention_bias,
                              mlp_bias=bool(getattr(config, "mlp_bias", False)), activation=hidden_act_of(config))

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise :class:`UnsupportedModelConfigError` for a config option this family cannot run yet."""

    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.check_config(config)
        self.config = config
        self.model = self.model_cls(config, self.block_spec(config), quant_config, prefix="model")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None
        if self.model.is_last_stage:
            # A last stage without the embedding holds its own copy of a tied matrix.
            tie_to = self.model.embed_tokens if self.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config, prefix="lm_head",
                                          tie_to=tie_to)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: object,
                intermediate_tensors: IntermediateTensors | None = None,
                rotary_lengths: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, attn_metadata, intermediate_tensors, rotary_lengths)

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
        if name.startswith(self.first_stage_prefixes):
            return not self.model.is_first_stage
        if name.startswith(("model.norm.", "lm_head.")):
            return self.lm_head is None
        return False

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor as this model names and lays it out (None: not part of the model); a family
        whose checkpoints name or store tensors differently overrides this (GPT-2)."""
        return name, tensor

    @classmethod
    def checkpoint_name(cls, name: str) -> str:
        """The name :meth:`checkpoint_tensor` gives a checkpoint tensor, known before the model is built (which
        of a GGUF file's tensors load packed is decided by the layers' names): through the family's
        :attr:`checkpoint_names` where it has them (GPT-2, BLOOM, Falcon). DeepSeek leaves its shared experts'
        rename out, so that they load dequantised from GGUF files (docs/quantization.md)."""
        return name if cls.checkpoint_names is None else cls.checkpoint_names.rename(name)[0]

    def param_target(self, name: str, params: Mapping[str, nn.Parameter]) -> tuple[str, object]:
        """``(parameter, shard id)`` a checkpoint tensor (as :meth:`checkpoint_tensor` named it) loads into:
        itself, or a fused parameter of :attr:`stacked_params` (a family with stacked experts adds its own)."""
        for fused, part, shard_id in self.stacked_params:
            fused_target = name.replace(f".{part}.", f".{fused}.")
            if f".{part}." in name and fused_target in params:   # GPT-2's plain MLP keeps its up_proj
                return fused_target, shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into this rank's (fused, sharded) parameters, one tensor at a time;
        tensors of other pipeline stages are skipped.

        Raises :class:`CheckpointMismatchError` naming every unexpected, missing or mis-shaped tensor.
        """
        params = dict(self.named_parameters())

        def shard_ids(param_name: str) -> tuple[object, ...]:   # the parameter's own, else its layer's
            own = getattr(params[param_name], "shard_ids", None)
            return own or getattr(self.get_submodule(param_name.rsplit(".", 1)[0]), "shard_ids", (None,))

        expected = {(name, s) for name in params for s in shard_ids(name)}
        loaded: set[tuple[str, object]] = set()
        unexpected: list[str] = []
        tied_copy = self.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is None
        for original_name, tensor in weights:
            mapped = self.checkpoint_tensor(original_name, tensor)
            if mapped is None:
                continue
            ckpt_name, tensor = mapped
            if ckpt_name.endswith(self.ignored_suffixes):
                continue
            if self.tie_word_embeddings and ckpt_name == "lm_head.weight":
                continue  # some tied checkpoints store the shared matrix twice
            if tied_copy and ckpt_name == "model.embed_tokens.weight":
                target, shard = "lm_head.weight", None
            elif self._on_other_stage(ckpt_name):
                continue
            elif (kv_scale := kv_scale_name(ckpt_name)) is not None:
                attn = getattr(self.get_submodule(kv_scale[0]), "attn", None)
                if not isinstance(attn, Attention):
                    unexpected.append(original_name)
                    continue
                try:
                    attn.load_kv_scale(kv_scale[1], tensor)
                except ValueError as exc:
                    raise CheckpointMismatchError(f"{original_name}: {exc}") from None
                continue
            else:
                target, shard = self.param_target(ckpt_name, params)
            param = params.get(target)
            if param is None:
                unexpected.append(original_name)
                continue
            try:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
            except ValueError as exc:
                raise CheckpointMismatchError(f"{original_name}: {exc}") from None
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
