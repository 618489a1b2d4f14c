"""Greedy generation through the whole engine (chunked prefill, prefix-cache hits) and its comparison with
transformers, for the tests that check a checkpoint format end to end."""

from __future__ import annotations

from pathlib import Path

from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy

PROMPTS = [[5, 17, 99, 300, 42, 7], list(range(40, 90)), [1500, 3, 3, 3, 800, 12, 77, 901, 4]]
MAX_TOKENS = 8


def engine_greedy(path: Path, **engine_args) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs for :data:`PROMPTS`, each sent twice (the second time from the prefix cache)."""
    llm = LLM(str(path), kv_cache_memory_bytes="8MiB", max_model_len=256, max_num_batched_tokens=32,
              **engine_args)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=0, ignore_eos=True)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS] * 2, params)
    finally:
        llm.shutdown()   # the worker processes of a tensor / pipeline parallel run
    return [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outputs]


def assert_matches_hf(results: list[tuple[list[int], list[float]]], reference: Path, tolerance: float) -> None:
    """Greedy tokens equal to transformers' on ``reference``, logprobs within ``tolerance``."""
    for (tokens, logprobs), prompt in zip(results, PROMPTS * 2):
        ref_tokens, ref_logprobs = hf_greedy(reference, prompt, MAX_TOKENS)
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < tolerance
