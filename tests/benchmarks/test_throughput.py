"""``llmserve bench throughput`` runs end to end (tiny model) and reports consistent figures."""

from __future__ import annotations

import json

from llmserve.entrypoints.cli import main


def test_bench_throughput_with_hf_comparison(tmp_path, llama_dir, capsys):
    result_file = tmp_path / "result.json"
    code = main(["--log-level", "warning", "bench", "throughput", str(llama_dir), "--num-prompts", "4",
                 "--input-len", "8", "--output-len", "5", "--kv-cache-memory-bytes", "8MiB", "--compare-hf",
                 "--hf-batch-size", "2", "--hf-sequential-prompts", "2", "--output-json", str(result_file)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "llmserve / HF transformers static batch 2" in printed
    assert "batch-1 decode: TPOT" in printed
    report = json.loads(result_file.read_text())
    engine, hf_static, hf_single = report["results"]
    assert engine["num_requests"] == 4 and engine["output_tokens"] == 4 * 5
    assert hf_static["output_tokens"] == 4 * 5 and hf_single["output_tokens"] == 2 * 5
    assert engine["prompt_tokens"] == 4 * 8
    batch1 = report["batch1_decode"]
    assert batch1["decode_steps"] == 4   # output_len - 1 steps after the prefill step
    parts = batch1["model_forward_ms"] + batch1["sampler_ms"] + batch1["engine_overhead_ms"]
    assert abs(parts - batch1["tpot_ms"]) < 1e-6
