"""PEFT LoRA adapters with random weights for a generated checkpoint (Llama's layout, GPT-2, BLOOM, Falcon), written
as PEFT saves them.

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
from transformers import AutoConfig

from llmserve.models.falcon import falcon_kv_heads

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
FUSED_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")   # checkpoints that fuse them (Phi-3)


def _modules(config: Any) -> tuple[str, list[tuple[str, str, int, int]]]:
    """The prefix of the family's layers and each adaptable projection as PEFT names it: (name, parent module,
    in features, out features). GPT-2 has two ``c_proj`` (attention and MLP), as PEFT targets them by name."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    if config.model_type == "gpt2":
        inner = config.n_inner or 4 * hidden
        return "transformer.h", [("c_attn", "attn", hidden, 3 * hidden), ("c_proj", "attn", hidden, hidden),
                                 ("c_fc", "mlp", hidden, inner), ("c_proj", "mlp", inner, hidden)]
    if config.model_type in ("bloom", "falcon"):
        kv_heads = heads if config.model_type == "bloom" else falcon_kv_heads(config)
        ffn = getattr(config, "ffn_hidden_size", None) or 4 * hidden
        return "transformer.h", [
            ("query_key_value", "self_attention", hidden, (heads + 2 * kv_heads) * (hidden // heads)),
            ("dense", "self_attention", hidden, hidden), ("dense_h_to_4h", "mlp", hidden, ffn),
            ("dense_4h_to_h", "mlp", ffn, hidden)]
    inter = config.intermediate_size
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    return "model.layers", [("q_proj", "self_attn", hidden, q), ("k_proj", "self_attn", hidden, kv),
                            ("v_proj", "self_attn", hidden, kv), ("o_proj", "self_attn", q, hidden),
                            ("gate_proj", "mlp", hidden, inter), ("up_proj", "mlp", hidden, inter),
                            ("down_proj", "mlp", inter, hidden), ("qkv_proj", "self_attn", hidden, q + 2 * kv),
                            ("gate_up_proj", "mlp", hidden, 2 * inter)]


def _pattern_value(pattern: dict[str, int], module: str, default: int) -> int:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_lora_adapter(path: str | Path, base: str | Path, *, r: int = 8, lora_alpha: float = 16,
                       target_modules: Iterable[str] | None = None, seed: int = 0,
                       std: float = 0.1, use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
                       alpha_pattern: dict[str, float] | None = None, extra_config: dict[str, Any] | None = None
                       ) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for the checkpoint at ``base``;
    ``target_modules`` None: every attention and MLP projection (q/k/v/o/gate/up/down for Llama's layout)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(base)
    layers, modules = _modules(config)
    default = ATTENTION_MODULES + MLP_MODULES if layers == "model.layers" else [name for name, *_ in modules]
    targets = list(dict.fromkeys(default if target_modules is None else target_modules))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name, parent, fan_in, fan_out in (m for m in modules if m[0] in targets):
            module = f"{layers}.{layer}.{parent}.{name}"
            rank = _pattern_value(rank_pattern or {}, module, r)
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
        "lora_alpha": lora_alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
        "use_rslora": use_rslora, "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": config.model_type == "gpt2",   # PEFT sets it for Conv1D projections
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}, "inference_mode": True,
        **(extra_config or {})}
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return path
