"""Exact rejection sampling of deterministic drafts, for the whole batch in one call.

A row with ``k`` drafts ``d_1..d_k`` has target logits at ``k + 1`` positions: position ``j`` gives the
distribution of the token after ``d_1..d_j``. The standard rule (Leviathan et al.; Chen et al.) accepts
``d_j`` with probability ``min(1, p_j(d_j) / q_j(d_j))`` and, at the first rejection, draws from
``norm(max(p_j - q_j, 0))``; when all ``k`` are accepted it draws a bonus token from ``p_k``.

N-gram (and suffix) drafts are deterministic: ``q_j`` is one-hot on ``d_j``, so the rule reads: accept
with probability ``p_j(d_j)``, else draw from ``p_j`` without ``d_j``, renormalised. Drawing ``x_j ~ p_j``
with the ordinary sampler and accepting exactly when ``x_j == d_j`` is that rule: the event has probability
``p_j(d_j)``, and given ``x_j != d_j``, ``x_j`` is distributed as ``p_j`` restricted to the other tokens,
renormalised. So every position is sampled by :class:`~llmserve.layers.sampler.Sampler` as if it were the
only one (greedy rows: the argmax; random rows: the exponential race with the row's temperature, top-k,
top-p, min-p, penalties over the output including the earlier drafts, and min-tokens), and the row emits
``x_1..x_{a+1}`` where ``a`` is the number of leading positions whose sample equals the draft. A seeded
row draws position ``j`` from a generator seeded for that output position, exactly as it would without
speculation, so greedy *and* seeded output are the same token for token with speculation on or off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmserve.layers.sampler import position_seed
from llmserve.layers.sampling_batch import SamplingRow

if TYPE_CHECKING:
    from llmserve.worker.input_batch import CachedSequence


def logit_rows(sample_rows: Sequence[int], drafts: Sequence[Sequence[int]]) -> list[int]:
    """The flat rows whose logits a step samples: a row with ``k`` drafts ends at ``sample_rows[i]`` and
    needs its last ``k + 1`` positions."""
    rows: list[int] = []
    for last, row_drafts in zip(sample_rows, drafts, strict=True):
        rows.extend(range(last - len(row_drafts), last + 1))
    return rows


def sampling_rows(seqs: Sequence[CachedSequence], drafts: Sequence[Sequence[int]],
                  device: torch.device) -> list[SamplingRow]:
    """One :class:`SamplingRow` per position: position ``j`` of a sequence sees its output followed by its
    first ``j`` drafts (penalties, min-tokens) and, when seeded, the generator of that output position."""
    rows: list[SamplingRow] = []
    for seq, row_drafts in zip(seqs, drafts, strict=True):
        output = seq.output_token_ids
        rows.append(SamplingRow(seq.params, seq.prompt_token_ids, output, seq.seeded_generator(), seq.eos_token_id))
        for j in range(1, len(row_drafts) + 1):
            generator = None
            if seq.generator is not None:
                generator = torch.Generator(device=device)
                generator.manual_seed(position_seed(seq.params.seed or 0, seq.sample_index, len(output) + j))
            rows.append(SamplingRow(seq.params, seq.prompt_token_ids, [*output, *row_drafts[:j]], generator,
                                    seq.eos_token_id))
    return rows


def num_accepted(sampled: Sequence[int] | np.ndarray, drafts: Sequence[Sequence[int]]) -> np.ndarray:
    """Per row, how many leading drafts the target's samples agree with (``sampled``: one token per position,
    on the host, rows laid out as :func:`logit_rows` lays them out). Vectorised over the batch: no loop over
    positions, and on numpy arrays, as the tokens are on the host already (a dozen small torch calls were a
    tenth of a small model's batch-1 step on a CPU)."""
    counts = np.fromiter((len(d) for d in drafts), dtype=np.int64, count=len(drafts))
    width = int(counts.max()) if len(drafts) else 0
    if width == 0:
        return np.zeros(len(drafts), dtype=np.int64)
    sampled = np.asarray(sampled, dtype=np.int64)
    starts = np.cumsum(counts + 1) - (counts + 1)
    column = np.arange(width)
    valid = column[None, :] < counts[:, None]
    padded = np.full((len(drafts), width), -1, dtype=np.int64)
    padded[valid] = [t for d in drafts for t in d]
    index = np.minimum(starts[:, None] + column[None, :], len(sampled) - 1)
    agree = (sampled[index] == padded) & valid
    return np.cumprod(agree, axis=1).sum(axis=1)


def last_positions(drafts: Sequence[Sequence[int]]) -> list[int]:
    """Per row, the index of its last position among the sampled positions."""
    positions, end = [], -1
    for row_drafts in drafts:
        end += len(row_drafts) + 1
        positions.append(end)
    return positions


def emitted_positions(drafts: Sequence[Sequence[int]], accepted: Sequence[int]) -> list[list[int]]:
    """Per row, the positions (into the sampled tokens) it emits: its accepted drafts' and the one after."""
    positions, start = [], 0
    for row_drafts, a in zip(drafts, accepted, strict=True):
        positions.append(list(range(start, start + a + 1)))
        start += len(row_drafts) + 1
    return positions
