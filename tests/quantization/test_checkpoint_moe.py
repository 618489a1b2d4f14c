"""Mixture-of-experts checkpoints quantised by GPTQ, AWQ and compressed-tensors: each expert's tensors load into
stacked parameters, repack per expert (codes, scales, zeros, column order) and run grouped by expert through
the dense layers' quantised kernels; the router and Qwen2-MoE's shared-expert gate stay in float.

* Weight-only schemes (GPTQ 4/8-bit, groups or one group, sym/asym, v1/v2 zeros, act-order ``g_idx`` per expert;
  AWQ gemm; compressed-tensors W4A16): transformers on the dequantised float twin is the oracle, greedy tokens
  equal and logprobs within 1e-3 through the engine (chunked prefill, prefix-cache hits), on Mixtral
  (``w1/w3/w2``, top-2), Qwen2-MoE (top-1, a quantised shared expert), Qwen3-MoE (top-3) and DeepSeek.
* One layer on chosen routing (top-1 to top-3, experts with no token, no tokens): the per-token float64 loop
  over the twin's weights.
* transformers with the ``compressed-tensors`` package decompresses the compressed-tensors experts to the twin's.
* Activation-quantised schemes (W8A8 int8, FP8 dynamic and static): the PyTorch reference of their arithmetic
  (kernels off), logprobs within 1e-3; their experts within the activation rounding of the float experts.
* Expert parallelism (each rank keeps its whole experts) and tensor parallelism (each rank a slice of every
  expert's intermediate dimension): the ranks sum to the whole layer.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.layers.fused_moe import MIXTRAL_EXPERT_NAMES, ExpertNames, FusedMoE, expert_checkpoint_target
from llmserve.model_loader.loader import load_config
from llmserve.models.llama import CheckpointMismatchError
from llmserve.quantization import QuantizationConfig, packed
from llmserve.quantization.checkpoint_moe import CheckpointFusedMoEMethod
from llmserve.quantization.compressed_tensors import CTFP8Method, CTPackedMethod, CTW8A8Method
from llmserve.quantization.gptq import GPTQConfig, GPTQLinearMethod
from llmserve.quantization.registry import get_quantization_config
from llmserve.quantization.unquantized import UnquantizedLinearMethod
from tests.engine_greedy import assert_matches_hf, engine_greedy
from tests.layers.fused_moe.reference import per_token_moe, random_routing
from tests.model_helpers import PROMPT, load_tiny, prefill_logits
from tests.parallel_sim import as_rank, run_ranks, simulated_groups

LONG_PROMPT = PROMPT + list(range(100, 140))
QWEN3_MOE_LAYER = "model.layers.1.mlp"   # qwen3_moe: 9 experts of 32, top-3, hidden 64
HUB_EXPERT_NAMES = ExpertNames()        # gate_proj, up_proj, down_proj


@pytest.mark.parametrize("fmt,family,options", [
    ("gptq", "mixtral", {}),
    ("gptq", "qwen2_moe", {"desc_act": True, "sym": False}),
    ("gptq", "qwen3_moe", {"bits": 8, "v2": True, "group_size": -1}),
    ("awq", "qwen3_moe", {}),
    ("ct-w4a16", "mixtral", {}),
    ("gptq", "deepseek_v2_lite", {"desc_act": True}),
    ("ct-w4a16", "deepseek_v3", {}),
])
def test_weight_only_experts_match_transformers_on_the_dequantised_checkpoint(quantized, fmt, family, options):
    path, reference = quantized(fmt, family, **options)
    assert_matches_hf(engine_greedy(path), reference, 1e-3)


def test_experts_are_packed_per_expert_and_routers_stay_float(quantized):
    path, _ = quantized("gptq", "qwen2_moe", desc_act=True, sym=False)
    block = load_tiny(path).model.layers[0].mlp
    experts = block.experts
    assert isinstance(experts.quant_method, CheckpointFusedMoEMethod)
    assert isinstance(experts.quant_method.linear_method, GPTQLinearMethod)
    assert not any(name.startswith(("w13_", "w2_")) for name, _ in experts.named_parameters(recurse=False))
    assert len(experts.w13_experts) == len(experts.w2_experts) == 7
    gate_up, down = experts.w13_experts[3], experts.w2_experts[3]
    assert gate_up.wq_codes.shape == (64, 32) and gate_up.wq_codes.dtype == torch.uint8   # 2 x 32 rows, 64 inputs
    assert down.wq_codes.shape == (64, 16)                                                 # 64 rows, 32 inputs
    perms = [expert.wq_perm for expert in experts.w13_experts]
    assert all(p is not None and sorted(p.tolist()) == list(range(64)) for p in perms)
    assert not torch.equal(perms[0], perms[1])                  # each expert's own act-order
    assert isinstance(block.shared_expert.gate_up_proj.quant_method, GPTQLinearMethod)
    assert isinstance(block.shared_expert_gate.quant_method, UnquantizedLinearMethod)
    assert block.gate.weight.dtype == torch.float32


def _twin_experts(reference, layer: str, num_experts: int,
                  names: ExpertNames = HUB_EXPERT_NAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """The dequantised twin's experts of ``layer``, stacked as ``w13`` [E, 2I, H] and ``w2`` [E, H, I]."""
    tensors = load_file(reference / "model.safetensors")
    w = {(e, p): tensors[f"{layer}.experts.{e}.{p}.weight"] for e in range(num_experts)
         for p in (names.gate, names.up, names.down)}
    return (torch.stack([torch.cat([w[e, names.gate], w[e, names.up]]) for e in range(num_experts)]),
            torch.stack([w[e, names.down] for e in range(num_experts)]))


