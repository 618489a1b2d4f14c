"""``--quantization int8|fp8`` quantise a full-precision checkpoint while loading, and the choice of quantisation
(a checkpoint's own config, the flag, and the two contradicting) is made clearly.

int8 is W8A8 (per-channel weights, per-token activations), fp8 weight-only e4m3: both are checked against
the PyTorch reference of their arithmetic (kernels off) within 1e-3 in logprobs, and against the float
model within the rounding they add (int8 rounds weights and activations: logits within 0.75; fp8 weights
with 3 mantissa bits: 1.0).
"""

from __future__ import annotations

import logging

import pytest
import torch

from llmserve.config import EngineConfig
from llmserve.model_loader.loader import load_config, load_model
from llmserve.quantization import packed
from llmserve.quantization.checkpoint_params import CheckpointFormatError
from llmserve.quantization.online import OnlineFusedMoEMethod, OnlineQuantMethod
from llmserve.quantization.registry import get_quantization_config
from tests.engine_greedy import PROMPTS, engine_greedy
from tests.model_helpers import CPU, PROMPT, load_tiny, prefill_logits

LONG_PROMPT = PROMPT + list(range(100, 140))


def _load(path, quantization):
    return load_model(load_config(path), path, torch.float32, CPU, quantization)


@pytest.mark.parametrize("scheme,tolerance", [("int8", 0.75), ("fp8", 1.0)])
def test_load_time_quantisation_matches_its_reference_and_stays_near_float(llama_dir, monkeypatch, scheme,
                                                                             tolerance):
    model = _load(llama_dir, scheme)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer.quant_method, OnlineQuantMethod) and not hasattr(layer, "weight")
    stored = layer.w8_weight if scheme == "int8" else layer.wq_codes
    assert stored.dtype == (torch.int8 if scheme == "int8" else torch.uint8) and stored.shape[0] == 64
    assert type(model.lm_head.quant_method).__name__ == "UnquantizedLinearMethod"
    ours = prefill_logits(model, LONG_PROMPT)
    float_logits = prefill_logits(load_tiny(llama_dir), LONG_PROMPT)
    assert (ours - float_logits).abs().max() < tolerance
    monkeypatch.setattr(packed, "kernels_for", lambda t: None)
    torch.testing.assert_close(ours.log_softmax(-1), prefill_logits(model, LONG_PROMPT).log_softmax(-1),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("scheme,tolerance", [("int8", 0.03), ("fp8", 0.06)])
def test_mixture_of_experts_experts_are_quantised_each_on_its_own(checkpoint_dir, monkeypatch, scheme, tolerance):
    """Same tokens, same routing: the quantised experts' output is within the relative error their rounding adds
    (int8 weights and activations: 3%; fp8 weights: 6%). Whole-model logits are not compared with float: a
    rounding that flips one token's top-k choice changes that token's output by a whole expert."""
    path = checkpoint_dir("mixtral")
    model = _load(path, scheme)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.quant_method, OnlineFusedMoEMethod) and not hasattr(experts, "w13_weight")
    assert len(experts.w13_experts) == experts.num_local_experts
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32       # the router stays in float
    float_experts = load_tiny(path).model.layers[0].mlp.experts
    x = torch.randn(40, experts.hidden_size, generator=torch.Generator().manual_seed(0))
    topk_ids = torch.randint(0, experts.num_local_experts, (40, 2), generator=torch.Generator().manual_seed(1))
    topk_weights = torch.rand(40, 2, generator=torch.Generator().manual_seed(2))
    ours = experts.quant_method.apply(experts, x, topk_weights, topk_ids, experts.act_fn)
    expected = float_experts.quant_method.apply(float_experts, x, topk_weights, topk_ids, float_experts.act_fn)
    assert ((ours - expected).norm() / expected.norm()) < tolerance
    logits = prefill_logits(model, LONG_PROMPT)
    monkeypatch.setattr(packed, "kernels_for", lambda t: None)
    torch.testing.assert_close(logits.log_softmax(-1), prefill_logits(model, LONG_PROMPT).log_softmax(-1),
                               atol=1e-3, rtol=0)


def test_the_flag_reaches_the_engine(llama_dir):
    results = engine_greedy(llama_dir, quantization="int8")
    tokens = [t for t, _ in results]
    assert tokens[:3] == tokens[3:]                       # prefix-cache hits give the same greedy output
    assert results[0][0][0] == int(prefill_logits(_load(llama_dir, "int8"), PROMPTS[0])[-1].argmax())


def test_tensor_parallel_ranks_quantise_their_own_shards(llama_dir):
    from tests.parallel_sim import as_rank, run_ranks, simulated_groups

    ranks = []
    for group in simulated_groups(2):
        with as_rank(tp=group):
            ranks.append(_load(llama_dir, "fp8"))
    float_logits = prefill_logits(load_tiny(llama_dir), PROMPT)
    for logits in run_ranks([lambda m=m: prefill_logits(m, PROMPT) for m in ranks]):
        assert (logits - float_logits).abs().max() < 1.0


def test_the_choice_is_logged_and_contradictions_are_refused(llama_dir, quantized, caplog):
    gptq, _ = quantized("gptq")
    with caplog.at_level(logging.INFO, logger="llmserve.quantization.registry"):
        assert get_quantization_config(load_config(gptq), None).get_name() == "gptq"
        assert get_quantization_config(load_config(gptq), "gptq").get_name() == "gptq"
    assert "Quantisation: gptq(4-bit, group 32" in caplog.text
    with pytest.raises(ValueError, match="--quantization int8 contradicts the checkpoint, which is gptq-quantised"):
        _load(gptq, "int8")
    with pytest.raises(ValueError, match="--quantization awq names a checkpoint format, but this checkpoint has no"):
        _load(llama_dir, "awq")
    config = load_config(gptq)
    config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(CheckpointFormatError, match="quantised with 'bitsandbytes', which llmserve does not read"):
        get_quantization_config(config, None)
    with pytest.raises(ValueError, match="unknown --quantization 'int4'"):
        EngineConfig(quantization="int4")
    assert get_quantization_config(load_config(llama_dir), None) is None


def test_the_flag_reaches_the_engine_config():
    import argparse

    from llmserve.entrypoints.cli_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args(["-q", "int8"])).quantization == "int8"
    assert engine_config_from_args(parser.parse_args(["--quantization", "awq"])).quantization == "awq"
    assert engine_config_from_args(parser.parse_args([])).quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "bitsandbytes"])
