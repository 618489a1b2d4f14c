"""The fused MoE layer: its grouped computation equals the per-token reference (top-k 1, 2 and more, experts
that receive no token, no tokens at all); per-expert checkpoint tensors (hub names and Mixtral's) and
transformers 5's fused ones load into the same stacked weights; at simulated tensor-parallel ranks the
shards compose to the unsharded layer, with experts split over the intermediate dimension or, with expert
parallelism, whole experts per rank (evenly or not); mis-shaped tensors and unusable quantisation methods are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmserve.layers.fused_moe import MIXTRAL_EXPERT_NAMES, FusedMoE, MoERouter, RoutingConfig, expert_checkpoint_target
from llmserve.layers.fused_moe.grouped_experts import grouped_experts
from llmserve.layers.linear import WeightShapeError
from llmserve.quantization.base import QuantizationConfig
from llmserve.quantization.unquantized import UnquantizedLinearMethod
from tests.layers.fused_moe.reference import per_token_moe, random_routing
from tests.parallel_sim import as_rank, run_ranks, simulated_groups

E, H, I = 7, 48, 40


def expert_tensors(num_experts: int = E, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Per expert, its unsharded gate [I, H], up [I, H] and down [H, I] projections."""
    gen = torch.Generator().manual_seed(seed)
    return {e: {"gate": torch.randn(I, H, generator=gen) / H ** 0.5, "up": torch.randn(I, H, generator=gen) / H ** 0.5,
                "down": torch.randn(H, I, generator=gen) / I ** 0.5} for e in range(num_experts)}


def load_per_expert(layer: FusedMoE, tensors: dict[int, dict[str, torch.Tensor]]) -> None:
    for e, t in tensors.items():
        layer.weight_loader(layer.w13_weight, t["gate"], (e, "w1"))
        layer.weight_loader(layer.w13_weight, t["up"], (e, "w3"))
        layer.weight_loader(layer.w2_weight, t["down"], (e, "w2"))


