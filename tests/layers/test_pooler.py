"""Pooling's arithmetic, step by step: which positions of a step's chunk each pooling type reads (LAST: the
prompt's last, in the chunk that ends the prompt; CLS: the first, in the chunk that starts it; MEAN: all),
the shares a step returns (only for sequences that pool something in it), and the finished vector (a sum of
shares; divided by the prompt length for MEAN; L2-normalised if asked, a zero vector staying zero) as
float32 little-endian bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.config import PoolerConfig
from llmserve.layers import pooler

LAST, MEAN, CLS = PoolerConfig("LAST"), PoolerConfig("MEAN"), PoolerConfig("CLS")


@pytest.mark.parametrize("pooling, start, num, span", [
    (LAST, 0, 10, (9, 10)), (LAST, 4, 6, (5, 6)), (LAST, 0, 6, None),
    (CLS, 0, 6, (0, 1)), (CLS, 6, 4, None),
    (MEAN, 0, 6, (0, 6)), (MEAN, 6, 4, (0, 4)),
])
def test_pooled_span_of_a_chunk_of_a_10_token_prompt(pooling, start, num, span):
    assert pooler.pooled_span(pooling, start, num, 10) == span


def test_step_shares_and_the_finished_vector():
    hidden = torch.arange(24, dtype=torch.float32).reshape(8, 3)
    rows = [pooler.PoolRow(1, MEAN, 0, 0, 3, 5), pooler.PoolRow(2, LAST, 3, 2, 4, 10),
            pooler.PoolRow(3, LAST, 7, 5, 1, 6)]
    shares = pooler.step_shares(hidden, rows)
    assert set(shares) == {1, 3}   # sequence 2's chunk does not reach its last token
    assert pooler.as_floats(shares[1]) == hidden[0:3].sum(0).tolist()
    assert pooler.as_floats(shares[3]) == hidden[7].tolist()
    rest = hidden[3:5].sum(0).numpy().astype("<f4").tobytes()
    total = pooler.add_share(pooler.add_share(None, shares[1]), rest)
    mean = pooler.as_floats(pooler.finish(total, PoolerConfig("MEAN", normalize=False), 5))
    assert mean == pytest.approx(hidden[0:5].mean(0).tolist())
    unit = np.array(pooler.as_floats(pooler.finish(total, MEAN, 5)))
    assert np.linalg.norm(unit) == pytest.approx(1.0) and unit == pytest.approx(np.array(mean) / np.linalg.norm(mean))
    assert pooler.as_floats(pooler.finish(np.zeros(3), LAST, 1)) == [0.0, 0.0, 0.0]
