"""ALiBi (attention with linear biases, Press et al.): instead of encoding positions, each query head ``h``
adds ``slope[h] * (key_position - query_position)`` to its scaled scores, a penalty growing linearly with the
distance (BLOOM, Falcon-RW).

The slopes are a geometric sequence over the heads, as transformers' ``build_alibi_tensor`` (BLOOM, Falcon)
computes them: for ``n`` heads, with ``p`` the largest power of two <= ``n``, the first ``p`` slopes are
``b ** 1 .. b ** p`` with ``b = 2 ** (-8 / p)``, and the remaining ``n - p`` heads take the odd powers
``c ** 1, c ** 3, ...`` of the sequence for ``2p`` heads (``c = 2 ** (-8 / 2p)``).

transformers adds ``slope * key_position`` (no query term): a constant per query row, which the softmax
cancels, so the relative form here gives the same attention and lets every backend compute the bias from the
two positions it already has. Under tensor parallelism a rank holds a run of heads and takes their slopes.
"""

from __future__ import annotations

import functools
import math

import torch

from llmserve.layers.attention.backend import AttentionSpec


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi slope of each of ``num_heads`` query heads, in head order (float64 values)."""
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** power for power in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        slopes += [extra_base ** power for power in range(1, 1 + 2 * remaining, 2)]
    return slopes


def alibi_slopes_tensor(spec: AttentionSpec, device: torch.device) -> torch.Tensor | None:
    """The layer's ALiBi slopes as a float32 [H] tensor on ``device`` (None without ALiBi), made once per
    set of slopes and device rather than per step, and kept: a captured CUDA graph reads it at every replay."""
    return None if spec.alibi_slopes is None else _slopes_tensor(spec.alibi_slopes, device)


@functools.cache   # a model has one set of slopes per rank (a few at most): nothing to evict
def _slopes_tensor(slopes: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(slopes, dtype=torch.float32, device=device)
