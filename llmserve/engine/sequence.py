"""The unit the scheduler works on: one sample of one request, with its tokens and KV progress.

vLLM V1's single scheduling rule: a sequence has ``num_tokens`` known tokens (prompt + generated) and
``num_computed_tokens`` whose K/V are in the cache. Each step closes part of the gap; when the gap is
closed, the model's last logits give the next token. Prefill, chunked prefill, decode and recompute
after preemption are all the same rule. A pooling (embedding) sequence follows it too, but only for its
prompt: when the gap closes it finishes with its pooled vector instead of a token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from llmserve.config import PoolerConfig
from llmserve.lora.request import LoRARequest
from llmserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int                       # sample index within its request (0..n-1)
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int                  # params.max_tokens resolved against the context length
    eos_token_id: int | None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # One block table per KV-cache group (llmserve.engine.block_manager), all of one length: entry i holds
    # positions i * block_size onwards in that group's layers. Empty while the sequence holds no blocks.
    block_tables: list[list[int]] = field(default_factory=list)
    # Per group, the leading entries handed back because no future query of the group's layers can see them
    # (sliding window): placeholders, kept so that entry i still holds positions i * block_size onwards
    num_released: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # chained hashes of full blocks (prefix cache)
    num_published_blocks: int = 0                              # full blocks already offered to the cache
    num_cached_tokens: int = 0                                 # prompt tokens served by the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    # What the workers hold of this sequence (they are told only what changed since): whether they hold it
    # at all, how many of its tokens and how many entries of its block table.
    on_workers: bool = False
    num_sent_tokens: int = 0
    num_sent_blocks: int = 0
    suspect: bool = False              # was in a step that failed; runs alone until a step of its own succeeds
    pending_forks: list[Sequence] = field(default_factory=list)   # samples 2..n, forked when its prompt is done
    extra_hash_keys: bytes = b""       # mixed into its prefix-cache block hashes (a cache salt, an adapter)
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    pooling: PoolerConfig | None = None          # a pooling request: pool the prompt, sample nothing
    pooled_sum: np.ndarray | None = None         # the pooled shares of its computed tokens (llmserve.layers.pooler)
    lora_request: LoRARequest | None = None      # the adapter it runs with (None: the base model)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def needs_every_prompt_position(self) -> bool:
        """Whether the model's output at every prompt position is used (prompt logprobs, mean or first-token
        pooling), so no position may be skipped as a prefix-cache hit."""
        return self.params.prompt_logprobs is not None or (
            self.pooling is not None and self.pooling.needs_every_position)

    @property
    def block_table(self) -> list[int]:
        """The first group's block table (the only one of a model whose attention layers all see alike)."""
        return self.block_tables[0] if self.block_tables else []

    @property
    def num_released_blocks(self) -> int:
        """The first group's released entries."""
        return self.num_released[0] if self.num_released else 0

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
