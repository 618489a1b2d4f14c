"""vLLM's speculative decoding counters: exported (at 0, every draft position) only when speculation is
on, fed from the engine's totals, consistent with each other (accepted <= drafted; per-position counts sum
to the accepted tokens and never grow along the positions) and with the tokens the requests got."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmserve import LLM, SamplingParams
from llmserve.metrics.prometheus import EngineMetrics

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def scrape(metrics: EngineMetrics) -> dict[tuple[str, str | None], float]:
    values = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            if sample.name.startswith("vllm:spec_decode") and sample.name.endswith("_total"):
                values[sample.name, sample.labels.get("position")] = sample.value
    return values


def test_exported_only_with_speculation():
    assert scrape(EngineMetrics("m")) == {}
    assert scrape(EngineMetrics("m", num_speculative_tokens=2)) == {
        ("vllm:spec_decode_num_drafts_total", None): 0.0, ("vllm:spec_decode_num_draft_tokens_total", None): 0.0,
        ("vllm:spec_decode_num_accepted_tokens_total", None): 0.0,
        ("vllm:spec_decode_num_accepted_tokens_per_pos_total", "0"): 0.0,
        ("vllm:spec_decode_num_accepted_tokens_per_pos_total", "1"): 0.0}


def test_counters_follow_the_engine_and_add_up(llama_dir):
    llm = LLM(str(llama_dir), block_size=4, kv_cache_memory_bytes="8MiB", speculative_config=NGRAM)
    metrics = EngineMetrics("m", num_speculative_tokens=3)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = ["a b c a b c a b c a b", "The cat sat on the mat. The cat sat on the"]
    steps = 0
    for i, prompt in enumerate(prompts):
        llm.engine.add_request(str(i), prompt, params)
    while llm.engine.has_unfinished_requests():
        metrics.record_step(llm.engine.stats(), llm.engine.step())
        steps += 1
    metrics.record_step(llm.engine.stats(), [])
    values = scrape(metrics)
    drafts = values["vllm:spec_decode_num_drafts_total", None]
    drafted = values["vllm:spec_decode_num_draft_tokens_total", None]
    accepted = values["vllm:spec_decode_num_accepted_tokens_total", None]
    per_pos = [values["vllm:spec_decode_num_accepted_tokens_per_pos_total", str(i)] for i in range(3)]
    assert 0 < accepted <= drafted <= 3 * drafts
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)
    # Several tokens in a step are each counted once.
    assert llm.engine.num_generation_tokens_total == 2 * 40
    assert drafts <= 2 * steps
    stats = llm.engine.scheduler.spec_stats
    assert stats.acceptance_rate == accepted / drafted and stats.mean_acceptance_length == 1 + accepted / drafts
