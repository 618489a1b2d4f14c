"""Attention over gathered keys in PyTorch: SDPA, or the scores written out where SDPA cannot take the layer.

A logit soft-cap (Gemma 2) and ALiBi biases (BLOOM, Falcon) cannot go through SDPA without materialising a
bias per head, so such layers compute the scores explicitly, a slice of query rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmserve.layers.attention.alibi import alibi_slopes_tensor
from llmserve.layers.attention.backend import AttentionSpec

# Explicit (soft-capped, ALiBi) attention materialises float32 scores: at most about this many at a time (query
# rows are taken in slices to stay under it).
MAX_SCORE_ELEMENTS = 1 << 24


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None, is_causal: bool, scale: float, soft_cap: float | None = None,
                       alibi_slopes: torch.Tensor | None = None,
                       query_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with the scores written out, in float32: scaled, then Gemma 2's logit soft-cap
    (``soft_cap * tanh(scores / soft_cap)``) when given, then ALiBi biases ``slope * (key - query)`` when
    ``alibi_slopes`` [H] are given, then the mask. ``query`` [B, H, Q, D], ``key``/``value`` [B, KV, L, D]
    (GQA when KV < H); ``attn_mask`` a bool keep-mask [Q, L] or an additive [B, 1, 1, L] bias; ``is_causal``
    (with no mask) for Q == L. Query row ``i`` of batch row ``b`` is key ``query_keys[b] + i`` (default: the
    last Q keys). Query rows go in slices so the scores stay under ``MAX_SCORE_ELEMENTS``."""
    b, h, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = h // kv_heads
    k = key.float().unsqueeze(2).transpose(-1, -2)   # [B, KV, 1, D, L]
    v = value.float().unsqueeze(2)                   # [B, KV, 1, L, D]
    if attn_mask is not None and attn_mask.dim() == 4:
        attn_mask = attn_mask.unsqueeze(1)           # [B, 1, 1, Q or 1, L] against [B, KV, G, Q, L]
    keys = torch.arange(k_len, device=query.device)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.float().view(1, kv_heads, group, 1, 1)
        if query_keys is None:
            query_keys = torch.full((b,), k_len - q_len, device=query.device)
        query_keys = query_keys.view(b, 1, 1, 1, 1)
    out = torch.empty(b, h, q_len, d, dtype=query.dtype, device=query.device)
    step = max(1, MAX_SCORE_ELEMENTS // max(1, b * h * k_len))
    for q0 in range(0, q_len, step):
        q1 = min(q_len, q0 + step)
        q = query[:, :, q0:q1].float().reshape(b, kv_heads, group, q1 - q0, d)
        scores = torch.matmul(q, k).mul_(scale)
        if soft_cap is not None:
            scores = torch.tanh(scores.div_(soft_cap)).mul_(soft_cap)
        if alibi_slopes is not None:   # key - query, per batch row, query row and key: [B, 1, 1, Q, L]
            distance = keys - (query_keys + torch.arange(q0, q1, device=query.device).view(1, 1, 1, -1, 1))
            scores.add_(alibi_slopes * distance)
        if is_causal:
            rows = torch.arange(q0, q1, device=query.device) + (k_len - q_len)
            scores.masked_fill_(keys[None, :] > rows[:, None], float("-inf"))
        elif attn_mask is not None:
            mask = attn_mask[..., q0:q1, :] if attn_mask.shape[-2] > 1 else attn_mask
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, float("-inf"))
            else:
                scores.add_(mask)
        out[:, :, q0:q1] = torch.matmul(scores.softmax(-1), v).reshape(b, h, q1 - q0, d)
    return out


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, spec: AttentionSpec, query_keys: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA, or :func:`explicit_attention` for a layer with a soft-cap or ALiBi slopes. Shapes as SDPA's;
    ``query_keys`` as :func:`explicit_attention` takes it."""
    if spec.logits_soft_cap is not None or spec.alibi_slopes is not None:
        return explicit_attention(query, key, value, attn_mask, is_causal, spec.scale, spec.logits_soft_cap,
                                  alibi_slopes_tensor(spec, query.device), query_keys)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=spec.scale, enable_gqa=query.shape[1] != key.shape[1])

