"""LongRoPE (``rope_type`` ``longrope``; ``su`` / ``yarn`` in older Phi-3 configs): the long-context Phi-3 and
Phi-4-mini checkpoints, as transformers' ``_compute_longrope_parameters`` and ``dynamic_rope_update`` compute it.

Two sets of inverse frequencies, ``1 / (factor_i * base ** (2i / rotary_dim))`` with the ``short_factor`` and the
``long_factor`` lists, and one attention factor that scales cos and sin alike (given as ``attention_factor``, else
``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`` for ``factor`` > 1, where ``factor`` defaults to
``max_position_embeddings / original_max_position_embeddings``).

Which set a token rotates with: transformers decides it per forward pass, from ``max(position_ids) + 1``: over
``original_max_position_embeddings`` the long factors, else the short ones, and its KV cache keeps every key as
it was rotated. Generating from one prompt, the prompt is one pass (every prompt key rotates with the long
factors if the prompt is longer than the switch) and each new token is a pass of its own (its key and query
rotate with the long factors from position ``original_max_position_embeddings`` on), so a sequence that crosses
the switch while generating keeps its earlier keys short. llmserve reproduces exactly that, per sequence,
whatever the batch, the prefill chunks or a preemption's recompute: the model runner gives each token its
*rotary length*, ``max(prompt length, position + 1)`` (the ``max(position_ids) + 1`` of the pass transformers
computes that token in), and a token uses the long factors when its rotary length is over the switch. The two
sets are one stacked table, so a token's row is its position, plus ``original_max_position_embeddings`` when it is
long: one gather (or one compiled call on CPU) whatever the mix. A short token is always before the switch, so
the short rows stop there: the table is ``switch + max_position_embeddings`` rows, not twice the context.

:func:`rotary_embedding` builds a layer's rotary from its config: this one where the rope type is ``longrope``,
else the plain one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmserve.layers.rotary import RotaryEmbedding, rope_parameters, rotary_tables


def longrope_switch(config: Any, scaling: dict) -> int:
    """The sequence length above which the long factors apply (``original_max_position_embeddings``; Phi-3's
    top-level value wins over the one in ``rope_scaling``, as transformers reads it)."""
    switch = getattr(config, "original_max_position_embeddings", None) or scaling.get(
        "original_max_position_embeddings")
    if not switch:
        raise ValueError("LongRoPE needs original_max_position_embeddings (the length its long factors start at)")
    return int(switch)


def longrope_switch_of(config: Any) -> int | None:
    """The switch length of a model that rotates with LongRoPE on any layer; None for any other rotary."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    per_layer_type = bool(params) and all(isinstance(v, dict) for v in params.values())
    for scaling in (params.values() if per_layer_type else [params]):
        if scaling.get("rope_type", scaling.get("type")) == "longrope":
            return longrope_switch(config, scaling)
    return None


def longrope_prompt_key(switch: int | None, num_prompt_tokens: int) -> str | None:
    """What a prompt's prefix-cache blocks must be told apart by besides their tokens: a prompt over the switch
    rotates every one of its keys with the long factors, a shorter one its keys before the switch with the short
    ones, so the same tokens hold different keys (None where nothing but the tokens counts)."""
    return "longrope:long" if switch is not None and num_prompt_tokens > switch else None


def longrope_attention_factor(config: Any, scaling: dict) -> float:
    """What cos and sin are scaled by (transformers' default from ``factor`` when not given)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    switch = longrope_switch(config, scaling)
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else config.max_position_embeddings / switch
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(switch))


class LongRoPERotaryEmbedding(RotaryEmbedding):
    """Neox-layout rotary over ``rotary_dim`` dims with LongRoPE's two factor sets, chosen per token from its
    rotary length (see the module docstring)."""

    def __init__(self, config: Any, head_dim: int, rotary_dim: int, base: float, scaling: dict) -> None:
        super().__init__(head_dim, 1, base, rotary_dim=rotary_dim)   # its one-row plain table is replaced below
        self.switch = longrope_switch(config, scaling)
        max_position = int(config.max_position_embeddings)
        scale = longrope_attention_factor(config, scaling)
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        tables = []
        for name, rows in (("short_factor", self.switch), ("long_factor", max_position)):
            factors = torch.tensor([float(f) for f in scaling.get(name) or ()], dtype=torch.float32)
            if factors.numel() != rotary_dim // 2:
                raise ValueError(f"LongRoPE {name} must have {rotary_dim // 2} values (one per rotating pair of "
                                 f"the {rotary_dim} rotary dims), got {factors.numel()}")
            tables.append(rotary_tables(1.0 / (factors * base ** exponents), rows, scale))
        (short_cos, short_sin), (long_cos, long_sin) = tables
        self.set_tables(torch.cat((short_cos, long_cos)), torch.cat((short_sin, long_sin)))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                rotary_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``rotary_lengths`` [T]: each token's rotary length; None: the tokens are one sequence computed in one
        pass (transformers' ``max(positions) + 1`` for all of them)."""
        if rotary_lengths is None:
            rotary_lengths = positions.max() + 1
        rows = positions + (rotary_lengths > self.switch).long() * self.switch
        return self.rotate_rows(rows, q, k)


def rotary_embedding(config: Any, head_dim: int, rotary_dim: int, layer_type: str | None = None,
                     interleaved: bool = False) -> RotaryEmbedding:
    """A layer's rotary from its config: LongRoPE where the layer's rope type is ``longrope`` (Phi-3's config
    renames ``su`` / ``yarn`` to it), else plain rope with its scaling; over each head's first ``rotary_dim`` dims."""
    theta, scaling = rope_parameters(config, layer_type)
    if scaling.get("rope_type", scaling.get("type")) == "longrope":
        if interleaved:
            raise ValueError("LongRoPE is implemented for the neox rotary layout only")
        return LongRoPERotaryEmbedding(config, head_dim, rotary_dim, theta, scaling)
    return RotaryEmbedding(head_dim, config.max_position_embeddings, theta, scaling, interleaved=interleaved,
                           rotary_dim=rotary_dim)
