"""``llmserve bench lora`` runs end to end (tiny model): each configuration in a process of its own, every
request's tokens counted, ratios of the mean throughput against LoRA off (and against LoRA-on base requests
for the adapter runs)."""

from __future__ import annotations

import json
import os

import pytest

from llmserve.entrypoints.cli import main


def test_bench_lora(tmp_path, llama_dir, capsys):
    result_file = tmp_path / "result.json"
    code = main(["--log-level", "warning", "bench", "lora", str(llama_dir), "--num-prompts", "6", "--input-len", "8",
                 "--output-len", "4", "--kv-cache-memory-bytes", "8MiB", "--max-loras", "3", "--max-lora-rank", "8",
                 "--lora-rank", "8", "--rounds", "1", "--output-json", str(result_file)])
    assert code == 0
    assert "LoRA on, adapters mixed:" in capsys.readouterr().out
    report = json.loads(result_file.read_text())
    runs = [run for runs in report["rounds"] for run in runs]
    assert [r["output_tokens"] for r in runs] == [6 * 4] * 4
    pids = {r["pid"] for r in runs}
    assert len(pids) == 4 and os.getpid() not in pids   # one process per configuration
    means, ratios = report["mean_output_tokens_per_s"], report["ratios_output_tokens_per_s"]
    assert ratios["LoRA off, base requests"] == 1.0 and len(ratios) == 4
    one_adapter = report["rounds"][2][0]
    assert means["LoRA on, one adapter for all"] == pytest.approx(
        one_adapter["output_tokens"] / one_adapter["elapsed_s"])
    assert report["ratios_of_lora_on_base"]["LoRA on, adapters mixed"] == pytest.approx(
        means["LoRA on, adapters mixed"] / means["LoRA on, base requests"])
