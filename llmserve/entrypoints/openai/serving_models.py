"""The names a client may put in ``model``: the base model's served names and its LoRA adapters.

Adapters come from ``--lora-modules`` (``name=path`` or vLLM's JSON form ``{"name": .., "path": ..,
"base_model_name": ..}``) and, when runtime updating is allowed (``--allow-runtime-lora-updating`` or vLLM's
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), from ``POST /v1/load_lora_adapter``; ``/v1/unload_lora_adapter``
forgets one. An adapter is read and checked when it is registered (its options, its rank against
``--max-lora-rank``, its modules and shapes against the base checkpoint: :mod:`llmserve.lora.fit`), so a bad
one is refused then (400, or 404 when there is nothing at its path) and never reaches a request. Each
registration gets a new adapter id: requests already running keep the weights they started with, and a name
loaded again with other weights never shares their prefix cache or worker slots.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

from llmserve.entrypoints.openai.errors import APIError
from llmserve.entrypoints.openai.request_base import RequestModel
from llmserve.entrypoints.openai.server_args import LoRAModulePath
from llmserve.lora.fit import AdapterChecker
from llmserve.lora.peft import LoRAAdapterError, LoRAAdapterNotFoundError
from llmserve.lora.request import LoRARequest

class OpenAIServingModels:
    def __init__(self, base_model_names: list[str], model_path: str, max_model_len: int, enable_lora: bool,
                 adapters: AdapterChecker, lora_modules: list[LoRAModulePath] = ()) -> None:
        """``adapters``: the engine front end's checker (an adapter registered here is not read again for its
        first request). Raises ValueError naming a bad ``--lora-modules`` entry (the server does not start)."""
        self.base_model_names = base_model_names
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.enable_lora = enable_lora
        self.adapters = adapters
        self.lora_requests: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()   # loads read files off the event loop
        for module in lora_modules:
            try:
                self.load_adapter(module.name, module.path, module.base_model_name)
            except APIError as exc:
                raise ValueError(f"--lora-modules {module.name}: {exc.message}") from None

    def resolve(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for an unknown name."""
        if model is None or model in self.base_model_names:
            return None
        lora = self.lora_requests.get(model)
        if lora is None:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        return lora

    def model_cards(self) -> list[dict[str, Any]]:
        created = int(time.time())
        cards = [{"id": name, "object": "model", "created": created, "owned_by": "llmserve", "root": self.model_path,
                  "parent": None, "max_model_len": self.max_model_len} for name in self.base_model_names]
        cards += [{"id": lora.lora_name, "object": "model", "created": created, "owned_by": "llmserve",
                   "root": lora.lora_path, "parent": lora.base_model_name or self.base_model_names[0],
                   "max_model_len": self.max_model_len} for lora in list(self.lora_requests.values())]
        return cards

    def load_adapter(self, name: str | None, path: str | None, base_model_name: str | None = None) -> LoRARequest:
        """Read, check and register an adapter under ``name`` (vLLM's errors and statuses)."""
        if not name or not path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", None)
        if not self.enable_lora:
            raise APIError(400, "LoRA is not enabled: start the server with --enable-lora", "lora_name")
        if name in self.base_model_names or name in self.lora_requests:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name",
                           "lora_already_loaded")
        try:
            self.adapters.check(path, name)
        except LoRAAdapterNotFoundError as exc:
            raise APIError(404, str(exc), "lora_path", "lora_not_found") from None
        except LoRAAdapterError as exc:
            raise APIError(400, str(exc), "lora_path", "invalid_lora_adapter") from None
        with self._lock:
            if name in self.lora_requests:
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name",
                               "lora_already_loaded")
            lora = LoRARequest(name, next(self._ids), str(Path(path).expanduser()), base_model_name)
            self.lora_requests[name] = lora
        return lora

    def unload_adapter(self, name: str | None, lora_int_id: int | None = None) -> None:
        if not name:
            raise APIError(400, "'lora_name' must be provided.", "lora_name")
        with self._lock:
            lora = self.lora_requests.get(name)
            if lora is None or (lora_int_id is not None and lora_int_id != lora.lora_int_id):
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "lora_not_found")
            del self.lora_requests[name]
        self.adapters.forget(lora.lora_path)


class LoadLoRAAdapterRequest(RequestModel):
    lora_name: str | None = None
    lora_path: str | None = None


class UnloadLoRAAdapterRequest(RequestModel):
    lora_name: str | None = None
    lora_int_id: int | None = None   # vLLM's field: when given, it must be the adapter's id
