"""``bench spec-decode --concurrency``: speculation on against off at each concurrency, alternating, with the
on/off ratios as speeds (throughput on / off, TPOT off / on) and the acceptance of the speculative engine."""

from __future__ import annotations

import json

import pytest

from llmserve.benchmarks.spec_decode_plot import load_sweep, plot_speedups
from llmserve.benchmarks.spec_decode_sweep import parse_concurrency
from tests.benchmarks.test_offline import ENGINE, bench
from tests.benchmarks.test_spec_decode import NGRAM


@pytest.mark.parametrize("workload", ["repeat", "random"])
def test_sweep_reports_each_concurrency_with_ratios(tmp_path, llama_dir, capsys, workload):
    out = tmp_path / "sweep.json"
    assert bench("spec-decode", str(llama_dir), *ENGINE, "--speculative-config", NGRAM, "--concurrency", "1,3",
                 "--workload", workload, "--rounds", "2", "--passage-len", "16", "--repeat-len", "4",
                 "--output-len", "8", "--output-json", str(out), "--plot", str(tmp_path / "sweep.png")) == 0
    results = json.loads(out.read_text())["results"]
    assert results["workload"] == workload and results["rounds"] == 2
    assert results["label"] == f"ngram, k=3: {workload} prompts"
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["concurrency"] for p in results["points"]] == [1, 3]
    assert [p["num_requests"] for p in results["points"]] == [4, 12]   # 4 per unit of concurrency by default
    for point in results["points"]:
        off, on = point["off"], point["on"]
        assert point["throughput_ratio"] == pytest.approx(on["output_throughput"] / off["output_throughput"])
        assert point["tpot_ratio"] == pytest.approx(off["mean_tpot_ms"] / on["mean_tpot_ms"])
        assert 0 <= point["differing_outputs"] <= 2 * point["concurrency"]
        assert len(point["throughput_ratio_per_round"]) == len(point["tpot_ratio_per_round"]) == 2
        assert min(point["tpot_ratio_per_round"]) - 1e-9 <= point["tpot_ratio"] <= max(point["tpot_ratio_per_round"]) + 1e-9
    assert "throughput on/off" in capsys.readouterr().out


def _sweep(label: str, ratios: list[float]) -> dict:
    return {"label": label, "points": [{"concurrency": c, "throughput_ratio": r, "tpot_ratio": r,
                                        "throughput_ratio_per_round": [r - 0.02, r + 0.02],
                                        "tpot_ratio_per_round": [r - 0.01, r + 0.01]}
                                       for c, r in zip((1, 8, 32), ratios)]}


def test_earlier_sweeps_share_the_figure(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"config": {}, "results": _sweep("ngram, k=6: random prompts", [1.1, 0.98, 1.0])}))
    sweeps = [load_sweep(str(earlier)), _sweep("draft, k=5: repeat prompts", [2.0, 1.0, 0.99])]
    png = tmp_path / "both.png"
    plot_speedups(sweeps, str(png), "two sweeps")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latency_json = tmp_path / "latency.json"
    latency_json.write_text(json.dumps({"results": [{"batch_size": 1}]}))
    unlabelled = tmp_path / "unlabelled.json"
    unlabelled.write_text(json.dumps({"results": {"points": []}}))
    for bad in (latency_json, unlabelled, tmp_path / "missing.json"):
        with pytest.raises(ValueError, match="not the --output-json of a bench spec-decode --concurrency run"):
            load_sweep(str(bad))


def test_parse_concurrency():
    assert parse_concurrency("1, 8,32,64") == [1, 8, 32, 64]
    for bad in ("", "0,8", "a"):
        with pytest.raises(ValueError, match="--concurrency"):
            parse_concurrency(bad)


def test_sweep_refusals(llama_dir):
    common = [str(llama_dir), *ENGINE, "--speculative-config", NGRAM]
    assert bench("spec-decode", *common, "--concurrency", "4", "--max-num-seqs", "2") == 2    # would queue
    assert bench("spec-decode", *common, "--concurrency", "1", "--rounds", "0") == 2
    assert bench("spec-decode", *common, "--concurrency", "1,4", "--num-prompts", "3") == 2   # 4 never at once
    assert bench("spec-decode", *common, "--num-prompts", "0") == 2
    assert bench("spec-decode", *common, "--workload", "random") == 2                         # sweep only
    assert bench("spec-decode", *common, "--plot", "x.png") == 2                               # sweep only
    assert bench("spec-decode", *common, "--concurrency", "1", "--plot-runs", "a.json") == 2   # no --plot
    assert bench("spec-decode", *common, "--concurrency", "1", "--plot", "x.png",
                 "--plot-runs", "missing.json") == 2