def _config(path) -> QuantizationConfig:
    return get_quantization_config(load_config(path), None)


def _experts_layer(path, quant_config) -> FusedMoE:
    """qwen3_moe's sparse layer built from ``quant_config`` and loaded tensor by tensor from ``path``."""
    layer = FusedMoE(9, 64, 32, quant_config=quant_config, prefix=f"{QWEN3_MOE_LAYER}.experts")
    params = dict(layer.named_parameters())
    for name, tensor in load_file(path / "model.safetensors").items():
        if name.startswith(f"{QWEN3_MOE_LAYER}.experts."):
            target, shard = expert_checkpoint_target(name)
            param = params[target.rpartition(".")[2]]
            param.weight_loader(param, tensor, shard)
    layer.process_weights_after_loading()
    return layer


@pytest.mark.parametrize("fmt,options", [("gptq", {"desc_act": True}), ("awq", {}), ("ct-w4a16", {})])
@pytest.mark.parametrize("tokens,top_k,used", [(13, 3, 4), (29, 2, None), (11, 1, 3), (1, 3, None), (0, 3, None)])
def test_one_layer_matches_the_per_token_loop_over_the_twin(quantized, fmt, options, tokens, top_k, used):
    path, reference = quantized(fmt, "qwen3_moe", **options)
    layer = _experts_layer(path, _config(path))
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
    weights, ids = random_routing(tokens, 9, top_k, used, seed=top_k)
    expected = per_token_moe(x, *_twin_experts(reference, QWEN3_MOE_LAYER, 9), weights, ids)
    torch.testing.assert_close(layer(x, weights, ids).double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ranks,expert_parallel,options", [
    (2, True, {"desc_act": True}),                 # 9 experts: 5 + 4
    (3, True, {"desc_act": True}),                 # 3 + 3 + 3
    (2, False, {"bits": 8, "group_size": -1}),     # every expert's 32 intermediate rows as 16 + 16
])
def test_ranks_sum_to_the_whole_quantised_layer(quantized, ranks, expert_parallel, options):
    """Expert parallelism: each rank holds whole experts; tensor parallelism: each rank a slice of every expert
    (gate/up rows, down columns: one group, as groups of 32 cannot split 32 columns over two ranks)."""
    path, reference = quantized("gptq", "qwen3_moe", **options)
    x = torch.randn(17, 64, generator=torch.Generator().manual_seed(0))
    weights, ids = random_routing(17, 9, 3, seed=1)
    layers = []
    for group in simulated_groups(ranks):
        with as_rank(tp=group, expert_parallel=expert_parallel):
            layers.append(_experts_layer(path, _config(path)))
        assert len(layers[-1].w13_experts) == layers[-1].num_local_experts
        assert layers[-1].w2_experts[0].wq_in == (32 if expert_parallel else 32 // ranks)
    expected = per_token_moe(x, *_twin_experts(reference, QWEN3_MOE_LAYER, 9), weights, ids)
    for out in run_ranks([lambda layer=layer: layer(x, weights, ids) for layer in layers]):
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt,family,layer,experts", [
    ("ct-w4a16", "mixtral", "model.layers.0.block_sparse_moe", 5),
    ("ct-fp8-static", "mixtral", "model.layers.1.block_sparse_moe", 5),
    ("ct-fp8-dynamic", "qwen2_moe", "model.layers.2.mlp", 7)])
