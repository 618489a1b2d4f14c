"""The only things that cross the engine core's two boundaries.

Front end -> core: an :class:`EngineCoreRequest` (tokenised and validated) or an abort; core -> front
end: :class:`EngineCoreOutputs` (each sample's new tokens, logprobs and finish, each finished pooling
request's vector, plus the scheduler's stats). Core -> workers: one step's plan, :class:`SchedulerOutput`;
each worker patches its own copy of the running sequences from it (new sequences in full, the others as
deltas) and the driver worker answers with a :class:`ModelRunnerOutput`. All are msgspec structs of plain
values, so the same objects pass in process (no copy) or as msgpack bytes between processes (no pickle of
anything a client sent).
"""

from __future__ import annotations

import msgspec

from llmserve.config import PoolerConfig
from llmserve.lora.request import LoRARequest
from llmserve.sampling_params import SamplingParams


class NewSequenceData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A sequence the workers do not hold yet: a fresh one, or one resumed after preemption or a failed step."""

    seq_id: int
    sample_index: int                 # which of the request's n samples (seeds differ per sample)
    prompt_token_ids: list[int]
    output_token_ids: list[int]       # generated so far (non-empty when resumed after a preemption)
    params: SamplingParams
    eos_token_id: int | None
    block_ids: list[list[int]]        # its block table in each KV-cache group
    num_computed_tokens: int
    pooling: PoolerConfig | None = None   # set for a pooling (embedding) request: its prompt is pooled, not sampled
    lora_request: LoRARequest | None = None   # the adapter it runs with (None: the base model)


class CachedSequenceData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A sequence the workers hold: what changed since the step that last scheduled it."""

    seq_id: int
    new_token_ids: list[int]          # appended to its tokens (usually the one sampled last step)
    block_table_start: int            # its block tables from this index on are replaced by new_block_ids
    new_block_ids: list[list[int]]    # per KV-cache group
    num_computed_tokens: int


class ForkData(msgspec.Struct, array_like=True):
    """A parallel sample that shares its parent's prompt and draws its first token from the parent's logits."""

    seq_id: int
    sample_index: int


class SchedulerOutput(msgspec.Struct, omit_defaults=True):
    """One step, as the workers need it."""

    new_seqs: list[NewSequenceData] = []
    cached_seqs: list[CachedSequenceData] = []
    num_scheduled_tokens: dict[int, int] = {}          # seq_id -> tokens computed this step
    block_copies: list[tuple[int, int]] = []           # (src, dst) copy-on-write before the step
    forks: dict[int, list[ForkData]] = {}              # parent seq_id -> samples forked when its prompt completes
    finished_seq_ids: list[int] = []                   # forget these (finished, aborted, preempted or reset)
    # seq_id -> draft tokens checked this step (llmserve.spec_decode): they follow its known tokens and are
    # counted in its num_scheduled_tokens; its logits are sampled at each of them and at its last token
    scheduled_spec_decode_tokens: dict[int, list[int]] = {}
    # a draft model under adaptive speculation: seq_id -> how many drafts to make after this step (absent: k)
    num_drafts_after_step: dict[int, int] = {}
    # multi-step decoding (--num-scheduler-steps): every row decodes this many tokens, each fed back as the
    # next one's input; its KV-cache slots are allocated for all of them (llmserve.worker.multi_step)
    num_steps: int = 1

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprobs at one position: the chosen token's, its rank, and the top-k alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class ModelRunnerOutput(msgspec.Struct, omit_defaults=True):
    """What one step produced: a token per sampled sequence, logprobs where asked, and failed sequences."""

    sampled: dict[int, int] = {}                                   # seq_id -> new token
    logprobs: dict[int, TokenLogprobs] = {}                        # seq_id -> its logprobs
    # A sequence with drafts: how many leading drafts were accepted (each emitted before ``sampled``), and
    # their logprobs where asked
    num_accepted_drafts: dict[int, int] = {}
    draft_logprobs: dict[int, list[TokenLogprobs]] = {}
    # seq_id -> tokens a draft model proposes to follow the sequence's tokens after this step (checked next step)
    draft_token_ids: dict[int, list[int]] = {}
    # a multi-step step: seq_id -> the tokens sampled before ``sampled``, in order (each fed back: its K/V computed)
    multi_step_tokens: dict[int, list[int]] = {}
    # seq_id -> (first position p, logprobs of prompt tokens p+1, p+2, ...)
    prompt_logprobs: dict[int, tuple[int, list[TokenLogprobs]]] = {}
    # seq_id -> this step's share of its pooled vector (float32 little-endian bytes): the sum of the final
    # hidden states of the positions it pools that this step computed (see llmserve.layers.pooler)
    pooled: dict[int, bytes] = {}
    # set when the step failed as a whole: nothing of it is committed, every sequence in it is suspect
    error: str | None = None


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the front end has tokenised and validated; the core makes its ``params.n`` sequences."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int                    # params.max_tokens resolved against the context length
    eos_token_id: int | None
    arrival_time: float                # time.monotonic() (one clock for every process of the machine)
    cache_salt: str | None = None
    pooling: PoolerConfig | None = None   # a pooling request (params unused, max_tokens 0): pool its prompt
    # Besides the tokens, what decides the K/V its prompt's blocks hold (mixed into their prefix-cache hashes):
    # "longrope:long" for a LongRoPE prompt over the switch length (llmserve.layers.longrope).
    kv_variant: str | None = None
    lora_request: LoRARequest | None = None   # the adapter it runs with (also part of its prefix-cache hashes)


class SampleOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one step did to one sample (sequence) of a request."""

    request_id: str
    index: int
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] = []          # one per new token, when the request asked for them
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0                  # prompt tokens the prefix cache served


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    """The core's gauges and counters after a step (the front end's /metrics reads these)."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    kv_cache_waste: float = 0.0
    # speculative decoding, since start: steps with drafts, drafts, accepted drafts, accepted at each position
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = []
    running_lora_adapters: list[str] = []       # names of the adapters running requests use (LoRA on)
    waiting_lora_adapters: list[str] = []       # names of the adapters waiting requests ask for


class BlockMap(msgspec.Struct):
    """Where the KV cache's blocks stand, for the dashboard's grid: consecutive block ids grouped in cells of
    ``blocks_per_cell``; per cell, the blocks in use and the free blocks that still hold a cached prefix
    (the rest are free and empty). Cells bound the message whatever the cache's size."""

    blocks_per_cell: int
    in_use: list[int]
    cached: list[int]


class AbortDelay(msgspec.Struct, array_like=True):
    """How long an abort that stopped a request waited in the engine core before its KV blocks were freed:
    the steps the core finished meanwhile (at most the one in flight when it came) and the seconds."""

    steps: int
    seconds: float


class EngineCoreOutputs(msgspec.Struct, omit_defaults=True):
    """One step's results for the front end."""

    samples: list[SampleOutput] = []
    # request id -> (first position p, logprobs of prompt tokens p+1, ...)
    prompt_logprobs: list[tuple[str, int, list[TokenLogprobs]]] = []
    failed: dict[str, str] = {}                 # request id -> why the model failed on it
    pooled: dict[str, bytes] = {}               # request id -> its pooled vector (float32 little-endian), finished
    stats: SchedulerStats | None = None
    num_scheduled_tokens: int = 0               # prompt and generation tokens the step computed
    block_map: BlockMap | None = None           # only in the answer to a block-map request
    aborts: list[AbortDelay] = []               # the aborts applied since the previous message


_encoder = msgspec.msgpack.Encoder()
_decoders = {cls: msgspec.msgpack.Decoder(cls)
             for cls in (SchedulerOutput, ModelRunnerOutput, EngineCoreRequest, EngineCoreOutputs)}


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, cls: type[msgspec.Struct]) -> msgspec.Struct:
    return _decoders[cls].decode(data)
