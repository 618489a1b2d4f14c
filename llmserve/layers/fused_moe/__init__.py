"""The fused mixture-of-experts layer every MoE family shares: a router (:mod:`.router`), experts stored
stacked and sharded (:mod:`.layer`), the quantisation seam for experts (:mod:`.method`) and the grouped
computation: each expert's GEMM over its tokens, all experts in one compiled call per projection on CPU
(:mod:`.grouped_experts`), a Triton grouped GEMM on
GPU (:mod:`.triton_grouped_gemm`, imported only there). A family adds its own shared experts around it."""

from llmserve.layers.fused_moe.layer import MIXTRAL_EXPERT_NAMES, ExpertNames, FusedMoE, expert_checkpoint_target
from llmserve.layers.fused_moe.method import FusedMoEMethodBase, UnquantizedFusedMoEMethod
from llmserve.layers.fused_moe.router import MoERouter, RoutingConfig, select_experts

__all__ = ["MIXTRAL_EXPERT_NAMES", "ExpertNames", "FusedMoE", "FusedMoEMethodBase", "MoERouter", "RoutingConfig",
           "UnquantizedFusedMoEMethod", "expert_checkpoint_target", "select_experts"]
