"""Whether an adapter fits the base model, checked where an adapter is registered (``--lora-modules``,
``POST /v1/load_lora_adapter``) so that a mismatch is refused there, never in a running batch.

The base model's modules and weight shapes come from its checkpoint's safetensors headers (no tensor is
read). Every module an adapter targets must be one of them and a linear layer LoRA adapts (not the LM head, an
embedding or a norm), and its ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` must match the module's weight
``[out, in]`` (``[in, out]`` for a ``fan_in_fan_out`` adapter:
GPT-2's Conv1D). Quantised checkpoints store packed tensors
(``qweight``): their modules are checked for presence only. A GGUF file or an S3 mirror has no such headers
here; adapters for them are checked where a worker loads them (the request then fails on its own).
"""

from __future__ import annotations

import threading
from pathlib import Path

from safetensors import safe_open

from llmserve.lora.peft import LoRAAdapterError, PEFTAdapter, load_peft_adapter
from llmserve.model_loader.loader import safetensors_files

# A module's weight shape ([out, in] for a linear layer), or None where the checkpoint stores it packed (quantised).
ModuleShapes = dict[str, tuple[int, ...] | None]
# Modules with a 2-D weight that are not linear layers LoRA adapts here: the LM head and the embeddings.
_NOT_ADAPTABLE = ("lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe", "word_embeddings")


def base_module_shapes(model_path: str | Path) -> ModuleShapes | None:
    """Each checkpoint module that has a weight, by name (``model.layers.0.self_attn.q_proj``); None when the
    checkpoint is not a folder of safetensors files."""
    try:
        files = safetensors_files(Path(model_path))
    except OSError:   # no safetensors here (ModelNotFoundError)
        return None
    shapes: ModuleShapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                if leaf == "weight":
                    shapes[module] = tuple(f.get_slice(key).get_shape())
                elif leaf in ("qweight", "weight_packed"):
                    shapes.setdefault(module, None)
    return shapes


def check_adapter_fits(adapter: PEFTAdapter, shapes: ModuleShapes, name: str) -> None:
    """Raise :class:`LoRAAdapterError` naming a module of adapter ``name`` that the base model lacks (checked
    first: an adapter for another family) or whose LoRA shapes do not match its weight."""
    found = {module: _lookup(shapes, module) for module in adapter.modules}
    missing = [module for module, entry in found.items() if entry is None]
    if missing:
        raise LoRAAdapterError(f"LoRA adapter {name!r} targets {missing[0]}, which is not a module of the base model"
                               + (f" (nor are {len(missing) - 1} more of its modules)" if len(missing) > 1 else ""))
    for module, weights in adapter.modules.items():
        shape = found[module][1]
        if module.rpartition(".")[2] in _NOT_ADAPTABLE or (shape is not None and len(shape) != 2):
            raise LoRAAdapterError(f"LoRA adapter {name!r} targets {module}, which is not a linear layer LoRA can "
                                   f"adapt (the LM head, the embeddings and norms are not)")
        if shape is None:
            continue
        out_features, in_features = shape[::-1] if adapter.fan_in_fan_out else shape
        if weights.lora_a.shape[1] != in_features or weights.lora_b.shape[0] != out_features:
            raise LoRAAdapterError(
                f"LoRA adapter {name!r} does not fit the base model: {module} has lora_A "
                f"{list(weights.lora_a.shape)} and lora_B {list(weights.lora_b.shape)}, but the base weight is "
                f"[{out_features}, {in_features}] (expected lora_A [r, {in_features}], lora_B [{out_features}, r])")


def _lookup(shapes: ModuleShapes, module: str) -> tuple[str, tuple[int, ...] | None] | None:
    """The module's entry; checkpoints saved without the model's top-level prefix (``h.0.attn`` for
    ``transformer.h.0.attn``) match without it."""
    for candidate in (module, module.partition(".")[2]):
        if candidate in shapes:
            return candidate, shapes[candidate]
    return None


class AdapterChecker:
    """A front end's check of adapters before a request may use them: readable, within ``max_rank`` and fitting
    the base model. Each path is read once (a registered adapter is not read again for its first request; the
    worker reads it when it loads it); the base model's shapes are read at the first adapter. Thread-safe."""

    def __init__(self, model_path: str | Path, max_rank: int) -> None:
        self.model_path = model_path
        self.max_rank = max_rank
        self._base_shapes: ModuleShapes | None = None
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    def check(self, path: str, name: str) -> None:
        """Raise :class:`LoRAAdapterError` (:class:`LoRAAdapterNotFoundError` for a missing folder) unless the
        adapter at ``path`` may run on this base model. The files are read outside the lock: a registration
        reading a large adapter in a thread does not hold up the admission of requests for checked ones."""
        key = str(Path(path).expanduser())
        with self._lock:
            if key in self._checked:
                return
        adapter = load_peft_adapter(path, self.max_rank)
        shapes = self._shapes()
        if shapes:
            check_adapter_fits(adapter, shapes, name)
        with self._lock:
            self._checked.add(key)

    def forget(self, path: str) -> None:
        """The adapter at ``path`` was unloaded: a later registration of that path reads it again."""
        with self._lock:
            self._checked.discard(str(Path(path).expanduser()))

    def _shapes(self) -> ModuleShapes:
        if self._base_shapes is None:
            self._base_shapes = base_module_shapes(self.model_path) or {}   # the same for any thread that races
        return self._base_shapes
