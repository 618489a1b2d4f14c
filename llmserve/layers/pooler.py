"""Pooling: an embedding request's vector from the final layer's hidden states (after the final norm).

The work is split so that chunked prefill, preemption and failed steps need no pooling state on the
workers: each step the driver returns, per pooling sequence, the sum of the hidden states of the positions
it pools that this step computed (:func:`step_shares`); the engine core adds up the shares of the steps it
commits (:func:`add_share`; a preempted sequence starts again from zero) and, once the whole prompt is
computed, finishes the vector (:func:`finish`): divided by the prompt length for MEAN, then L2-normalised
if asked. Vectors travel as float32 little-endian bytes, the layout OpenAI's base64 encoding uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmserve.config import PoolerConfig

FLOAT32_LE = np.dtype("<f4")
NORMALIZE_EPS = 1e-12   # as torch.nn.functional.normalize: a zero vector stays zero


@dataclass
class PoolRow:
    """A pooling sequence's tokens in one step: flat rows ``[flat, flat + num)`` hold its positions
    ``[start, start + num)``."""

    seq_id: int
    pooling: PoolerConfig
    flat: int
    start: int
    num: int
    num_prompt_tokens: int


def pooled_span(pooling: PoolerConfig, start: int, num: int, num_prompt_tokens: int) -> tuple[int, int] | None:
    """The positions, relative to ``start``, that pooling reads among ``[start, start + num)`` (None: none)."""
    if pooling.pooling_type == "LAST":
        return (num - 1, num) if start + num == num_prompt_tokens else None
    if pooling.pooling_type == "CLS":
        return (0, 1) if start == 0 else None
    return 0, num   # MEAN


def step_shares(hidden: torch.Tensor, rows: list[PoolRow]) -> dict[int, bytes]:
    """Each pooling sequence's share of its vector in this step (sequences with nothing to pool are left out),
    read back from the device in one copy."""
    seq_ids, sums = [], []
    for row in rows:
        span = pooled_span(row.pooling, row.start, row.num, row.num_prompt_tokens)
        if span is not None:
            seq_ids.append(row.seq_id)
            sums.append(hidden[row.flat + span[0]:row.flat + span[1]].float().sum(0))
    if not sums:
        return {}
    host = torch.stack(sums).cpu().numpy().astype(FLOAT32_LE)
    return {seq_id: vector.tobytes() for seq_id, vector in zip(seq_ids, host)}


def add_share(total: np.ndarray | None, share: bytes) -> np.ndarray:
    """``total`` plus one step's share (accumulated in float64, so long prompts lose nothing to rounding)."""
    vector = np.frombuffer(share, dtype=FLOAT32_LE).astype(np.float64)
    return vector if total is None else total + vector


def finish(total: np.ndarray, pooling: PoolerConfig, num_prompt_tokens: int) -> bytes:
    """The pooled vector of a fully computed prompt, as float32 little-endian bytes."""
    vector = total / num_prompt_tokens if pooling.pooling_type == "MEAN" else total
    if pooling.normalize:
        vector = vector / max(float(np.linalg.norm(vector)), NORMALIZE_EPS)
    return vector.astype(FLOAT32_LE).tobytes()


def as_floats(data: bytes) -> list[float]:
    return np.frombuffer(data, dtype=FLOAT32_LE).tolist()
