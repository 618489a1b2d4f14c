"""PEFT LoRA adapters with random weights for a generated (Llama-layout) checkpoint, written as PEFT saves them.

PEFT starts B at zero; here both A and B are random so that every adapter visibly changes the output, and
each seed gives a different adapter. ``rank_pattern``/``alpha_pattern`` give matching modules their own
rank/alpha, as PEFT reads them. ``extra_config`` adds keys to ``adapter_config.json`` as they are (tests
of options llmserve refuses).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
FUSED_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")   # checkpoints that fuse them (Phi-3)


def _module_shapes(config: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """Each adaptable projection's (parent module, in features, out features)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return {"q_proj": ("self_attn", hidden, heads * head_dim), "k_proj": ("self_attn", hidden, kv_heads * head_dim),
            "v_proj": ("self_attn", hidden, kv_heads * head_dim), "o_proj": ("self_attn", heads * head_dim, hidden),
            "gate_proj": ("mlp", hidden, inter), "up_proj": ("mlp", hidden, inter), "down_proj": ("mlp", inter, hidden),
            "qkv_proj": ("self_attn", hidden, (heads + 2 * kv_heads) * head_dim),
            "gate_up_proj": ("mlp", hidden, 2 * inter)}


def _pattern_value(pattern: dict[str, int], module: str, default: int) -> int:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_lora_adapter(path: str | Path, base: str | Path, *, r: int = 8, lora_alpha: float = 16,
                       target_modules: Iterable[str] = ATTENTION_MODULES + MLP_MODULES, seed: int = 0,
                       std: float = 0.1, use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
                       alpha_pattern: dict[str, float] | None = None, extra_config: dict[str, Any] | None = None
                       ) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for the checkpoint at ``base``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(base) / "config.json").read_text())
    shapes = _module_shapes(config)
    targets = list(target_modules)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name in targets:
            parent, fan_in, fan_out = shapes[name]
            module = f"model.layers.{layer}.{parent}.{name}"
            rank = _pattern_value(rank_pattern or {}, module, r)
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
        "lora_alpha": lora_alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
        "use_rslora": use_rslora, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}, "inference_mode": True,
        **(extra_config or {})}
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return path
