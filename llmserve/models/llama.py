"""Llama-family decoder (also the base that Mistral, Qwen2 and Qwen3 reuse, differing only in flags).

Model code is backend-agnostic: it receives the per-step attention metadata and passes it to each
:class:`Attention` layer; where K/V live and how attention runs is the backend's business.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llmserve.layers.activation import SiluAndMul
from llmserve.layers.attention.layer import Attention
from llmserve.layers.embedding import LMHead, VocabEmbedding
from llmserve.layers.layernorm import RMSNorm
from llmserve.layers.linear import Linear, MergedLinear, QKVLinear, default_weight_loader
from llmserve.layers.rotary import RotaryEmbedding, rope_parameters


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the architecture (missing, unexpected or mis-shaped)."""


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, o_bias)
        theta, scaling = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, scaling)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

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
    def __init__(self, config: Any) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' is implemented")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = MergedLinear(config.hidden_size, [config.intermediate_size] * 2, bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias, o_bias, qk_norm)
        self.mlp = LlamaMLP(config)
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


class LlamaModel(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, qkv_bias, o_bias, qk_norm)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: object) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Subclasses set these flags instead of copying the model.

    ``qkv_bias`` / ``o_bias``: None follows ``config.attention_bias``; ``qk_norm``: per-head q/k RMSNorm.
    """

    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm = False

    # (fused parameter, checkpoint name, shard id)
    stacked_params = (
        ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    )
    ignored_suffixes = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.model = LlamaModel(config,
                                attention_bias if self.qkv_bias is None else self.qkv_bias,
                                attention_bias if self.o_bias is None else self.o_bias,
                                self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size,
                              tie_to=self.model.embed_tokens if self.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: object) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into the (fused) parameters, one tensor at a time.

        Raises :class:`CheckpointMismatchError` naming every unexpected, missing or mis-shaped tensor.
        """
        params = dict(self.named_parameters())
        expected: set[tuple[str, object]] = set()
        for name in params:
            module = self.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(module, MergedLinear):
                shards = (["q", "k", "v"] if isinstance(module, QKVLinear) else range(len(module.output_sizes)))
                expected.update((name, s) for s in shards)
            else:
                expected.add((name, None))
        loaded: set[tuple[str, object]] = set()
        unexpected: list[str] = []
        for ckpt_name, tensor in weights:
            if ckpt_name.endswith(self.ignored_suffixes):
                continue
            if self.tie_word_embeddings and ckpt_name == "lm_head.weight":
                continue  # some tied checkpoints store the shared matrix twice
            target, shard = ckpt_name, None
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
            loaded.add((target, shard))
        missing = sorted(f"{n}" + (f" (shard {s})" if s is not None else "") for n, s in expected - loaded)
        if unexpected or missing:
            parts = []
            if missing:
                parts.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
            if unexpected:
                parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}"
                             + (" ..." if len(unexpected) > 10 else ""))
            raise CheckpointMismatchError(f"checkpoint does not match {type(self).__name__}: " + "; ".join(parts))
