"""The worker's adapters: every linear layer wrapped once, weights moved between the CPU and the slots.

Two LRU sets, as vLLM keeps them: adapters read from disk stay on the CPU (at most ``--max-cpu-loras``),
and at most ``--max-loras`` of them sit in the layers' stacked slots. Each step, the adapters its rows use
are made resident (the scheduler never puts more than ``--max-loras`` distinct ones in a step), evicting
the least recently used slot no row of the step needs, and the rows are grouped by slot for every layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from llmserve.layers.linear import LinearBase
from llmserve.lora.layers import LoRABatchState, LoRALinearMethod
from llmserve.lora.peft import LoRAAdapterError, LoRAModuleWeights, load_peft_adapter
from llmserve.lora.punica import LoRABatchMapping
from llmserve.lora.request import LoRARequest

if TYPE_CHECKING:
    from llmserve.lora.graph_inputs import LoRAGraphInputs

# An adapter's weights by wrapped layer name, then by shard id (None: the layer's whole output).
LayerWeights = dict[str, dict[object, LoRAModuleWeights]]


class LoRAModelManager:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_cpu_loras: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.max_loras, self.max_rank, self.max_cpu_loras = max_loras, max_rank, max_cpu_loras
        self.device = device
        self.state = LoRABatchState()
        self.layers: dict[str, LoRALinearMethod] = {}
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                module.quant_method = LoRALinearMethod(module, module.quant_method, self.state, max_loras, max_rank,
                                                       dtype, device)
                self.layers[name] = module.quant_method
        # (fused layer, checkpoint module, shard id), as the model loads its base weights
        self.stacked: tuple[tuple[str, str, object], ...] = getattr(model, "stacked_params", ())
        # how the family names and lays out checkpoint tensors (GPT-2, BLOOM, Falcon rename; BLOOM, Falcon
        # restack the rows of their fused query_key_value)
        self.checkpoint_tensor = getattr(model, "checkpoint_tensor", None)
        self._cpu: OrderedDict[int, LayerWeights] = OrderedDict()
        self._resident: OrderedDict[int, int] = OrderedDict()   # adapter id -> slot, least recently used first
        self._free_slots = list(range(max_loras - 1, -1, -1))

    @property
    def active(self) -> bool:
        """Whether this step has adapter rows (else the model runs as without LoRA, and replays the graphs
        captured without adapters)."""
        return bool(self.state.mapping.segments)

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether adapter steps can be captured: every layer runs the Triton kernels, whose launch grid depends
        only on the batch size (the PyTorch ops' shapes follow the step's segments)."""
        return bool(self.layers) and all(method.use_triton for method in self.layers.values())

    def graph_inputs(self, max_rows: int) -> LoRAGraphInputs:
        """Static segment buffers for decode graphs of up to ``max_rows`` rows."""
        from llmserve.lora.graph_inputs import LoRAGraphInputs

        return LoRAGraphInputs(self.state, self.max_loras, max_rows, self.device)

    @property
    def resident_ids(self) -> list[int]:
        return list(self._resident)

    @property
    def cpu_ids(self) -> list[int]:
        return list(self._cpu)

    def set_active(self, lora_ids: np.ndarray | None, query_lens: list[int],
                   requests: Mapping[int, LoRARequest]) -> None:
        """Make the step's adapters resident and group its rows. ``lora_ids[i]`` is batch row i's adapter id
        (0: the base model; None: no row runs with an adapter), ``requests`` the adapters by id. The work is
        per distinct adapter, never per row."""
        ids, row_index = (np.unique(lora_ids, return_inverse=True) if lora_ids is not None
                          else (np.zeros(1, dtype=np.int64), None))
        wanted = [int(i) for i in ids if i]
        if not wanted:
            self.state.mapping = LoRABatchMapping()
            return
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step uses {len(wanted)} adapters, more than --max-loras {self.max_loras}")
        wanted_set = set(wanted)
        slot_of_id = np.array([-1 if not i else self._slot(requests[int(i)], wanted_set) for i in ids],
                              dtype=np.int64)
        self.state.mapping = LoRABatchMapping.build(slot_of_id[row_index], np.asarray(query_lens, dtype=np.int64),
                                                    self.device)

    def _slot(self, request: LoRARequest, wanted: Collection[int]) -> int:
        slot = self._resident.get(request.lora_int_id)
        if slot is not None:
            self._resident.move_to_end(request.lora_int_id)
            return slot
        weights = self._weights(request)
        if not self._free_slots:
            victim = next(i for i in self._resident if i not in wanted)
            self._free_slots.append(self._resident.pop(victim))
        slot = self._free_slots.pop()
        try:
            for name, method in self.layers.items():
                method.set_slot(slot, weights.get(name, {}), name)
        except BaseException:
            for method in self.layers.values():
                method.clear_slot(slot)
            self._free_slots.append(slot)
            raise
        self._resident[request.lora_int_id] = slot
        return slot

    def _weights(self, request: LoRARequest) -> LayerWeights:
        """The adapter's weights from the CPU set, read from disk (evicting the least recently used) if absent."""
        weights = self._cpu.get(request.lora_int_id)
        if weights is not None:
            self._cpu.move_to_end(request.lora_int_id)
            return weights
        weights = self.map_modules(load_peft_adapter(request.lora_path, self.max_rank).modules, request)
        while len(self._cpu) >= self.max_cpu_loras:
            self._cpu.popitem(last=False)
        self._cpu[request.lora_int_id] = weights
        return weights

    def map_modules(self, modules: dict[str, LoRAModuleWeights], request: LoRARequest) -> LayerWeights:
        """Checkpoint module names onto the wrapped (fused) layers: q/k/v -> qkv_proj, gate/up -> gate_up_proj.
        Each module's B goes through the family's checkpoint mapping as the module's weight does (B's rows are
        the weight's output rows), so renamed modules and restacked fused projections land where their base
        weights did."""
        mapped: LayerWeights = {}
        for original, weights in modules.items():
            module = original
            if self.checkpoint_tensor is not None:
                renamed = self.checkpoint_tensor(f"{original}.lora_B", weights.lora_b)
                if renamed is not None and renamed[0].endswith(".lora_B"):
                    module = renamed[0].removesuffix(".lora_B")
                    weights = LoRAModuleWeights(weights.lora_a, renamed[1])
            target, shard = module, None
            for fused, part, shard_id in self.stacked:
                if module.endswith(f".{part}") and f"{module[:-len(part)]}{fused}" in self.layers:
                    target, shard = f"{module[:-len(part)]}{fused}", shard_id
                    break
            if target not in self.layers:
                raise LoRAAdapterError(f"LoRA adapter {request.lora_name!r} targets {original}, which is not a linear "
                                       "layer of this model that LoRA can adapt")
            mapped.setdefault(target, {})[shard] = weights
        return mapped
