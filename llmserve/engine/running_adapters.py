"""How many running sequences use each LoRA adapter, kept up to date as sequences start and stop running,
so that admission under ``max_loras`` checks a waiting sequence's adapter without going over the running
set."""

from __future__ import annotations

from llmserve.engine.sequence import Sequence


def adapter_id(seq: Sequence) -> int | None:
    return seq.lora_request.lora_int_id if seq.lora_request is not None else None


class RunningAdapters:
    """Adapter id -> number of running sequences that use it (base-model sequences are not counted)."""

    def __init__(self, max_loras: int | None) -> None:
        self.max_loras = max_loras
        self.counts: dict[int, int] = {}

    def admits(self, seq: Sequence) -> bool:
        """Whether ``seq`` may start running without its adapter being one more than ``max_loras``."""
        lora_id = adapter_id(seq)
        return (lora_id is None or self.max_loras is None or lora_id in self.counts
                or len(self.counts) < self.max_loras)

    def add(self, seq: Sequence) -> None:
        lora_id = adapter_id(seq)
        if lora_id is not None:
            self.counts[lora_id] = self.counts.get(lora_id, 0) + 1

    def remove(self, seq: Sequence) -> None:
        lora_id = adapter_id(seq)
        if lora_id is None:
            return
        left = self.counts[lora_id] - 1
        if left:
            self.counts[lora_id] = left
        else:
            del self.counts[lora_id]
