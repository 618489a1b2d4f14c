"""``bench serve`` and ``bench sweep`` end to end against a live server (tiny checkpoint, real subprocess)."""

from __future__ import annotations

import json

import pytest

from llmserve.entrypoints.cli import main


def bench(*args: str) -> int:
    return main(["--log-level", "warning", "bench", *args])


def test_bench_serve_random_token_prompts(bench_server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    code = bench("serve", "--base-url", bench_server.base_url, "--num-prompts", "6", "--random-input-len", "12",
                 "--random-output-len", "5", "--vocab-size", "2000", "--metric-percentiles", "50,90,99",
                 "--goodput", "ttft:100000", "tpot:100000", "--save-result", str(out), "--disable-tqdm")
    assert code == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "P90 TTFT (ms):" in printed
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_input_tokens"] == 6 * 12 and result["total_output_tokens"] == 6 * 5
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])   # loose SLOs: all good
    assert result["model_id"] == "tiny" and result["backend"] == "openai"
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert result[f"{stat}_{name}_ms"] >= 0
    assert 0 < result["median_ttft_ms"] <= result["median_e2el_ms"]
    assert result["output_throughput"] == pytest.approx(result["total_output_tokens"] / result["duration"])
    assert "ttfts" not in result   # only with --save-detailed


def test_bench_serve_chat_sharegpt_counts_from_usage(bench_server, tmp_path):
    out = tmp_path / "chat.json"
    code = bench("serve", "--base-url", bench_server.base_url, "--endpoint", "/v1/chat/completions",
                 "--dataset-name", "sharegpt", "--num-prompts", "4", "--sharegpt-output-len", "4",
                 "--request-rate", "50", "--percentile-metrics", "ttft,e2el", "--goodput", "ttft:0",
                 "--save-result", str(out), "--save-detailed", "--disable-tqdm")
    assert code == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "openai-chat" and result["tokenizer_id"].endswith("/tokenize")
    assert result["completed"] == 4 and result["output_lens"] == [4, 4, 4, 4]
    assert all(n >= 4 for n in result["input_lens"])    # the server's usage, chat template included
    assert result["request_goodput"] == 0.0
    assert "p99_ttft_ms" in result and "mean_tpot_ms" not in result
    # one ITL per later content chunk: at most 3 for 4 tokens (a token that completes no character sends no text)
    assert len(result["ttfts"]) == 4 and all(len(itl) <= 3 for itl in result["itls"])


def test_bench_serve_prefix_repetition_and_bad_server(bench_server, tmp_path):
    assert bench("serve", "--base-url", bench_server.base_url, "--dataset-name", "prefix-repetition",
                 "--num-prompts", "4", "--prefix-repetition-prefix-len", "32", "--prefix-repetition-suffix-len", "4",
                 "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "2", "--vocab-size",
                 "2000", "--max-concurrency", "2", "--disable-tqdm") == 0
    # out-of-range token ids: the warm-up request fails with the server's 400
    assert bench("serve", "--base-url", bench_server.base_url, "--num-prompts", "2", "--vocab-size", "50000",
                 "--random-input-len", "64", "--disable-tqdm") == 2


def test_bench_sweep(bench_server, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = bench("sweep", "--base-url", bench_server.base_url, "--request-rates", "40,20", "--num-prompts", "4",
                 "--random-input-len", "8", "--random-output-len", "3", "--vocab-size", "2000",
                 "--slo", "ttft_p99:100000", "tpot_p90:100000", "--plot", str(png), "--save-result", str(out),
                 "--disable-tqdm")
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert [p["request_rate"] for p in result["points"]] == [20.0, 40.0]
    assert all(p["meets_slo"] and p["metrics"]["completed"] == 4 for p in result["points"])
    assert "p90_tpot_ms" in result["points"][0]["metrics"]
    assert result["capacity_request_rate"] == 40.0
    assert "capacity: 40 req/s" in capsys.readouterr().out
    code = bench("sweep", "--base-url", bench_server.base_url, "--request-rates", "40", "--num-prompts", "2",
                 "--random-input-len", "8", "--random-output-len", "3", "--vocab-size", "2000",
                 "--slo", "ttft_p99:0", "--plot", "", "--save-result", str(out), "--disable-tqdm")
    assert code == 0 and json.loads(out.read_text())["capacity_request_rate"] is None
