"""Rotary position embedding: neox / rotate-half layout (HF Llama, Mistral, Qwen: dims ``i`` and ``i + D/2``
rotate together) or the interleaved GPT-J layout (Cohere: dims ``2i`` and ``2i + 1``).

cos/sin are computed once for every position up to ``max_position`` and gathered by position per step.
On CPU in float32, q and k are rotated in place by one compiled call (``cpu_layer_ops.c``).

Partial rotary (``rotary_dim`` < ``head_dim``, Phi-4-mini): only each head's first ``rotary_dim`` dims rotate,
in the same layout over those dims; the rest pass through, as transformers' ``apply_rotary_pos_emb`` does.

Scaling (``rope_type``): ``linear``, ``llama3`` and ``yarn`` (DeepSeek-V2/V3: a ramp between extrapolated and
interpolated frequencies, and cos/sin times YaRN's attention factor).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmserve.layers.layer_ops import layer_ops_for

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(config: Any, layer_type: str | None = None) -> tuple[float, dict]:
    """Return ``(rope_theta, scaling dict)`` from a HF config, old (``rope_scaling``) or new (``rope_parameters``) style.

    transformers 5 keys ``rope_parameters`` by layer type where layer types differ in rope (Gemma 3: its
    local layers' base ``rope_local_base_freq`` and its global layers' ``rope_theta`` and scaling), so a
    layer passes its entry of ``config.layer_types``.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        if layer_type not in params:
            raise ValueError(f"rope_parameters are given per layer type ({', '.join(sorted(params))}) but this "
                             f"layer's type is {layer_type!r}")
        params = dict(params[layer_type])
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))
    return theta, params


def _scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's ``get_mscale``: ``0.1 * mscale * ln(factor) + 1`` for a factor above 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_parameters(rotary_dim: int, base: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN's inverse frequencies and attention factor (the cos/sin multiplier), as transformers'
    ``_compute_yarn_parameters``: extrapolated (unscaled) frequencies for the fast dims, interpolated
    (divided by ``factor``) ones for the slow dims, a linear ramp between ``beta_fast`` and ``beta_slow``
    rotations over ``original_max_position_embeddings``. DeepSeek sets ``mscale`` = ``mscale_all_dim``, which makes
    the factor 1 (its softmax scale carries ``mscale_all_dim`` instead)."""
    original = float(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else max_position / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = rotary_inv_freq(rotary_dim, base)
    extrapolate = 1 - ramp
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention_factor)


def rotary_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """The unscaled inverse frequencies of ``rotary_dim`` rotating dims (one per pair)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def rotary_tables(inv_freq: torch.Tensor, max_position: int,
                  scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_position, len(inv_freq)] in float32, each times ``scale`` (LongRoPE's attention factor)."""
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return freqs.cos() * scale, freqs.sin() * scale


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None,
                 interleaved: bool = False, rotary_dim: int | None = None) -> None:
        """``rotary_dim``: the leading dims of each head that rotate (None: all of them)."""
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not 0 < self.rotary_dim <= head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and in 1..{head_dim}, got {self.rotary_dim}")
        self.interleaved = interleaved
        scaling = scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "yarn":
            inv_freq, attention_factor = yarn_parameters(self.rotary_dim, base, scaling, max_position)
            self.set_tables(*rotary_tables(inv_freq, max_position, attention_factor))
            return
        inv_freq = _scaled_inv_freq(rotary_inv_freq(self.rotary_dim, base), scaling)
        self.set_tables(*rotary_tables(inv_freq, max_position))

    def set_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The cos/sin rows ``forward`` gathers, [rows, rotary_dim // 2] each; kept in float32, cast on use."""
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                rotary_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [T, H, D] and ``k`` [T, KV, D] by their token positions [T] (in place where a compiled
        kernel runs: CPU, GPU).

        ``rotary_lengths`` (see :class:`~llmserve.layers.longrope.LongRoPERotaryEmbedding`) does not change a
        rotation whose tables do not depend on the sequence length."""
        return self.rotate_rows(positions, q, k)

    def rotate_rows(self, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate each token by row ``rows[t]`` of the cos/sin tables."""
        kernels = None if self.interleaved else layer_ops_for(q)   # the kernels are neox-only
        if (kernels is not None and k.dtype == q.dtype and self.cos_cache.dtype == torch.float32
                and q.stride(2) == 1 and k.stride(2) == 1
                and q.stride(1) == self.head_dim and k.stride(1) == self.head_dim):
            kernels.rotary_embedding(rows.contiguous(), q, k, self.cos_cache, self.sin_cache)
            return q, k
        cos = self.cos_cache[rows].unsqueeze(1)
        sin = self.sin_cache[rows].unsqueeze(1)
        rotate = _rotate_interleaved if self.interleaved else _rotate
        if self.rotary_dim == self.head_dim:
            return rotate(q, cos, sin), rotate(k, cos, sin)
        rd = self.rotary_dim
        return (torch.cat((rotate(q[..., :rd], cos, sin), q[..., rd:]), dim=-1),
                torch.cat((rotate(k[..., :rd], cos, sin), k[..., rd:]), dim=-1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    x1, x2 = x32[..., ::2], x32[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)
