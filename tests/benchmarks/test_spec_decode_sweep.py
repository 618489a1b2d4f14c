"""``bench spec-decode --concurrency``: speculation on against off at each concurrency, alternating, with the
on/off ratios as speeds (throughput on / off, TPOT off / on) and the acceptance of the speculative engine."""

from __future__ import annotations

import json
import time

import pytest

from llmserve.benchmarks.spec_decode_sweep import (SteadyConcurrency, generate_at_concurrency, parse_concurrency,
                                                    run_in_turn)
from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams
from tests.benchmarks.test_offline import ENGINE, bench
from tests.benchmarks.test_spec_decode import NGRAM


@pytest.mark.parametrize("workload", ["repeat", "random"])
def test_sweep_reports_each_concurrency_with_ratios(tmp_path, llama_dir, capsys, workload):
    out = tmp_path / "sweep.json"
    assert bench("spec-decode", str(llama_dir), *ENGINE, "--speculative-config", NGRAM, "--concurrency", "1,3",
                 "--workload", workload, "--rounds", "2", "--passage-len", "16", "--repeat-len", "4",
                 "--output-len", "8", "--output-json", str(out)) == 0
    results = json.loads(out.read_text())["results"]
    assert results["workload"] == workload and results["rounds"] == 2
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


def test_requests_run_at_most_the_concurrency_at_once_each_replaced_when_it_finishes(llama_dir):
    llm = LLM(str(llama_dir), max_model_len=128, num_threads=1)
    try:
        prompts = [[5 + i, 6, 7, 8 + i] for i in range(7)]
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        in_engine: list[int] = []
        step = llm.engine.step

        def counting_step():
            in_engine.append(len(llm.engine.core.requests))
            return step()

        llm.engine.step = counting_step
        outputs = generate_at_concurrency(llm, prompts, params, 3)
        assert max(in_engine) == 3 and in_engine[0] == 3 and in_engine[-1] < 3   # a tail once the queue is empty
        expected = llm.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    finally:
        llm.shutdown()


def test_runs_stepped_in_turn_each_time_only_their_own_steps(llama_dir):
    """Two engines stepped in turn: each run's clock holds its own steps only (together about the wall time, each
    well under it), token times map into it, and the outputs are what each engine generates alone."""
    engines = [LLM(str(llama_dir), max_model_len=128, num_threads=1) for _ in range(2)]
    try:
        prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        runs = [SteadyConcurrency(llm, prompts, params, 3) for llm in engines]
        start = time.monotonic()
        run_in_turn(runs)
        wall = time.monotonic() - start
        assert all(run.done for run in runs)
        assert sum(run.seconds for run in runs) <= wall and all(run.seconds < 0.8 * wall for run in runs)
        expected = [o.outputs[0].token_ids for o in engines[0].generate(prompts, params)]
        for run in runs:
            assert [r.outputs[0].token_ids for r in run.results] == expected
            times = [run.own_time(t) for r in run.results
                     for t in (r.metrics.first_token_time, r.metrics.last_token_time)]
            assert 0 <= min(times) and max(times) <= run.seconds
            assert all(0 < tpot < run.seconds for tpot in run.tpots())
    finally:
        for llm in engines:
            llm.shutdown()


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
