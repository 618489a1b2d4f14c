"""Speculative decoding with the target on two tensor-parallel ranks (a worker process per rank, gloo): n-gram and
suffix drafts (made in the engine core) and a draft model sharded like the target (each rank holds its share of
the draft's heads and weights; the driver's sampling decides acceptance once and hands it to the other rank before
the draft's collective forwards). Greedy output is the single-rank output without speculation; a seeded sampled
request is what one rank gives with the same draft; the target drafting for itself accepts nearly every draft,
which holds only if each rank's share of the draft's K/V is right. A draft run whole on one rank under a sharded
target, and a draft under pipeline parallelism, are refused."""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams
from llmserve.config import EngineConfig
from tests.spec_decode.test_draft_model import K, assert_accepts_nearly_all
from tests.spec_decode.test_spec_equivalence import NGRAM, assert_idle_and_accepting, completions, make_llm

SEEDED = SamplingParams(temperature=0.8, top_k=20, max_tokens=24, ignore_eos=True, seed=5)


@pytest.fixture(scope="module")
def greedy_one_rank(llama_dir):
    llm = make_llm(llama_dir, spec=False)
    try:
        return completions(llm)
    finally:
        llm.shutdown()


def tp2(path, spec: dict) -> LLM:
    return make_llm(path, spec=False, tensor_parallel_size=2, distributed_executor_backend="mp",
                    speculative_config=spec)


def draft(path) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": K}


@pytest.mark.parametrize("spec", [NGRAM, {"method": "suffix", "num_speculative_tokens": 4}], ids=["ngram", "suffix"])
def test_drafts_from_the_engine_core_keep_greedy_output(llama_dir, greedy_one_rank, spec):
    llm = tp2(llama_dir, spec)
    try:
        assert completions(llm) == greedy_one_rank
        assert_idle_and_accepting(llm)
    finally:
        llm.shutdown()


def test_the_target_as_its_own_sharded_draft_accepts_everything(llama_dir, greedy_one_rank):
    llm = tp2(llama_dir, draft(llama_dir))
    try:
        assert llm.engine.config.speculative_config.draft_tensor_parallel_size == 2
        assert completions(llm) == greedy_one_rank
        assert_accepts_nearly_all(llm)
    finally:
        llm.shutdown()


def test_a_smaller_sharded_draft_keeps_greedy_and_seeded_output(llama_dir, small_draft_dir, greedy_one_rank):
    one_rank = make_llm(llama_dir, spec=False, speculative_config=draft(small_draft_dir))
    try:
        seeded_one_rank = completions(one_rank, SEEDED)
    finally:
        one_rank.shutdown()
    llm = tp2(llama_dir, draft(small_draft_dir))
    try:
        assert completions(llm) == greedy_one_rank
        assert completions(llm, SEEDED) == seeded_one_rank
        stats = llm.engine.scheduler.spec_stats
        assert stats.num_drafts > 0 and stats.num_draft_tokens <= K * stats.num_drafts
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kwargs, message", [
    ({"tensor_parallel_size": 2, "speculative_config": {"model": "/models/draft", "num_speculative_tokens": 2,
                                                         "draft_tensor_parallel_size": 1}},
     r"draft_tensor_parallel_size 1 with the target on 2 tensor-parallel rank\(s\): .* must be 2"),
    ({"tensor_parallel_size": 2, "speculative_config": {"model": "/models/draft", "num_speculative_tokens": 2,
                                                         "draft_tensor_parallel_size": 4}},
     "draft_tensor_parallel_size 4 with the target on 2"),
    ({"pipeline_parallel_size": 2, "speculative_model": "/models/draft", "num_speculative_tokens": 2},
     "a draft model runs with pipeline parallel size 1, got 2"),
])
def test_unsupported_draft_parallelism_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(distributed_executor_backend="mp", **kwargs)
