"""``llmserve bench lora`` runs end to end (tiny model): four runs per round, every request's tokens counted,
ratios against LoRA off."""

from __future__ import annotations

import json

from llmserve.entrypoints.cli import main


def test_bench_lora(tmp_path, llama_dir, capsys):
    result_file = tmp_path / "result.json"
    code = main(["--log-level", "warning", "bench", "lora", str(llama_dir), "--num-prompts", "6", "--input-len", "8",
                 "--output-len", "4", "--kv-cache-memory-bytes", "8MiB", "--max-loras", "3", "--max-lora-rank", "8",
                 "--lora-rank", "8", "--rounds", "1", "--output-json", str(result_file)])
    assert code == 0
    assert "LoRA on, adapters mixed:" in capsys.readouterr().out
    report = json.loads(result_file.read_text())
    runs = [runs[0] for runs in report["rounds"]]
    assert [r["output_tokens"] for r in runs] == [6 * 4] * 4
    ratios = report["ratios_output_tokens_per_s"]
    assert ratios["LoRA off, base requests"] == 1.0 and len(ratios) == 4
