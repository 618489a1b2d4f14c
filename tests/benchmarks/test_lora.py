"""``llmserve bench lora`` runs end to end (tiny model): the four configurations as engines of one process stepped
in turn, every request's tokens counted, ratios of the throughput summed over the rounds against LoRA off (and
against LoRA-on base requests for the adapter runs), each round's ratios beside them, and base requests' greedy
outputs the same with LoRA off and on; counts below what can work, more --lora-path adapters than --max-loras, and
--lora-rank with --lora-path (the given adapters keep their own rank) are refused by name."""

from __future__ import annotations

import json

import pytest

from llmserve.benchmarks.lora import LORA_ON_BASE, MIXED, ONE_ADAPTER, REFERENCE
from llmserve.entrypoints.cli import main


def test_bench_lora(tmp_path, llama_dir, capsys):
    result_file = tmp_path / "result.json"
    code = main(["--log-level", "warning", "bench", "lora", str(llama_dir), "--num-prompts", "6", "--input-len", "8",
                 "--output-len", "4", "--kv-cache-memory-bytes", "8MiB", "--max-loras", "3", "--max-lora-rank", "8",
                 "--lora-rank", "8", "--max-num-seqs", "4", "--rounds", "2", "--output-json", str(result_file)])
    assert code == 0
    out = capsys.readouterr().out
    assert "LoRA on, adapters mixed:" in out and "stepped in turn" in out
    report = json.loads(result_file.read_text())
    runs = [run for runs in report["rounds"] for run in runs]
    assert len(runs) == 4 * 2 and [r["output_tokens"] for r in runs] == [6 * 4] * 8
    throughput, ratios = report["output_tokens_per_s"], report["ratios_output_tokens_per_s"]
    assert ratios[REFERENCE] == 1.0 and len(ratios) == 4
    one_adapter = report["rounds"][2]
    assert throughput[ONE_ADAPTER] == pytest.approx(
        sum(r["output_tokens"] for r in one_adapter) / sum(r["elapsed_s"] for r in one_adapter))
    assert report["ratios_of_lora_on_base"][MIXED] == pytest.approx(throughput[MIXED] / throughput[LORA_ON_BASE])
    mixed, base = report["rounds"][3], report["rounds"][1]
    assert report["ratios_per_round"][MIXED] == pytest.approx(
        [(m["output_tokens"] / m["elapsed_s"]) / (b["output_tokens"] / b["elapsed_s"]) for m, b in zip(mixed, base)])
    assert report["base_outputs_differing"] == 0


@pytest.mark.parametrize("flags,fragment", [
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1, got 0"),
    (["--input-len", "-5"], "--input-len must be at least 1, got -5"),
    (["--output-len", "0"], "--output-len must be at least 1, got 0"),
    (["--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
    # the benchmark runs --max-loras adapters (fewer paths are cycled): more would be left out
    (["--lora-path", "a", "b", "c"], "--lora-path names 3 adapters but --max-loras is 1"),
    (["--max-loras", "2", "--lora-path", "a", "b", "c"], "raise --max-loras to 3 or name fewer"),
    (["--lora-path", "a", "--lora-rank", "64"], "--lora-rank is the rank of the random adapters, which --lora-path "
                                                "replaces"),
])
def test_bench_lora_refuses_flags_that_cannot_work_or_would_do_nothing(llama_dir, flags, fragment, capsys):
    assert main(["--log-level", "warning", "bench", "lora", str(llama_dir), "--kv-cache-memory-bytes", "8MiB",
                 "--num-threads", "1", *flags]) == 2
    assert fragment in capsys.readouterr().err
