"""Tensor and pipeline parallelism change where the model runs, never what it computes: with TP=2, PP=2
and TP=2 x PP=2 (one worker process per rank, gloo on the CPU), greedy output equals Hugging Face
transformers token for token and logprobs agree within 1e-3, for every Llama-shaped family in every layout,
and each other family in one, with chunked prefill and forced preemption, prefix caching on; so does expert
parallelism at TP=2 for the MoE families.
Embeddings pool on the last stage: at TP=2 x PP=2, mean-pooled vectors computed in 7-token chunks, batched
with greedy generations, equal HF's pooled hidden states within 1e-4."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from llmserve import LLM, SamplingParams
from llmserve.pooling_params import PoolingParams
from tests.engine.test_hf_equivalence import (
    PROMPTS,
    assert_matches_hf,
    assert_prefix_cache_repeats,
    kv_cache_group_size,
    llm_block_bytes,
    pool_block_bytes,
    preempting_blocks,
)
from tests.engine.test_pooling import assert_matches_hf as assert_pooled_like_hf

LAYOUTS = [(2, 1), (1, 2), (2, 2)]   # (tensor parallel, pipeline parallel)
# The Llama-shaped families in every layout; the others (whose blocks shard through the same layers) in one each:
# Gemma 2 at TP=2 (3 query heads and 1 KV head per rank, a sliding window, soft-caps), Gemma 4 with its MoE block at
# TP=2 (its one global KV head on both ranks, layers sharing K/V, per-layer inputs, each rank half of every expert
# beside its half of the dense MLP; it refuses PP), GPT-2 at TP=2 x PP=2 (fused
# c_attn and Conv1D weights sharded, learned positions on the first stage only), Command-R at TP=2 (per-head q/k
# LayerNorms sharded with their heads), Cohere2 and Phi-3 (fused qkv / gate_up) at TP=2 x PP=2 (Cohere2's four
# KV-cache groups formed across the stages), BLOOM at TP=2 x PP=2 (each rank its heads' ALiBi slopes, the
# embedding LayerNorm on the first stage), Falcon's new architecture at TP=2 (one of the 2 KV groups per rank),
# Falcon-RW at TP=2 (ALiBi, sequential blocks) and the Phi-4-mini-like checkpoint at TP=2 (LongRoPE switched per
# sequence and partial rotary on each rank's heads), the MoE families (every expert split over the intermediate
# dimension, one all-reduce): Mixtral and Qwen2-MoE (its shared expert and dense middle layer sharded too) at
# TP=2, Qwen3-MoE at TP=2 x PP=2 (its dense layer on the first stage, its sparse one on the second), DeepSeek-V3
# at PP=2 (three layers: the dense one and a sparse one on the first stage, a sparse one on the second), and
# DeepSeek-V2-Lite at TP=2 (2 of the 4 MLA heads per rank over the latent every rank caches whole; each rank its
# slice of every expert's and the shared experts' intermediate rows).
# Gemma 3 composes over simulated TP ranks in tests/models/test_gemma.py.
LLAMA_SHAPED = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
OTHER_FAMILIES = [("gemma2", 2, 1), ("gemma4_moe", 2, 1), ("gpt2", 2, 2), ("cohere", 2, 1), ("cohere2", 2, 2),
                  ("phi3", 2, 2), ("bloom", 2, 2), ("falcon", 2, 1), ("falcon_rw", 2, 1), ("phi4_mini", 2, 1),
                  ("mixtral", 2, 1), ("qwen2_moe", 2, 1), ("qwen3_moe", 2, 2), ("deepseek_v2_lite", 2, 1),
                  ("deepseek_v3", 1, 2)]
CASES = [(f, tp, pp) for f in LLAMA_SHAPED for tp, pp in LAYOUTS] + OTHER_FAMILIES


@pytest.mark.parametrize("family,tp,pp", CASES, ids=[f"{f}-tp{t}pp{p}" for f, t, p in CASES])
def test_parallel_matches_hf_with_chunked_prefill_and_preemption(checkpoint_dir, family, tp, pp):
    """7-token steps split every longer prompt; 24 blocks of 4 tokens in every layer (14 for Phi-3, see
    ``preempting_blocks``) cannot hold all five sequences, so some are preempted and recomputed; each rank holds
    its share of every block (Gemma 2 at TP=2: its two KV-cache groups of one layer make them 48 blocks; Gemma 4's
    groups of one layer share a page as large as its full layer's, whose one KV head every rank holds). Pipeline
    stages form the whole model's KV-cache groups (Cohere2 at PP=2: four groups of one layer, two on each stage), so
    a block spans a group's layers on a stage: given the bytes for that, every layout has as many blocks."""
    path = checkpoint_dir(family)
    if pp == 1:
        budget = preempting_blocks(family) * llm_block_bytes(path, 4, tp)
        num_blocks = budget // pool_block_bytes(path, 4, tp)
    else:
        layers = AutoConfig.from_pretrained(path).num_hidden_layers
        stage_layers = -(-layers // pp)   # on the largest stage
        group_size = kv_cache_group_size(path)
        num_blocks = preempting_blocks(family) * layers // (group_size or layers)
        spanned = min(group_size or stage_layers, stage_layers)   # layers of one block on the largest stage
        budget = num_blocks * spanned * (llm_block_bytes(path, 4, tp) // layers)
    llm = LLM(str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, block_size=4, max_num_batched_tokens=7,
              kv_cache_memory_bytes=budget)
    try:
        assert llm.engine.block_manager.num_blocks == num_blocks
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0))
        assert llm.engine.scheduler.num_preemptions > 0
        assert_matches_hf(path, outputs, max_tokens=24)
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
        assert_prefix_cache_repeats(llm, outputs)   # from blocks each rank still holds
    finally:
        llm.shutdown()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_expert_parallel_matches_hf_with_chunked_prefill_and_preemption(checkpoint_dir, family):
    """--enable-expert-parallel at TP=2: each rank holds whole experts (Mixtral's 5 as 3 + 2, Qwen2-MoE's 7 as
    4 + 3, its shared expert and dense layer still split; DeepSeek-V3's 8 as 4 + 4 under grouped sigmoid routing,
    its latent attention split by heads), under 7-token steps and forced preemption."""
    path = checkpoint_dir(family)
    llm = LLM(str(path), tensor_parallel_size=2, enable_expert_parallel=True, block_size=4, max_num_batched_tokens=7,
              kv_cache_memory_bytes=24 * llm_block_bytes(path, 4, 2))
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0))
        assert llm.engine.scheduler.num_preemptions > 0
        assert_matches_hf(path, outputs, max_tokens=24)
        assert_prefix_cache_repeats(llm, outputs)
    finally:
        llm.shutdown()


