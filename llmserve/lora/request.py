"""Which adapter a request runs with, as vLLM names it: ``LoRARequest(lora_name, lora_int_id, lora_path)``.

It travels with the request from the front end to the engine core and the workers (a msgspec struct, so
it crosses process boundaries as plain values). ``lora_int_id`` identifies the adapter's weights: it must
be >= 1 and two requests with the same id must mean the same adapter (the workers cache weights by it,
and the prefix cache keeps different ids apart).
"""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")
        if not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r} has no lora_path")

    # vLLM's aliases
    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path

    def hash_key(self) -> bytes:
        """What the prefix cache mixes into the block hashes of this adapter's requests."""
        return b"lora:%d:%s" % (self.lora_int_id, self.lora_path.encode())
