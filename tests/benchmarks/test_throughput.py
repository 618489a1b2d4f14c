"""``llmserve bench throughput`` runs end to end (tiny model) and reports consistent figures; flags that cannot
work, or would do nothing with the dataset or without ``--compare-hf``, are refused by name before the engine loads."""

from __future__ import annotations

import json

import pytest

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


@pytest.mark.parametrize("flags,fragment", [
    (["--num-prompts", "0"], "--num-prompts must be at least 1, got 0"),
    (["--input-len", "-5"], "--input-len must be at least 1, got -5"),
    (["--output-len", "0"], "--output-len must be at least 1, got 0"),
    (["--compare-hf", "--hf-batch-size", "0"], "--hf-batch-size must be at least 1, got 0"),
    (["--dataset-path", "/nonexistent.json"], "--dataset-path belongs to --dataset-name sharegpt; it does nothing "
                                              "with --dataset-name random"),
    (["--sharegpt-output-len", "7"], "--sharegpt-output-len belongs to --dataset-name sharegpt"),
    (["--dataset-name", "sharegpt", "--random-range-ratio", "0.5"], "--random-range-ratio belongs to "
                                                                    "--dataset-name random"),
    (["--dataset-name", "sharegpt", "--input-len", "8"], "--input-len belongs to --dataset-name random"),
    (["--dataset-name", "sharegpt", "--output-len", "8"], "--output-len belongs to --dataset-name random"),
    (["--hf-batch-size", "2"], "--hf-batch-size sets up the Hugging Face runs: it does nothing without --compare-hf"),
    (["--hf-sequential-prompts", "2"], "--hf-sequential-prompts sets up the Hugging Face runs"),
])
def test_flags_that_cannot_work_or_would_do_nothing_are_refused(llama_dir, flags, fragment, capsys):
    code = main(["--log-level", "warning", "bench", "throughput", str(llama_dir), "--num-prompts", "2",
                 "--kv-cache-memory-bytes", "8MiB", "--num-threads", "1", *flags])
    assert code == 2 and fragment in capsys.readouterr().err
