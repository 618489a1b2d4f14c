"""A tensor/pipeline split is judged from the model's config before any worker starts: query heads must
divide over the ranks, KV heads divide or be replicated evenly, and every pipeline stage needs a layer.
The messages name the numbers (the same as the layers' own checks)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from llmserve.distributed.model_fit import check_parallel_fit


def _config(heads: int = 12, kv_heads: int = 4, layers: int = 6) -> LlamaConfig:
    return LlamaConfig(num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=layers,
                       hidden_size=heads * 8)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (12, 1), (1, 6), (2, 3)])
def test_splits_that_fit(tp, pp):
    check_parallel_fit(_config(), tp, pp)   # 12 ranks: each of the 4 KV heads replicated on 3


@pytest.mark.parametrize("config,tp,pp,message", [
    (_config(), 5, 1, r"num_attention_heads \(12\) is not divisible by the tensor-parallel size \(5\)"),
    (_config(), 8, 1, r"num_attention_heads \(12\) is not divisible by the tensor-parallel size \(8\)"),
    (_config(heads=12, kv_heads=6), 4, 1, r"num_key_value_heads \(6\) is not divisible"),
    (_config(heads=12, kv_heads=4), 6, 1, r"num_key_value_heads \(4\) is smaller than the tensor-parallel size "
                                          r"\(6\) and does not divide it"),
    (_config(layers=6), 1, 7, "cannot split 6 decoder layers over 7 pipeline stages"),
])
def test_splits_that_do_not_fit_name_the_numbers(config, tp, pp, message):
    with pytest.raises(ValueError, match=message):
        check_parallel_fit(config, tp, pp)
