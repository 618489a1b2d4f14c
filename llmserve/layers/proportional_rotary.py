"""Gemma 4's "proportional" rotary embedding (transformers' ``rope_type: "proportional"``).

Only the first ``partial_rotary_factor * head_dim / 2`` frequency pairs rotate, and their frequencies are
spaced over the whole ``head_dim`` (``base ** (-2i / head_dim)``), not over the rotated part as in the usual
partial rotary; the other pairs get frequency 0 (cos 1, sin 0) and pass through unchanged. The rotation
itself is the neox rotate-half over the full head (dims ``i`` and ``i + head_dim / 2``), so this is
:class:`~llmserve.layers.rotary.RotaryEmbedding` with other cos/sin tables.
"""

from __future__ import annotations

import torch

from llmserve.layers.rotary import RotaryEmbedding, rotary_tables


def proportional_inv_freq(head_dim: int, base: float, partial_rotary_factor: float, factor: float = 1.0
                          ) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies, zero past the rotated pairs, as transformers computes them."""
    rotated = int(partial_rotary_factor * head_dim // 2)
    inv_freq = torch.zeros(head_dim // 2, dtype=torch.float32)
    inv_freq[:rotated] = 1.0 / (base ** (torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq / factor


class ProportionalRotaryEmbedding(RotaryEmbedding):
    def __init__(self, head_dim: int, max_position: int, base: float, partial_rotary_factor: float,
                 factor: float = 1.0) -> None:
        super().__init__(head_dim, 1, base)   # a one-position table, replaced by the proportional one below
        self.set_tables(*rotary_tables(proportional_inv_freq(head_dim, base, partial_rotary_factor, factor),
                                       max_position))
