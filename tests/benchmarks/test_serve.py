"""``bench serve`` and ``bench sweep`` end to end against a live server (tiny checkpoint, real subprocess).

The flags are ``vllm bench serve``'s, so a script written for it runs unchanged: ``--save-result`` is a
switch that writes vLLM's file name ``{backend}-{rate}qps[-concurrency{N}]-{model}-{date}.json`` into
``--result-dir`` (or ``--result-filename``), ``--append-result`` adds a JSON line, ``--metadata KEY=VALUE``
adds fields; ``--backend`` (openai, vllm, openai-chat) picks the endpoint, ``--host`` / ``--port`` the
server when there is no ``--base-url``; ``prefix_repetition`` is vLLM's spelling of the dataset. vLLM flags
for what this benchmark does not do are refused by name with the reason, and result flags that would do
nothing without ``--save-result`` are refused too, as are another dataset's flags, ``--vocab-size`` with text
prompts, and counts and lengths that cannot work. Random token-id prompts draw from ids the server's model has,
learnt from its ``/tokenize`` when no ``--vocab-size`` or ``--tokenizer`` says them.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest

from llmserve.benchmarks.datasets import ApproxTokenizer, SampleRequest, ServerTokenizer
from llmserve.benchmarks.serve import Target, request_body, token_id_pool
from llmserve.entrypoints.cli import main
from llmserve.testing.lora_adapters import write_lora_adapter


def bench(*args: str) -> int:
    return main(["--log-level", "warning", "bench", *args])


def test_bench_serve_random_token_prompts(bench_server, tmp_path, capsys):
    code = bench("serve", "--base-url", bench_server.base_url, "--num-prompts", "6", "--random-input-len", "12",
                 "--random-output-len", "5", "--vocab-size", "2000", "--metric-percentiles", "50,90,99",
                 "--goodput", "ttft:100000", "tpot:100000", "--save-result", "--result-dir", str(tmp_path / "out"),
                 "--disable-tqdm")
    assert code == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "P90 TTFT (ms):" in printed
    [path] = (tmp_path / "out").iterdir()
    assert re.fullmatch(r"openai-infqps-tiny-\d{8}-\d{6}\.json", path.name)   # vLLM's default name
    result = json.loads(path.read_text())
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
    code = bench("serve", "--base-url", bench_server.base_url, "--backend", "openai-chat",
                 "--dataset-name", "sharegpt", "--num-prompts", "4", "--sharegpt-output-len", "4",
                 "--request-rate", "50", "--percentile-metrics", "ttft,e2el", "--goodput", "ttft:0",
                 "--save-result", "--result-filename", str(out), "--save-detailed", "--disable-tqdm")
    assert code == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "openai-chat" and result["endpoint"] == "/v1/chat/completions"
    assert result["tokenizer_id"].endswith("/tokenize")
    assert result["completed"] == 4 and result["output_lens"] == [4, 4, 4, 4]
    assert all(n >= 4 for n in result["input_lens"])    # the server's usage, chat template included
    assert result["request_goodput"] == 0.0
    assert "p99_ttft_ms" in result and "mean_tpot_ms" not in result
    # one ITL per later content chunk: at most 3 for 4 tokens (a token that completes no character sends no text)
    assert len(result["ttfts"]) == 4 and all(len(itl) <= 3 for itl in result["itls"])


def test_a_vllm_script_runs_unchanged(bench_server, tmp_path):
    """Flags as a vLLM benchmark script passes them: --backend vllm, --host / --port, --endpoint, vLLM's
    dataset spelling, sampling flags, --metadata, --append-result, --result-dir + --result-filename."""
    args = ["serve", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(bench_server.port), "--model", "tiny",
            "--endpoint", "/v1/completions", "--dataset-name", "prefix_repetition", "--num-prompts", "4",
            "--prefix-repetition-prefix-len", "16", "--prefix-repetition-suffix-len", "4",
            "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "3", "--vocab-size", "2000",
            "--max-concurrency", "2", "--request-rate", "100", "--temperature", "0.7", "--top-k", "5", "--logprobs",
            "1", "--ignore-eos", "--seed", "1", "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "99",
            "--metadata", "tp=1", "version=0.3.3", "--append-result", "--result-dir", str(tmp_path),
            "--result-filename", "runs.jsonl", "--disable-tqdm"]
    assert bench(*args) == 0 and bench(*args) == 0
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        result = json.loads(line)
        assert result["backend"] == "vllm" and result["completed"] == 4 and result["total_output_tokens"] == 12
        assert (result["tp"], result["version"]) == ("1", "0.3.3")
        assert result["dataset_name"] == "prefix-repetition" and result["max_concurrency"] == 2


def test_default_file_name_names_rate_and_concurrency(bench_server, tmp_path):
    assert bench("serve", "--base-url", bench_server.base_url, "--num-prompts", "2", "--random-input-len", "8",
                 "--random-output-len", "2", "--vocab-size", "2000", "--random-prefix-len", "4",
                 "--request-rate", "50", "--max-concurrency", "1", "--label", "mine", "--save-result",
                 "--result-dir", str(tmp_path), "--disable-tqdm", "--no-warmup") == 0
    [path] = tmp_path.iterdir()
    assert re.fullmatch(r"mine-50\.0qps-concurrency1-tiny-\d{8}-\d{6}\.json", path.name)
    assert json.loads(path.read_text())["total_input_tokens"] == 2 * 12


def test_request_body_carries_the_sampling_flags():
    target = Target("http://x", "/v1/chat/completions", "m",
                    sampling={"temperature": 0.0, "top_p": 0.9, "logprobs": True, "top_logprobs": 2})
    body = request_body(target, SampleRequest("hi", 1, 3), ignore_eos=False)
    assert body == {"model": "m", "temperature": 0.0, "top_p": 0.9, "logprobs": True, "top_logprobs": 2,
                    "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3}


@pytest.mark.parametrize("flags,fragment", [
    (["--profile"], "--profile (a vllm bench serve flag) is not supported"),
    (["--use-beam-search"], "beam search"),
    (["--hf-split", "train"], "--hf-split"),
    (["--ramp-up-strategy", "linear"], "ramp-up"),
    (["--lora-modules", "a=/x"], "pass its NAME as --model"),
    (["--backend", "tgi"], "invalid choice: 'tgi'"),
    (["--dataset-name", "sonnet"], "invalid choice: 'sonnet'"),
    (["--tokenizer-mode", "mistral"], "invalid choice: 'mistral'"),
])
def test_vllm_flags_it_cannot_honour_are_refused_by_name(flags, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        bench("serve", "--model", "m", *flags)
    assert info.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("flags,fragment", [
    (["--result-dir", "x"], "--result-dir needs --save-result"),
    (["--result-filename", "x.json"], "--result-filename needs --save-result"),
    (["--metadata", "a=1"], "--metadata needs --save-result"),
    (["--save-detailed"], "--save-detailed needs --save-result"),
    (["--save-result", "--metadata", "novalue"], "use KEY=VALUE"),
    (["--save-result", "--metadata", "model_id=x"], "would overwrite the result's own 'model_id'"),
    (["--backend", "openai-chat", "--endpoint", "/v1/completions"], "talks to /v1/chat/completions"),
    (["--port", "1"], "not both"),
    (["--max-concurrency", "0"], "--max-concurrency must be at least 1, got 0"),
    (["--max-concurrency", "-1"], "--max-concurrency must be at least 1, got -1"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1, got 0"),
    (["--random-input-len", "-5"], "--random-input-len must be at least 1, got -5"),
    (["--random-output-len", "0"], "--random-output-len must be at least 1, got 0"),
    (["--random-prefix-len", "-1"], "--random-prefix-len must be at least 0, got -1"),
    (["--dataset-name", "sharegpt", "--sharegpt-output-len", "0"], "--sharegpt-output-len must be at least 1"),
    (["--vocab-size", "100"], "--vocab-size must be at least 101, got 100"),
    (["--dataset-path", "x.json"], "--dataset-path belongs to --dataset-name sharegpt; it does nothing with "
                                   "--dataset-name random"),
    (["--sharegpt-output-len", "7"], "--sharegpt-output-len belongs to --dataset-name sharegpt"),
    (["--prefix-repetition-prefix-len", "5"], "--prefix-repetition-prefix-len belongs to --dataset-name "
                                              "prefix-repetition"),
    (["--dataset-name", "sharegpt", "--random-range-ratio", "0.5"], "--random-range-ratio belongs to "
                                                                    "--dataset-name random"),
    (["--dataset-name", "sharegpt", "--random-input-len", "8"], "--random-input-len belongs to --dataset-name random"),
    (["--dataset-name", "prefix_repetition", "--random-output-len", "8"], "--random-output-len belongs to"),
    (["--dataset-name", "sharegpt"], "--vocab-size does nothing with --dataset-name sharegpt"),
    (["--backend", "openai-chat"], "--vocab-size does nothing with --dataset-name random on /v1/chat/completions"),
])
def test_flags_that_would_do_nothing_or_contradict_are_refused(bench_server, flags, fragment, capsys):
    assert bench("serve", "--base-url", bench_server.base_url, "--num-prompts", "1", "--vocab-size", "2000",
                 "--no-warmup", *flags) == 2
    assert fragment in capsys.readouterr().err


def test_token_prompts_draw_from_the_ids_the_servers_tokenize_gives(bench_server):
    """The tiny model's vocabulary is 2000 ids; no --vocab-size: the ids come from the server's /tokenize (an id
    past the vocabulary would fail the warm-up request, exit status 2; a failed request, 1)."""
    tokenizer = ServerTokenizer(bench_server.base_url, "tiny")
    pool = token_id_pool(argparse.Namespace(vocab_size=None), tokenizer)
    assert len(pool) > 1000 and pool == sorted(set(pool)) and 0 <= pool[0] and pool[-1] < 2000
    assert bench("serve", "--base-url", bench_server.base_url, "--num-prompts", "3", "--random-input-len", "16",
                 "--random-output-len", "2", "--disable-tqdm") == 0
    assert bench("serve", "--base-url", bench_server.base_url, "--dataset-name", "prefix_repetition",
                 "--num-prompts", "2", "--prefix-repetition-prefix-len", "8", "--prefix-repetition-suffix-len", "4",
                 "--prefix-repetition-num-prefixes", "1", "--prefix-repetition-output-len", "2", "--disable-tqdm") == 0
    with pytest.raises(ValueError, match="pass --vocab-size"):   # a server without /tokenize
        token_id_pool(argparse.Namespace(vocab_size=None), ApproxTokenizer())


def test_an_adapter_the_server_serves_is_benchmarked_by_its_name_as_model(shared_server, llama_dir, tmp_path,
                                                                         capsys):
    adapter = write_lora_adapter(tmp_path / "adapter", llama_dir, r=8, lora_alpha=16, seed=0, std=0.02)
    server = shared_server("--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"a={adapter}")
    out = tmp_path / "a.json"
    assert bench("serve", "--base-url", server.base_url, "--model", "a", "--num-prompts", "2", "--random-input-len",
                 "8", "--random-output-len", "3", "--save-result", "--result-filename", str(out),
                 "--disable-tqdm") == 0
    result = json.loads(out.read_text())
    assert result["model_id"] == "a" and result["completed"] == 2 and result["total_output_tokens"] == 6
    assert "model 'a'" in capsys.readouterr().out


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
                 "--slo", "ttft_p99:100000", "tpot_p90:100000", "--plot", str(png), "--save-result",
                 "--result-filename", str(out), "--metadata", "run=a", "--disable-tqdm")
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert [p["request_rate"] for p in result["points"]] == [20.0, 40.0]
    assert all(p["meets_slo"] and p["metrics"]["completed"] == 4 for p in result["points"])
    assert "p90_tpot_ms" in result["points"][0]["metrics"]
    assert result["capacity_request_rate"] == 40.0 and result["run"] == "a"
    assert "capacity: 40 req/s" in capsys.readouterr().out
    code = bench("sweep", "--base-url", bench_server.base_url, "--request-rates", "40", "--num-prompts", "2",
                 "--random-input-len", "8", "--random-output-len", "3", "--vocab-size", "2000",
                 "--slo", "ttft_p99:0", "--plot", "", "--save-result", "--result-dir", str(tmp_path / "runs"),
                 "--disable-tqdm")
    assert code == 0
    [path] = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"openai-sweep-40-40qps-tiny-\d{8}-\d{6}\.json", path.name)
    assert json.loads(path.read_text())["capacity_request_rate"] is None
