"""MoE routing: each family's switches pick the experts and weights transformers' own routers pick
(Mixtral and Qwen-MoE softmax top-k with and without renormalisation, DeepSeek-V2's grouped top-k by the
best expert of a group, DeepSeek-V3's sigmoid scores with a correction bias that steers the choice but not
the weights, grouped by the sum of a group's best two); bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from llmserve.layers.fused_moe import MoERouter, RoutingConfig

HIDDEN, TOKENS = 32, 40


def by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (ids, weights) in expert-id order, so the order topk returns them in does not matter."""
    ids, order = ids.sort(-1)
    return ids, weights.gather(1, order)


def assert_same_routing(ours: MoERouter, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
        if ours.e_score_correction_bias is not None:
            ours.e_score_correction_bias.copy_(theirs.e_score_correction_bias)
        _, hf_weights, hf_ids = theirs(x)
        weights, ids = ours(x)
    hf_ids, hf_weights = by_expert(hf_weights.float(), hf_ids)
    ids, weights = by_expert(weights, ids)
    torch.testing.assert_close(ids, hf_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, hf_weights, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("experts, top_k", [(7, 1), (7, 2), (5, 4)])
def test_mixtral_softmax_top_k_renormalised(experts, top_k):
    torch.manual_seed(top_k)
    config = MixtralConfig(hidden_size=HIDDEN, num_local_experts=experts, num_experts_per_tok=top_k)
    theirs = MixtralTopKRouter(config)
    torch.nn.init.normal_(theirs.weight)
    ours = MoERouter(HIDDEN, RoutingConfig(experts, top_k, renormalize=True))
    assert_same_routing(ours, theirs, torch.randn(TOKENS, HIDDEN))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen2_moe_softmax_with_and_without_renormalisation(norm_topk_prob):
    torch.manual_seed(1)
    config = Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=9, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob)
    theirs = Qwen2MoeTopKRouter(config)
    torch.nn.init.normal_(theirs.weight)
    ours = MoERouter(HIDDEN, RoutingConfig(9, 3, renormalize=norm_topk_prob))
    assert_same_routing(ours, theirs, torch.randn(TOKENS, HIDDEN))


def test_deepseek_v2_grouped_top_k_by_best_expert_of_a_group():
    torch.manual_seed(2)
    config = DeepseekV2Config(hidden_size=HIDDEN, n_routed_experts=12, num_experts_per_tok=3, n_group=4,
                              topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=2.5)
    theirs = DeepseekV2TopkRouter(config)
    torch.nn.init.normal_(theirs.weight)
    ours = MoERouter(HIDDEN, RoutingConfig(12, 3, num_expert_group=4, topk_group=2, routed_scaling_factor=2.5))
    x = torch.randn(TOKENS, HIDDEN)
    assert_same_routing(ours, theirs, x)
    # the group limit changes the choice for some tokens (else the test would not test it)
    ungrouped = MoERouter(HIDDEN, RoutingConfig(12, 3, routed_scaling_factor=2.5))
    ungrouped.weight.data.copy_(ours.weight)
    assert not torch.equal(ungrouped(x)[1].sort(-1).values, ours(x)[1].sort(-1).values)


def test_deepseek_v3_sigmoid_with_correction_bias_and_grouped_top_k():
    torch.manual_seed(3)
    config = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                              topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    theirs = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(theirs.weight)
    theirs.e_score_correction_bias.normal_(0, 0.5)
    ours = MoERouter(HIDDEN, RoutingConfig(16, 4, scoring="sigmoid", renormalize=True, num_expert_group=4,
                                           topk_group=2, routed_scaling_factor=2.5), correction_bias=True)
    x = torch.randn(TOKENS, HIDDEN)
    assert_same_routing(ours, theirs, x)
    # the bias steers the choice ...
    unbiased = MoERouter(HIDDEN, ours.config, correction_bias=True)
    unbiased.weight.data.copy_(ours.weight)
    assert not torch.equal(unbiased(x)[1].sort(-1).values, ours(x)[1].sort(-1).values)


def test_correction_bias_chooses_experts_but_weights_are_the_scores():
    router = MoERouter(4, RoutingConfig(4, 1, scoring="sigmoid"), correction_bias=True)
    router.weight.data.copy_(torch.eye(4))
    router.e_score_correction_bias.data.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    weights, ids = router(torch.tensor([[3.0, 0.0, 0.0, 0.0]]))
    assert ids.tolist() == [[3]]                               # picked for its bias ...
    torch.testing.assert_close(weights, torch.tensor([[0.5]]))  # ... weighted by sigmoid(0), not by the bias


@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": 4, "top_k": 5}, "num_experts_per_tok"),
    ({"num_experts": 4, "top_k": 0}, "num_experts_per_tok"),
    ({"num_experts": 4, "top_k": 1, "scoring": "relu"}, "scoring"),
    ({"num_experts": 6, "top_k": 1, "num_expert_group": 4, "topk_group": 1}, "equal groups"),
    ({"num_experts": 8, "top_k": 4, "num_expert_group": 4, "topk_group": 1}, "cannot hold"),
    ({"num_experts": 8, "top_k": 2, "num_expert_group": 4}, "both"),
])
def test_bad_routing_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutingConfig(**kwargs)
