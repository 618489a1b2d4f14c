"""``bench spec-decode`` on the tiny checkpoint: both runs' TPOT, the speed-up between them, the acceptance
figures of the speculative run (none for the other), and equal greedy outputs; ``bench latency`` refuses
speculation (it times steps, which then emit several tokens)."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.test_offline import ENGINE, bench

NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'


def test_spec_decode_smoke(tmp_path, llama_dir, capsys):
    out = tmp_path / "spec.json"
    assert bench("spec-decode", str(llama_dir), *ENGINE, "--speculative-config", NGRAM, "--num-prompts", "2",
                 "--passage-len", "24", "--repeat-len", "6", "--output-len", "24", "--output-json", str(out)) == 0
    results = json.loads(out.read_text())["results"]
    assert results["off"]["num_drafts"] == 0 and results["on"]["num_drafts"] > 0
    assert 0 <= results["on"]["acceptance_rate"] <= 1 and results["on"]["mean_acceptance_length"] >= 1
    assert results["speedup_mean_tpot"] == pytest.approx(results["off"]["mean_tpot_ms"] / results["on"]["mean_tpot_ms"])
    assert "acceptance rate" in capsys.readouterr().out


def test_refusals():
    assert bench("spec-decode", "--num-prompts", "1") == 2                              # nothing to compare
    assert bench("spec-decode", "--speculative-config", NGRAM, "--rounds", "3") == 2    # a sweep's flag alone
    assert bench("latency", "--speculative-model", "[ngram]", "--num-speculative-tokens", "2") == 2