def test_transformers_with_compressed_tensors_decompresses_the_experts_to_the_twin(quantized, fmt, family, layer,
                                                                                   experts):
    """The real library reads the experts the packer wrote (transformers 5 fuses them into ``gate_up_proj`` and
    ``down_proj``): their dequantised values are the twin's, up to its half-precision arithmetic. (Not W8A8: the
    int8 experts' decompressed tensors do not reach transformers' expert fusion, which fails to load them.)"""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path, reference = quantized(fmt, family)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    state = model.state_dict()
    names = MIXTRAL_EXPERT_NAMES if family == "mixtral" else HUB_EXPERT_NAMES
    w13, w2 = _twin_experts(reference, layer, experts, names)
    hf_layer = layer.replace(".block_sparse_moe", ".mlp")
    torch.testing.assert_close(state[f"{hf_layer}.experts.gate_up_proj"].float(), w13, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(state[f"{hf_layer}.experts.down_proj"].float(), w2, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("fmt,family,method", [("ct-w8a8", "qwen2_moe", CTW8A8Method),
                                               ("ct-fp8-dynamic", "mixtral", CTFP8Method),
                                               ("ct-fp8-static", "qwen3_moe", CTFP8Method)])
def test_activation_quantised_experts_match_their_reference_arithmetic(quantized, monkeypatch, fmt, family, method):
    path, _ = quantized(fmt, family)
    model = load_tiny(path)
    sparse = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    assert isinstance(sparse.experts.quant_method.linear_method, method)
    ours = prefill_logits(model, LONG_PROMPT).log_softmax(-1)
    monkeypatch.setattr(packed, "kernels_for", lambda t: None)
    torch.testing.assert_close(ours, prefill_logits(model, LONG_PROMPT).log_softmax(-1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("fmt,tolerance", [("ct-w8a8", 0.03), ("ct-fp8-dynamic", 0.06), ("ct-fp8-static", 0.06)])
def test_activation_quantised_experts_stay_within_their_rounding_of_the_twin(quantized, fmt, tolerance):
    """Same tokens, same routing: the experts' output within the relative error activation rounding adds (int8:
    3%; float8 e4m3: 6%). Whole-model logits are not compared: a flipped top-k choice changes a whole expert."""
    path, reference = quantized(fmt, "qwen3_moe")
    layer = _experts_layer(path, _config(path))
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    weights, ids = random_routing(40, 9, 3, used_experts=6)
    expected = per_token_moe(x, *_twin_experts(reference, QWEN3_MOE_LAYER, 9), weights, ids)
    assert ((layer(x, weights, ids).double() - expected).norm() / expected.norm()) < tolerance


def test_ignore_and_modules_to_not_convert_leave_experts_float(quantized):
    path, _ = quantized("ct-w4a16", "qwen3_moe")
    prefix = f"{QWEN3_MOE_LAYER}.experts"
    config = _config(path)
    assert isinstance(FusedMoE(9, 64, 32, quant_config=config, prefix=prefix).quant_method.linear_method,
                      CTPackedMethod)
    config.ignore.append("re:.*mlp.experts$")
    assert type(FusedMoE(9, 64, 32, quant_config=config, prefix=prefix).quant_method).__name__ == \
        "UnquantizedFusedMoEMethod"
    gptq = GPTQConfig(4, 32, False, True, False, modules_to_not_convert=["mlp.experts"])
    assert type(FusedMoE(9, 64, 32, quant_config=gptq, prefix=prefix).quant_method).__name__ == \
        "UnquantizedFusedMoEMethod"


def test_missing_and_misshapen_expert_tensors_are_named(quantized, tmp_path):
    import shutil

    path, _ = quantized("gptq", "mixtral")
    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.scales"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing tensors: model.layers.1.mlp.experts.w13_scales \(shard \(3, 'w3'\)\)"):
        load_tiny(copy)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.2.w2.qzeros"
    tensors[name] = tensors[name][:, :4].contiguous()
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"experts.2.w2.qzeros: .*shape \(2, 4\) but the model expects"):
        load_tiny(copy)
