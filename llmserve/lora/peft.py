"""Reading PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT stores, per adapted module, ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``; the module's output becomes ``W x + s * B A x`` with
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). ``rank_pattern`` /
``alpha_pattern`` give some modules their own rank / alpha: the rank is the tensors' own, the alpha is
matched as PEFT matches it (:func:`module_alpha`). The scale is folded into B here, once.

Options that change the computation beyond ``B A x`` are refused with the option's name (DoRA,
``modules_to_save``, trained biases, embedding adapters), as is a rank above ``--max-lora-rank``.
``fan_in_fan_out`` (adapters of GPT-2's ``Conv1D`` projections) only says that the base weight is stored
``[in, out]``: PEFT's A and B are ``[r, in]`` and ``[out, r]`` either way, and so is the delta. Pickled ``adapter_model.bin`` files are refused: unpickling runs code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")


class LoRAAdapterError(ValueError):
    """An adapter that is malformed or uses something llmserve does not run."""


class LoRAAdapterNotFoundError(LoRAAdapterError):
    """No adapter at the path (vLLM answers this with 404)."""


@dataclass
class LoRAModuleWeights:
    """One adapted checkpoint module: ``delta = x A^T B^T`` with the scale already in B."""

    lora_a: torch.Tensor   # [r, in]
    lora_b: torch.Tensor   # [out, r], scaled

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class PEFTAdapter:
    path: str
    rank: int                                   # the largest rank of any module
    modules: dict[str, LoRAModuleWeights]       # by checkpoint module name, e.g. model.layers.0.self_attn.q_proj
    fan_in_fan_out: bool = False                # the base weights are stored [in, out] (Conv1D)


def module_alpha(config: dict[str, Any], module: str) -> float:
    """``alpha_pattern``'s alpha for ``module`` (the first key that matches a dotted suffix of its name, as
    PEFT's ``get_pattern_key``), else ``lora_alpha``."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def read_adapter_config(path: str | Path, max_rank: int) -> dict[str, Any]:
    """The adapter's config, checked for what llmserve runs; raises :class:`LoRAAdapterError` (or
    :class:`LoRAAdapterNotFoundError` when there is no adapter at ``path``)."""
    folder = Path(path).expanduser()
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise LoRAAdapterNotFoundError(f"No adapter found for {path}: {CONFIG_FILE} does not exist there")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise LoRAAdapterError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoRAAdapterError(f"{config_file} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAAdapterError(f"{path}: peft_type {peft_type!r} is not supported; only LoRA adapters are")
    if config.get("use_dora"):
        raise LoRAAdapterError(f"{path}: DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        raise LoRAAdapterError(f"{path}: modules_to_save ({config['modules_to_save']}) is not supported: the "
                               "adapter replaces whole modules (e.g. a resized vocabulary), not only low-rank deltas")
    if config.get("bias", "none") != "none":
        raise LoRAAdapterError(f"{path}: bias={config['bias']!r} is not supported (trained biases); use bias='none'")
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r >= 1 for r in ranks):
        raise LoRAAdapterError(f"{path}: r and rank_pattern must be integers >= 1, got {ranks}")
    if max(ranks) > max_rank:
        raise LoRAAdapterError(f"{path}: LoRA rank {max(ranks)} is greater than --max-lora-rank {max_rank}")
    return config


def load_peft_adapter(path: str | Path, max_rank: int) -> PEFTAdapter:
    """Read and check an adapter; the tensors come back in float32 on the CPU, B scaled."""
    config = read_adapter_config(path, max_rank)
    folder = Path(path).expanduser()
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise LoRAAdapterError(f"{path}: adapter_model.bin (pickle) is not loaded; save the adapter with "
                                   "safe_serialization=True (adapter_model.safetensors)")
        raise LoRAAdapterError(f"{path}: {WEIGHTS_FILE} does not exist")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise LoRAAdapterError(f"{weights_file} cannot be read: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        if match is None:
            raise LoRAAdapterError(f"{path}: tensor {key} is not a LoRA A/B weight (embedding adapters, "
                                   "DoRA magnitudes and saved modules are not supported)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise LoRAAdapterError(f"{path}: {WEIGHTS_FILE} holds no LoRA weights")
    modules = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LoRAAdapterError(f"{path}: module {module} has lora_{''.join(pair)} but not its other half")
        a, b = pair["A"].float(), pair["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoRAAdapterError(f"{path}: module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                   "are not [r, in] and [out, r]")
        rank = a.shape[0]
        if rank > max_rank:
            raise LoRAAdapterError(f"{path}: module {module} has rank {rank}, greater than --max-lora-rank "
                                   f"{max_rank}")
        alpha = module_alpha(config, module)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[module] = LoRAModuleWeights(a.contiguous(), (b * scale).contiguous())
    return PEFTAdapter(str(path), max(m.rank for m in modules.values()), modules, bool(config.get("fan_in_fan_out")))
