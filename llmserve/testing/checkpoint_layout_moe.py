"""The tensors of the mixture-of-experts checkpoints (layout ``moe``): Llama's, with the MLP of each sparse layer
replaced by a router and one tensor per expert and projection, named as ``save_pretrained`` and the hub write them
(Mixtral: ``block_sparse_moe.gate`` and ``experts.{e}.w1/w2/w3``; Qwen-MoE: ``mlp.gate``,
``experts.{e}.gate_proj/up_proj/down_proj`` and, with a ``shared_expert_intermediate_size``, ``shared_expert.*``
and ``shared_expert_gate``). The MoE settings are the family's config keys (``extra_config``, and a size's own in ``size_overrides``).

The router's scale gives logits with a standard deviation of about 1.5 across experts: tokens spread over the
experts, and a token's top-k rarely hinges on float rounding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from llmserve.models.qwen2_moe import is_sparse_layer

from .checkpoint_layouts import TensorSpec, _inv, llama_tensors, normal

if TYPE_CHECKING:
    from llmserve.testing.checkpoint_families import FamilySpec, SizeSpec

ROUTER_LOGIT_STD = 1.5
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")


def _sparse_block(fam: FamilySpec, sz: SizeSpec, moe: Mapping[str, Any], layer: int) -> list[TensorSpec]:
    h = sz.hidden_size
    mixtral = fam.model_type == "mixtral"
    num_experts = moe["num_local_experts"] if mixtral else moe["num_experts"]
    inter = sz.intermediate_size if mixtral else moe["moe_intermediate_size"]
    prefix = f"model.layers.{layer}.{'block_sparse_moe' if mixtral else 'mlp'}."
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    specs = [TensorSpec(prefix + "gate.weight", (num_experts, h), normal(ROUTER_LOGIT_STD * _inv(h)))]
    for e in range(num_experts):
        specs += [TensorSpec(f"{prefix}experts.{e}.{gate}.weight", (inter, h), normal(_inv(h))),
                  TensorSpec(f"{prefix}experts.{e}.{up}.weight", (inter, h), normal(_inv(h))),
                  TensorSpec(f"{prefix}experts.{e}.{down}.weight", (h, inter), normal(fam.branch_gain * _inv(inter)))]
    shared = moe.get("shared_expert_intermediate_size", 0)
    if shared:
        specs += [TensorSpec(prefix + "shared_expert.gate_proj.weight", (shared, h), normal(_inv(h))),
                  TensorSpec(prefix + "shared_expert.up_proj.weight", (shared, h), normal(_inv(h))),
                  TensorSpec(prefix + "shared_expert.down_proj.weight", (h, shared),
                             normal(fam.branch_gain * _inv(shared))),
                  TensorSpec(prefix + "shared_expert_gate.weight", (1, h), normal(_inv(h)))]
    return specs


def moe_tensors(fam: FamilySpec, sz: SizeSpec, head_dim: int, moe: Mapping[str, Any]) -> list[TensorSpec]:
    """Llama's tensors with each sparse layer's dense MLP swapped for its sparse block (Mixtral: every layer;
    Qwen-MoE: transformers' ``decoder_sparse_step`` / ``mlp_only_layers`` rule); ``moe``: the config keys."""
    config = SimpleNamespace(**{"num_experts": 1, **moe})   # Mixtral's every layer is sparse
    specs = []
    for spec in llama_tensors(fam, sz, head_dim):
        dense = _DENSE_MLP.match(spec.name)
        if dense and is_sparse_layer(config, int(dense.group(1))):
            if dense.group(2) == "gate":
                specs += _sparse_block(fam, sz, moe, int(dense.group(1)))
            continue
        specs.append(spec)
    return specs