def test_expert_parallelism_without_experts_is_refused(llama_dir):
    with pytest.raises(Exception, match="--enable-expert-parallel: LlamaForCausalLM has no mixture-of-experts"):
        LLM(str(llama_dir), tensor_parallel_size=2, enable_expert_parallel=True, kv_cache_memory_bytes="8MiB")


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)], ids=["tp1pp2", "tp2pp2"])
def test_parallel_samples_fork_on_every_stage(llama_dir, tp, pp):
    """n > 1: the samples fork from the prompt's last step on every rank, so they run on as deltas there;
    greedy samples all equal HF's greedy output."""
    llm = LLM(str(llama_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp, kv_cache_memory_bytes="16MiB")
    try:
        outputs = llm.generate(PROMPTS[:1], SamplingParams(n=3, temperature=0.0, max_tokens=8, ignore_eos=True,
                                                           logprobs=0))
        for out in outputs:
            assert [c.finish_reason for c in out.outputs] == ["length"] * 3
            assert all(c.token_ids == out.outputs[0].token_ids for c in out.outputs)
        assert_matches_hf(llama_dir, outputs, max_tokens=8)
    finally:
        llm.shutdown()


def test_embeddings_pool_on_the_last_stage_batched_with_generation(llama_dir):
    llm = LLM(str(llama_dir), tensor_parallel_size=2, pipeline_parallel_size=2, block_size=4, max_num_batched_tokens=7,
              kv_cache_memory_bytes="16MiB", pooler_config={"pooling_type": "MEAN"})
    try:
        engine = llm.engine
        greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"gen-{i}", prompt, greedy)
            engine.add_request(f"embed-{i}", prompt, PoolingParams())
        finished = {}
        while engine.has_unfinished_requests():
            finished.update((out.request_id, out) for out in engine.step() if out.finished)
        assert_matches_hf(llama_dir, [finished[f"gen-{i}"] for i in range(len(PROMPTS))], max_tokens=8)
        assert_pooled_like_hf(llama_dir, [finished[f"embed-{i}"] for i in range(len(PROMPTS))], "MEAN")
    finally:
        llm.shutdown()
