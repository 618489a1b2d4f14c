"""Mixture-of-experts GGUF files: Mixtral (which llama.cpp writes as a ``llama`` with ``expert_count``),
Qwen2-MoE (``qwen2moe``), Qwen3-MoE (``qwen3moe``) and DeepSeek-V2/V3 (``deepseek2``); Gemma 4 (``gemma4``),
whose checkpoints stack their experts as the file does, loads each stack whole, or, packed, each expert's rows
of it (:func:`whole_stack_experts`).

llama.cpp stacks a layer's experts into one tensor per projection (``blk.N.ffn_gate_exps.weight``,
``[experts, rows, columns]``); they are handed to the model one expert at a time under a Hugging Face
checkpoint's names (``block_sparse_moe.experts.E.w1`` for Mixtral, ``mlp.experts.E.gate_proj`` for Qwen and
DeepSeek), and the router (``ffn_gate_inp``) under its own. On CPU the experts of a layer whose stacks are all in
packed types stay packed as the dense layers do (:mod:`llmserve.quantization.gguf`), each expert its own rows of
blocks; otherwise they load dequantised into the model's dtype. The config gets what transformers' GGUF mapping
drops and llama.cpp reads or hard-codes: Mixtral's experts, the Qwen experts' width and shared expert, and whether
the routing weights are renormalised (llama.cpp: yes for Mixtral and Qwen3-MoE, no for Qwen2-MoE; DeepSeek's
config, routing included, is read whole from its keys by :mod:`~llmserve.model_loader.gguf_deepseek`). Other
architectures with stacked experts (GPT-OSS...) are refused, naming the architecture.
"""

from __future__ import annotations

import inspect
import re
from typing import Any


# llama.cpp architecture -> (the sparse block's name in the checkpoint, an expert's gate / up / down names,
# whether llama.cpp renormalises the top-k routing weights; None: deepseek2's expert_weights_norm says, read with
# the rest of its config by gguf_deepseek, which moe_config is not applied to)
MOE_ARCHITECTURES = {"llama": ("block_sparse_moe", ("w1", "w3", "w2"), True),
                     "qwen2moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), False),
                     "qwen3moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), True),
                     "deepseek2": ("mlp", ("gate_proj", "up_proj", "down_proj"), None)}
# Architectures whose checkpoints stack their experts as llama.cpp does: a stack loads whole, or packed per expert.
WHOLE_STACKS = ("gemma4",)
_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_ROUTER = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$")
_EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe\.|mlp\.)?experts\.\d+\.\w+\.weight$")
# Gemma 4's stacks: gate and up fused, as its checkpoints hold them
_WHOLE_STACK = re.compile(r"^blk\.(\d+)\.ffn_(gate_up|down)_exps\.weight$")


def check_experts(architecture: str, file_name: str, tensor_names: list[str]) -> None:
    """Refuse a file with stacked experts of an architecture this module does not map."""
    stacked = next((name for name in tensor_names if "_exps." in name), None)
    if stacked is not None and architecture not in MOE_ARCHITECTURES and architecture not in WHOLE_STACKS:
        raise ValueError(f"{file_name} is a mixture-of-experts {architecture} model (its experts are stacked "
                         f"tensors such as {stacked}); llmserve loads the experts of GGUF files of "
                         f"{', '.join(sorted([*MOE_ARCHITECTURES, *WHOLE_STACKS]))} (Mixtral as llama, DeepSeek-V2/V3 "
                         f"as deepseek2) only: serve its Hugging Face checkpoint instead")


def is_moe_tensor(name: str) -> bool:
    """A layer's stacked experts or its router (named by :func:`moe_names`; the router is never packed)."""
    return bool(_EXPERTS.match(name) or _ROUTER.match(name))


def moe_names(architecture: str, name: str, count: int) -> list[str]:
    """The Hugging Face names of a stacked-experts tensor's ``count`` experts (in order), or of a router."""
    block, (gate, up, down), _ = MOE_ARCHITECTURES[architecture]
    router = _ROUTER.match(name)
    if router:
        return [f"model.layers.{router[1]}.{block}.gate.weight"]
    layer, kind = _EXPERTS.match(name).groups()
    projection = {"gate": gate, "up": up, "down": down}[kind]
    return [f"model.layers.{layer}.{block}.experts.{expert}.{projection}.weight" for expert in range(count)]


def stacked_experts_layer(name: str) -> int | None:
    """The layer of a stacked-experts tensor (``blk.3.ffn_up_exps.weight``, Gemma 4's ``blk.3.ffn_gate_up_exps``:
    3); None for any other tensor."""
    match = _EXPERTS.match(name) or _WHOLE_STACK.match(name)
    return int(match[1]) if match else None


def whole_stack_experts(name: str, stack: Any) -> list[tuple[str, Any]] | None:
    """A Gemma 4 stack as each expert's projections (``model.layers.N.experts.E.gate_proj``, ``up_proj``: the
    first and second half of its fused rows; ``down_proj``), for its experts to load packed; None for any other
    tensor. ``stack``: [experts, rows, ...] (a row's blocks as bytes, or values)."""
    match = _WHOLE_STACK.match(name)
    if match is None:
        return None
    layer, kind = match.groups()
    prefix = f"model.layers.{layer}.experts"
    if kind == "down":
        return [(f"{prefix}.{e}.down_proj", rows) for e, rows in enumerate(stack)]
    half = stack.shape[1] // 2
    return [(f"{prefix}.{e}.{projection}", rows[part]) for e, rows in enumerate(stack)
            for projection, part in (("gate_proj", slice(0, half)), ("up_proj", slice(half, None)))]


def expert_layer(name: str) -> int | None:
    """The layer of an expert's tensor as :func:`moe_names` names it; None for any other name."""
    match = _EXPERT_NAME.match(name)
    return int(match[1]) if match else None


def moe_config(config: Any, meta: Any) -> Any:
    """The config with what the file says of its experts (``meta``: the file's metadata); a ``llama`` with
    experts becomes a Mixtral config. Any other config is returned as it is."""
    experts = meta.arch_field("expert_count")
    if meta.arch not in MOE_ARCHITECTURES or not experts:
        return config
    renormalise = MOE_ARCHITECTURES[meta.arch][2]
    if meta.arch == "llama":
        from transformers import MixtralConfig

        accepted = inspect.signature(MixtralConfig.__init__).parameters
        fields = {k: v for k, v in config.to_dict().items() if k in accepted}
        config = MixtralConfig(**{**fields, "sliding_window": None, "num_local_experts": int(experts),
                                  "num_experts_per_tok": int(meta.arch_field("expert_used_count"))})
        config.architectures = ["MixtralForCausalLM"]
        return config
    config.norm_topk_prob = renormalise
    width = meta.arch_field("expert_feed_forward_length")
    if width:
        config.moe_intermediate_size = int(width)
    if meta.arch == "qwen2moe":
        shared = meta.arch_field("expert_shared_feed_forward_length")
        if not shared:   # older converters: the shared expert's width from its tensor
            tensor = next(iter(meta.tensors("blk.0.ffn_up_shexp.")), None)
            shared = int(tensor.shape[-1]) if tensor is not None else 0
        config.shared_expert_intermediate_size = int(shared)
    return config
