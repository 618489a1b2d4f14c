"""Offline benches on the tiny checkpoint: throughput on varied lengths vs HF, latency and roofline smoke runs."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from llmserve.entrypoints.cli import main

ENGINE = ["--kv-cache-memory-bytes", "8MiB", "--num-threads", "1"]


def bench(*args: str) -> int:
    return main(["--log-level", "warning", "bench", *args])


def test_throughput_varied_lengths_counts_each_requests_own_tokens(tmp_path, llama_dir):
    out = tmp_path / "thr.json"
    assert bench("throughput", str(llama_dir), *ENGINE, "--num-prompts", "5", "--input-len", "8",
                 "--output-len", "6", "--random-range-ratio", "0.5", "--compare-hf", "--hf-batch-size", "2",
                 "--hf-sequential-prompts", "2", "--output-json", str(out)) == 0
    report = json.loads(out.read_text())
    engine, hf_static, hf_single = report["results"]
    wanted = report["dataset"]["output_tokens"]
    assert report["dataset"]["max_output_len"] > report["dataset"]["mean_output_len"] - 1   # lengths are drawn
    assert engine["output_tokens"] == wanted and hf_static["output_tokens"] == wanted   # padding not counted
    assert engine["prompt_tokens"] == hf_static["prompt_tokens"] == report["dataset"]["prompt_tokens"]
    assert hf_single["num_requests"] == 2
    assert set(report["speedup_output_tokens_per_s"]) == {"HF transformers static batch 2",
                                                          "HF transformers one at a time"}


def test_throughput_sharegpt_shaped(tmp_path, llama_dir, capsys):
    out = tmp_path / "thr.json"
    assert bench("throughput", str(llama_dir), *ENGINE, "--dataset-name", "sharegpt", "--num-prompts", "6",
                 "--sharegpt-output-len", "3", "--output-json", str(out)) == 0
    report = json.loads(out.read_text())
    assert report["dataset"]["num_requests"] == 6 and report["dataset"]["output_tokens"] == 18
    assert report["results"][0]["output_tokens"] == 18
    assert 4 <= report["dataset"]["mean_prompt_len"] <= 1024
    assert "6 sharegpt requests" in capsys.readouterr().out


def test_latency_smoke(tmp_path, llama_dir):
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    assert bench("latency", str(llama_dir), *ENGINE, "--input-len", "16", "--output-len", "8", "--batch-sizes",
                 "1,4", "--gemm-size", "128", "--output-json", str(out), "--max-num-batched-tokens", "32", *plot) == 0
    if plot:
        assert png.read_bytes()[:4] == b"\x89PNG"
    report = json.loads(out.read_text())
    rows = {r["batch_size"]: r for r in report["results"]}
    assert set(rows) == {1, 4}
    assert rows[1]["decode_steps"] == 8 - 1 - 2               # prefill step, then 2 skipped warm-up steps
    # 64 prompt tokens at 32 a step, minus the decodes of the first prompts: 3 steps until all are prefilled
    assert rows[4]["output_len"] == 8 and rows[4]["prefill_steps"] == 3
    for row in rows.values():
        parts = row["model_forward_ms"] + row["sampler_ms"] + row["engine_overhead_ms"]
        assert parts == pytest.approx(row["tpot_ms"])
        assert row["decode_tokens_per_s"] > 0 and 0 < row["fraction_of_peak_flops"] < 1
    assert report["peak"]["peak_gflop_s"] > 0
    assert bench("latency", str(llama_dir), "--batch-sizes", "1,x") == 2


@pytest.mark.parametrize("flags,fragment", [
    (["--max-num-seqs", "2", "--batch-sizes", "1,8"], "--batch-sizes has 8 but --max-num-seqs is 2"),
    (["--batch-sizes", "512"], "raise --max-num-seqs to 512"),   # the default --max-num-seqs is 256
    (["--input-len", "0"], "--input-len must be at least 1, got 0"),
    (["--skip-steps", "-1"], "--skip-steps must be at least 0, got -1"),
])
def test_latency_refuses_a_batch_the_engine_would_not_run_in_one_step(llama_dir, flags, fragment, capsys):
    assert bench("latency", str(llama_dir), *ENGINE, "--no-peak", *flags) == 2
    assert fragment in capsys.readouterr().err


def test_latency_torch_profile_writes_each_batch_sizes_operators_and_trace(tmp_path, llama_dir):
    out, profiles = tmp_path / "lat.json", tmp_path / "profiles"
    assert bench("latency", str(llama_dir), *ENGINE, "--input-len", "16", "--output-len", "8", "--batch-sizes", "1,4",
                 "--no-peak", "--max-num-batched-tokens", "32", "--torch-profile", str(profiles),
                 "--output-json", str(out)) == 0
    for row in json.loads(out.read_text())["results"]:
        table, trace = (profiles / f"batch-{row['batch_size']}").with_suffix(".txt"), \
            (profiles / f"batch-{row['batch_size']}").with_suffix(".json")
        assert row["torch_profile"] == [str(table), str(trace)]
        text = table.read_text()
        assert text.startswith(f"5 engine steps decoding {row['batch_size']} sequences, by their own host time")
        assert "Self CPU" in text and "aten::" in text   # the operators the steps ran
        assert "llmserve: engine step" in text and "llmserve: sampler" in text   # and the step's parts, named
        assert json.loads(trace.read_text())["traceEvents"]


def test_roofline_smoke(tmp_path, llama_dir, capsys):
    out = tmp_path / "roof.json"
    assert bench("roofline", str(llama_dir), *ENGINE, "--input-len", "16", "--output-len", "6", "--decode-batch",
                 "8", "--repeats", "1", "--gemm-size", "128", "--bandwidth-bytes", str(8 * 2**20),
                 "--max-num-batched-tokens", "64", "--output-json", str(out)) == 0
    report = json.loads(out.read_text())
    assert set(report["steps"]) == {"decode_batch_1", "decode_batch_8", "prefill_step_64_tokens"}
    model = report["model"]
    # tiny llama: hidden 64, 2 layers, 4 heads / 2 KV heads of 16, intermediate from the checkpoint
    assert model["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    b1 = report["steps"]["decode_batch_1"]
    assert b1["tokens"] == 1 and b1["bound"] == "memory"
    assert b1["memory_floor_ms"] == pytest.approx(b1["bytes"] / (report["machine"]["memory"]["bandwidth_gb_s"] * 1e6))
    assert 0 < b1["fraction_of_floor"] <= 1.5
    prefill = report["steps"]["prefill_step_64_tokens"]
    assert prefill["tokens"] == 64 and prefill["flops"] > 64 * 2 * model["body_params"]
    printed = capsys.readouterr().out
    assert "memory bandwidth: copy" in printed and "decode_batch_8" in printed


def test_machine_measurements_report_the_device_and_dtype_they_ran_on():
    from llmserve.benchmarks.roofline import measure_bandwidth, measure_matmul

    memory = measure_bandwidth(4 * 2**20, repeats=1, device=torch.device("cpu"))
    assert memory["bandwidth_gb_s"] == max(memory["copy_gb_s"], memory["read_gb_s"]) > 0
    matmul = measure_matmul(64, repeats=1, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert matmul["dtype"] == "torch.bfloat16" and matmul["device"] == "cpu"
    assert matmul["packed_gflop_s"] is None            # prepacking is measured for float32 only
    assert matmul["peak_gflop_s"] == max(matmul["plain_gflop_s"], matmul["engine_gflop_s"])
