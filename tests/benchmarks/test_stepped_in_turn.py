"""Engines stepped in turn: each run keeps at most its concurrency of requests in its engine, replacing each
finished one at once, and times only its own steps."""

from __future__ import annotations

import time

from llmserve.benchmarks.stepped_in_turn import SteadyConcurrency, generate_at_concurrency, run_in_turn
from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams


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
