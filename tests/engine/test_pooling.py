"""Pooling (embedding) requests go through the same scheduler as generation, prefill only, and give the
final layer's hidden states (after the final norm) pooled as Hugging Face's hidden states pooled the same
way, within 1e-4 in float32:

* LAST (vLLM's default for decoder models), MEAN and CLS pooling, each L2-normalised or not.
* Under chunked prefill (a 7-token step budget) the vector is the one computed in one step: a mean is
  summed over every chunk.
* A repeated prompt gives the same vector. With LAST pooling it is served from the prefix cache (its last
  token is always computed); MEAN and CLS read every position, so they skip the cache hit and compute the
  whole prompt again, while still publishing their blocks for the requests after them.
* Mixed into a batch of greedy generations, under chunked prefill and a KV cache small enough to preempt
  embedding requests mid-prompt, the generated tokens do not change and every vector still equals HF's.
"""

from __future__ import annotations

import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.pooling_params import PoolingParams
from tests.engine.test_hf_equivalence import llm_block_bytes
from tests.hf_reference import hf_pooled

PROMPTS = [
    "Hello world, this is",
    "The quick brown fox jumps over the lazy dog and then keeps running far away into the forest",
    "A",
    "def add(a, b):\n    return a + b\n\n# call it with two numbers and print the result",
]
TOLERANCE = 1e-4


def make_llm(path, pooling_type: str, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory_bytes", "16MiB")
    return LLM(str(path), pooler_config={"pooling_type": pooling_type}, **kwargs)


def assert_matches_hf(path, outputs, pooling_type: str, normalize: bool = True) -> None:
    for out in outputs:
        assert out.finished and out.finish_reason == "stop"
        expected = hf_pooled(path, out.prompt_token_ids, pooling_type, normalize)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN", "CLS"])
def test_pooled_vectors_match_hf_normalised_or_not(llama_dir, pooling_type):
    llm = make_llm(llama_dir, pooling_type)
    assert_matches_hf(llama_dir, llm.embed(PROMPTS), pooling_type)
    raw = llm.embed(PROMPTS, PoolingParams(normalize=False))
    assert_matches_hf(llama_dir, raw, pooling_type, normalize=False)
    assert any(abs(sum(x * x for x in out.outputs.embedding) - 1) > 1e-3 for out in raw)


def test_normalize_false_in_the_pooler_config(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="16MiB", pooler_config='{"normalize": false}')
    assert_matches_hf(llama_dir, llm.embed(PROMPTS[:2]), "LAST", normalize=False)
    assert_matches_hf(llama_dir, llm.embed(PROMPTS[:2], PoolingParams(normalize=True)), "LAST")


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_chunked_prefill_gives_the_same_vector(llama_dir, pooling_type):
    whole = [o.outputs.embedding for o in make_llm(llama_dir, pooling_type).embed(PROMPTS)]
    llm = make_llm(llama_dir, pooling_type, max_num_batched_tokens=7, block_size=4)
    chunked = llm.embed(PROMPTS)
    assert max(len(o.prompt_token_ids) for o in chunked) > 7
    for out, vector in zip(chunked, whole):
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), torch.tensor(vector), atol=1e-5, rtol=0)
    assert_matches_hf(llama_dir, chunked, pooling_type)


def test_last_pooling_repeat_is_a_prefix_cache_hit_with_the_same_vector(llama_dir):
    llm = make_llm(llama_dir, "LAST", block_size=4)
    first = llm.embed(PROMPTS[1])[0].outputs.embedding
    hits = llm.engine.block_manager.prefix_hit_tokens
    again = llm.embed(PROMPTS[1])[0]
    assert llm.engine.block_manager.prefix_hit_tokens > hits
    torch.testing.assert_close(torch.tensor(again.outputs.embedding), torch.tensor(first), atol=1e-5, rtol=0)
    assert_matches_hf(llama_dir, [again], "LAST")


@pytest.mark.parametrize("pooling_type", ["MEAN", "CLS"])
def test_pooling_every_position_skips_the_cache_hit_but_publishes_its_blocks(llama_dir, pooling_type):
    llm = make_llm(llama_dir, pooling_type, block_size=4)
    first = llm.embed(PROMPTS[1])[0].outputs.embedding
    bm = llm.engine.block_manager
    hits = bm.prefix_hit_tokens
    again = llm.embed(PROMPTS[1])[0]
    assert bm.prefix_hit_tokens == hits   # recomputed: the cache keeps K/V, not the hidden states pooled here
    torch.testing.assert_close(torch.tensor(again.outputs.embedding), torch.tensor(first), atol=1e-5, rtol=0)
    llm.generate(PROMPTS[1], SamplingParams(max_tokens=1))
    assert bm.prefix_hit_tokens > hits    # a completion of the same prompt reuses the embedding's blocks
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_embeddings_batched_with_generation_under_preemption(llama_dir, pooling_type):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in make_llm(llama_dir, pooling_type).generate(PROMPTS, greedy)]
    llm = make_llm(llama_dir, pooling_type, block_size=4, max_num_batched_tokens=7,
                   kv_cache_memory_bytes=24 * llm_block_bytes(llama_dir, 4))
    engine, scheduler = llm.engine, llm.engine.scheduler
    preempted_pooling = []
    preempt = scheduler._preempt

    def spy(seq) -> None:
        if seq.pooling is not None and seq.num_computed_tokens:
            preempted_pooling.append(seq.request_id)
        preempt(seq)

    scheduler._preempt = spy
    finished = {}

    def step() -> None:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out

    for i, prompt in enumerate(PROMPTS):   # joining two steps apart, embeddings land amid growing generations
        engine.add_request(f"gen-{i}", prompt, greedy)
        engine.add_request(f"embed-{i}", "passage: " + PROMPTS[-1 - i], PoolingParams())
        step()
        step()
    while engine.has_unfinished_requests():
        step()
    assert preempted_pooling, "no embedding request was preempted mid-prompt"
    assert [finished[f"gen-{i}"].outputs[0].token_ids for i in range(len(PROMPTS))] == alone
    assert_matches_hf(llama_dir, [finished[f"embed-{i}"] for i in range(len(PROMPTS))], pooling_type)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
