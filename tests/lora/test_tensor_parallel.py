"""LoRA with TP=2 (a worker process per rank): each rank keeps its rows of B for the column-parallel layers
(its q/k/v heads, its gate/up rows) and its columns of A for the row-parallel ones (o_proj, down_proj, whose
partial deltas the layer's all-reduce sums); greedy output of a batch mixing three adapters and the base
model equals transformers + PEFT. Qwen2 (biased q/k/v)."""

from __future__ import annotations

from llmserve import LLM
from tests.lora.test_hf_equivalence import GREEDY, assert_matches_peft, mixed_batch


def test_tp2_mixed_batch_matches_peft(checkpoint_dir, lora_adapter):
    path = checkpoint_dir("qwen2")
    llm = LLM(str(path), tensor_parallel_size=2, enable_lora=True, max_loras=3, max_lora_rank=8,
              max_num_batched_tokens=7, block_size=4, kv_cache_memory_bytes="16MiB")
    try:
        prompts, loras = mixed_batch(lora_adapter, "qwen2")
        outputs = llm.generate(prompts[:8], GREEDY, lora_request=loras[:8])
        assert_matches_peft(path, outputs, loras[:8])
    finally:
        llm.shutdown()
