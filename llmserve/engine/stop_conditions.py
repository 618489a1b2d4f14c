"""When a token just appended ends a sequence, and why (vLLM's order: EOS, stop token ids, length). Stop
strings need text, so the engine's output processing applies them instead."""

from __future__ import annotations

from llmserve.engine.sequence import Sequence
from llmserve.sampling_params import SamplingParams


def stop_token_ids(params: SamplingParams, eos_token_id: int | None) -> list[int]:
    """The tokens that end a sequence once its ``min_tokens`` are met: EOS unless ignored, its stop token ids."""
    eos = [] if eos_token_id is None or params.ignore_eos else [eos_token_id]
    return eos + list(params.stop_token_ids or ())


def stops_on_token(seq: Sequence, token: int) -> bool:
    """Whether ``token``, just appended, is an EOS or stop token that ends ``seq`` (never before min_tokens,
    unless a grammar ends there: the sampler lets a constrained sequence take a stop token under min_tokens
    only where its grammar allows nothing else)."""
    params = seq.params
    if len(seq.output_token_ids) < params.min_tokens and params.structured_outputs is None:
        return False
    return token in stop_token_ids(params, seq.eos_token_id)


def check_token_stop(seq: Sequence, token: int, max_model_len: int | None) -> None:
    """Set ``seq.finish_reason`` (and ``stop_reason`` for a stop token id) when ``token`` ends ``seq``."""
    if stops_on_token(seq, token):
        seq.finish_reason = "stop"
        if token != seq.eos_token_id or seq.params.ignore_eos:
            seq.stop_reason = token   # a stop token id; EOS has no stop_reason
    elif len(seq.output_token_ids) >= seq.max_tokens or (
            max_model_len is not None and seq.num_tokens >= max_model_len):
        seq.finish_reason = "length"
