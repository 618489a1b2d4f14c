"""``llmserve bench prefix-cache`` runs end to end on the tiny model and its figures are consistent."""

from __future__ import annotations

import pytest

from llmserve.entrypoints.cli import build_parser
from llmserve.benchmarks.prefix_cache import run_prefix_cache_benchmark


def test_prefix_cache_benchmark(llama_dir, capsys):
    args = build_parser().parse_args(["bench", "prefix-cache", str(llama_dir), "--prefix-len", "64",
                                      "--suffix-len", "8", "--num-prompts", "3", "--output-len", "2", "--n", "4",
                                      "--waste-requests", "6", "--block-size", "4",
                                      "--kv-cache-memory-bytes", "16MiB", "--max-model-len", "2048"])
    results = run_prefix_cache_benchmark(args)
    assert results["mean_ttft_ms_caching_on"] > 0 and results["mean_ttft_ms_caching_off"] > 0
    # 72-token prompt, block 4: 18 blocks shared by 4 samples instead of 4 x 18.
    assert results["parallel_blocks_private"] == 4 * 18
    assert results["parallel_blocks_used"] == 18
    assert 0 <= results["kv_waste_steady_state"] < 1
    assert "lower" in capsys.readouterr().out


def test_prefix_caching_off_is_refused_since_the_benchmark_turns_it_on_and_off(llama_dir):
    args = build_parser().parse_args(["bench", "prefix-cache", str(llama_dir), "--no-enable-prefix-caching"])
    with pytest.raises(ValueError, match="on and off itself"):
        run_prefix_cache_benchmark(args)