def stacked(tensors: dict[int, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.stack([torch.cat([t["gate"], t["up"]]) for t in tensors.values()])
    return w13, torch.stack([t["down"] for t in tensors.values()])


@pytest.mark.parametrize("compiled_rows", [True, False])   # sorting and combining in C, or with PyTorch ops
@pytest.mark.parametrize("tokens, top_k, used", [
    (1, 1, None), (13, 1, 3), (13, 2, None), (29, 2, 4), (17, 3, None), (9, 7, None), (0, 2, None)])
def test_grouped_experts_match_the_per_token_reference(monkeypatch, tokens, top_k, used, compiled_rows):
    from llmserve.layers.fused_moe import grouped_experts as module

    if not compiled_rows:
        monkeypatch.setattr(module, "cpu_moe_kernels", lambda: None)
    w13, w2 = stacked(expert_tensors())
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens))
    weights, ids = random_routing(tokens, E, top_k, used, seed=top_k)
    layer_act = FusedMoE(E, H, I).act_fn
    out = grouped_experts(x, w13, w2, weights, ids, layer_act)
    assert out.shape == (tokens, H)
    torch.testing.assert_close(out.double(), per_token_moe(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_experts_without_tokens_run_no_gemm(monkeypatch):
    from llmserve.layers.fused_moe import grouped_experts as module

    w13, w2 = stacked(expert_tensors())
    weights, ids = random_routing(11, E, 2, used_experts=3)
    seen = []
    original = module.apply_linear
    monkeypatch.setattr(module, "apply_linear", lambda x, w, b: seen.append(x.shape[0]) or original(x, w, b))
    grouped_experts(torch.randn(11, H), w13, w2, weights, ids, FusedMoE(E, H, I).act_fn)
    assert len(seen) == 2 * len(set(ids.flatten().tolist())) <= 2 * 3   # gate/up + down per expert with rows
    assert sum(seen) == 2 * 11 * 2                                        # every (token, slot) row once per GEMM


def test_per_expert_mixtral_and_fused_checkpoint_tensors_load_the_same_weights():
    tensors = expert_tensors()
    per_expert = FusedMoE(E, H, I)
    load_per_expert(per_expert, tensors)
    w13, w2 = stacked(tensors)
    torch.testing.assert_close(per_expert.w13_weight, w13, rtol=0, atol=0)
    torch.testing.assert_close(per_expert.w2_weight, w2, rtol=0, atol=0)
    fused = FusedMoE(E, H, I)
    fused.weight_loader(fused.w13_weight, w13, None)
    fused.weight_loader(fused.w2_weight, w2, None)
    assert torch.equal(fused.w13_weight, w13) and torch.equal(fused.w2_weight, w2)


@pytest.mark.parametrize("name, names, expected", [
    ("model.layers.3.mlp.experts.5.gate_proj.weight", None, ("model.layers.3.mlp.experts.w13_weight", (5, "w1"))),
    ("model.layers.3.mlp.experts.5.up_proj.weight", None, ("model.layers.3.mlp.experts.w13_weight", (5, "w3"))),
    ("model.layers.3.mlp.experts.12.down_proj.weight", None, ("model.layers.3.mlp.experts.w2_weight", (12, "w2"))),
    ("model.layers.0.mlp.experts.1.down_proj.weight_scale", None,
     ("model.layers.0.mlp.experts.w2_weight_scale", (1, "w2"))),
    ("model.layers.0.block_sparse_moe.experts.2.w1.weight", MIXTRAL_EXPERT_NAMES,
     ("model.layers.0.block_sparse_moe.experts.w13_weight", (2, "w1"))),
    ("model.layers.0.block_sparse_moe.experts.2.w3.weight", MIXTRAL_EXPERT_NAMES,
     ("model.layers.0.block_sparse_moe.experts.w13_weight", (2, "w3"))),
    ("model.layers.0.block_sparse_moe.experts.2.w2.weight", MIXTRAL_EXPERT_NAMES,
     ("model.layers.0.block_sparse_moe.experts.w2_weight", (2, "w2"))),
    ("model.layers.1.mlp.experts.gate_up_proj", None, ("model.layers.1.mlp.experts.w13_weight", None)),
    ("model.layers.1.mlp.experts.down_proj", None, ("model.layers.1.mlp.experts.w2_weight", None)),
    ("model.layers.1.mlp.shared_expert.gate_proj.weight", None, None),
    ("model.layers.1.mlp.gate.weight", None, None),
])
def test_checkpoint_names_map_onto_the_stacked_parameters(name, names, expected):
    args = (name,) if names is None else (name, names)
    assert expert_checkpoint_target(*args) == expected


def test_tensor_parallel_shards_compose_to_the_unsharded_layer():
    tensors = expert_tensors()
    x = torch.randn(19, H)
    weights, ids = random_routing(19, E, 2, used_experts=5)
    whole = FusedMoE(E, H, I)
    load_per_expert(whole, tensors)
    expected = whole(x, weights, ids)

    layers = []
    for group in simulated_groups(2):   # built one after the other: the groups are read at build time
        with as_rank(tp=group):
            layers.append(FusedMoE(E, H, I))
        load_per_expert(layers[-1], tensors)
        assert layers[-1].w13_weight.shape == (E, 2 * I // 2, H) and layers[-1].w2_weight.shape == (E, H, I // 2)
    for out in run_ranks([lambda layer=layer: layer(x, weights, ids) for layer in layers]):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ep", [2, 3])   # 7 experts: 4 + 3, and 3 + 2 + 2
def test_expert_parallel_ranks_hold_whole_experts_and_compose_to_the_unsharded_layer(ep):
    tensors = expert_tensors()
    x = torch.randn(19, H)
    weights, ids = random_routing(19, E, 3)
    whole = FusedMoE(E, H, I)
    load_per_expert(whole, tensors)
    expected = whole(x, weights, ids)

    layers = []
    for group in simulated_groups(ep):
        with as_rank(tp=group, expert_parallel=True):
            layer = FusedMoE(E, H, I)
        load_per_expert(layer, tensors)   # every rank is offered every expert and keeps its own
        start, count = layer.expert_start, layer.num_local_experts
        assert layer.w13_weight.shape == (count, 2 * I, H) and layer.w2_weight.shape == (count, H, I)
        assert torch.equal(layer.w2_weight, whole.w2_weight[start:start + count])
        assert {e for e, _ in layer.w13_weight.shard_ids} == set(range(start, start + count))
        layers.append(layer)
    ranges = [(layer.expert_start, layer.num_local_experts) for layer in layers]
    assert ranges == ([(0, 4), (4, 3)] if ep == 2 else [(0, 3), (3, 2), (5, 2)])
    for out in run_ranks([lambda layer=layer: layer(x, weights, ids) for layer in layers]):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_slots_of_experts_held_elsewhere_add_nothing():
    w13, w2 = stacked(expert_tensors())
    weights, ids = random_routing(10, E, 2)
    remote = ids >= 4   # experts 4..6 on another rank: id E here
    out = grouped_experts(torch.ones(10, H), w13[:4], w2[:4], weights, ids.masked_fill(remote, 4),
                          FusedMoE(E, H, I).act_fn)
    expected = per_token_moe(torch.ones(10, H), w13, w2, weights.masked_fill(remote, 0.0), ids)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_moe_block_routes_then_runs_the_experts():
    torch.manual_seed(0)
    tensors = expert_tensors()
    router = MoERouter(H, RoutingConfig(E, 2, renormalize=True))
    router.weight.data.normal_()
    layer = FusedMoE(E, H, I)
    load_per_expert(layer, tensors)
    x = torch.randn(23, H)
    weights, ids = router(x)
    w13, w2 = stacked(tensors)
    torch.testing.assert_close(layer(x, weights, ids).double(), per_token_moe(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


def test_experts_blocked_for_the_cpu_kernels_give_the_same_output():
    from llmserve.layers.cpu_kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("the CPU kernels do not build here")
    layer = FusedMoE(E, H, I)
    load_per_expert(layer, expert_tensors())
    x = torch.randn(21, H)
    weights, ids = random_routing(21, E, 2, used_experts=5)
    expected = layer(x, weights, ids)
    layer.process_weights_after_loading()
    assert layer.w13_weight.shape == (E, 2 * I // 16, H, 16) and layer.w2_weight.shape == (E, H // 16, I, 16)
    torch.testing.assert_close(layer(x, weights, ids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x[:1], weights[:1], ids[:1]), expected[:1], atol=1e-5, rtol=1e-5)


def test_bf16_experts_blocked_for_the_cpu_kernels_match_the_reference():
    from llmserve.layers.cpu_kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("the CPU kernels do not build here")
    tensors = {e: {name: t.bfloat16() for name, t in ts.items()} for e, ts in expert_tensors().items()}
    layer = FusedMoE(E, H, I, params_dtype=torch.bfloat16)
    load_per_expert(layer, tensors)
    layer.process_weights_after_loading()
    assert layer.w13_weight.shape == (E, 2 * I // 16, H // 2, 16, 2)
    x = torch.randn(37, H).bfloat16()
    weights, ids = random_routing(37, E, 2, used_experts=6)
    out = layer(x, weights, ids)
    w13, w2 = stacked(tensors)
    assert out.dtype == torch.bfloat16
    # Each of gate/up, the activation, down and the combine rounds to bfloat16 once.
    torch.testing.assert_close(out.double(), per_token_moe(x, w13, w2, weights, ids), atol=2e-2, rtol=2e-2)


def test_blocked_experts_run_one_grouped_gemm_per_projection(monkeypatch):
    from llmserve.layers.cpu_moe_kernels import CPUMoEKernels, cpu_moe_kernels

    if cpu_moe_kernels() is None:
        pytest.skip("the CPU kernels do not build here")
    layer = FusedMoE(E, H, I)
    load_per_expert(layer, expert_tensors())
    layer.process_weights_after_loading()
    calls = []
    original = CPUMoEKernels.grouped_linear
    monkeypatch.setattr(CPUMoEKernels, "grouped_linear",
                        lambda self, x, w, offsets: calls.append(x.shape[0]) or original(self, x, w, offsets))
    weights, ids = random_routing(11, E, 2)
    layer(torch.randn(11, H), weights, ids)
    assert calls == [22, 22]   # gate/up, then down, each over every expert's rows at once


def test_mis_shaped_tensors_and_unknown_experts_are_refused():
    layer = FusedMoE(E, H, I)
    with pytest.raises(WeightShapeError):
        layer.weight_loader(layer.w13_weight, torch.zeros(I, H + 1), (0, "w1"))
    with pytest.raises(WeightShapeError):
        layer.weight_loader(layer.w2_weight, torch.zeros(I, H), (0, "w2"))
    with pytest.raises(WeightShapeError):
        layer.weight_loader(layer.w13_weight, torch.zeros(E + 1, 2 * I, H), None)
    with pytest.raises(ValueError, match="expert 7"):
        layer.weight_loader(layer.w13_weight, torch.zeros(I, H), (7, "w1"))
    with pytest.raises(ValueError, match="not divisible"), as_rank(tp=simulated_groups(3)[0]):
        FusedMoE(E, H, I)
    with pytest.raises(ValueError, match="cannot distribute 7 experts over 8"), \
            as_rank(tp=simulated_groups(8)[0], expert_parallel=True):
        FusedMoE(E, H, I)


class LinearOnlyConfig(QuantizationConfig):
    def get_name(self) -> str:
        return "linear-only"

    def get_quant_method(self, layer: nn.Module, prefix: str):
        return UnquantizedLinearMethod()


def test_a_quantisation_method_that_cannot_run_experts_is_refused():
    with pytest.raises(TypeError, match="FusedMoEMethodBase"):
        FusedMoE(E, H, I, quant_config=LinearOnlyConfig(), prefix="model.layers.0.mlp.experts")
