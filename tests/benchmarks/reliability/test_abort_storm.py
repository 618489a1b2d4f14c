"""``llmserve bench abort-storm``, the CI version: 100 concurrent streams, each hung up after 0 to 32
chunks. Every request ends cancelled by its client; the server goes idle (nothing runs or waits, no KV
block held); every abort freed its request's blocks within one engine step of reaching the engine core
(the step in flight when it came), as the server's ``llmserve:abort_latency_steps`` counts; the server
logged one "aborted" line per request and no traceback.

The step check reads the server's metrics: it fails when an abort waited two steps (a core that computed
one more step for a request whose client had left, which ``tests/engine/test_core_client.py`` shows the
core reports as two), when fewer aborts than requests reached the core, and it is left out for a server
that does not export the histogram."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from llmserve.benchmarks.reliability.abort_storm import abort_wait_check
from llmserve.engine.messages import AbortDelay
from llmserve.metrics.prometheus import EngineMetrics
from tests.benchmarks.reliability.checks import check_server, run_check


@pytest.fixture(scope="module")
def storm_server(llama_dir, tmp_path_factory):
    with check_server(llama_dir, tmp_path_factory.mktemp("abort-storm-logs")) as server:
        yield server


def test_abort_storm_frees_everything_at_once_and_logs_each_abort(storm_server):
    report = run_check("abort-storm", storm_server, "--requests", "100", "--server-log", str(storm_server.log_path),
                       "--log-settle", "0.2")
    assert report["cancelled"] == 100 and report["failed"] == 0, report
    assert report["aborts_in_engine_core"] == 100 and report["most_steps_from_abort_to_free"] <= 1, report
    assert report["checks"] == {"every_request_cancelled": True, "blocks_free_after_last_cancel": True,
                                "blocks_free_within_steps_of_abort": True, "one_log_line_per_abort": True,
                                "no_tracebacks_in_log": True}, report


def metrics_text(metrics: EngineMetrics, *aborts: AbortDelay) -> str:
    """The server's /metrics after a message of the engine core that carried ``aborts``."""
    stats = {"iteration_tokens": [], "aborts": list(aborts), "num_requests_running": 0, "num_requests_waiting": 0,
             "kv_cache_usage": 0.0, "num_preemptions": 0, "prompt_tokens": 0, "generation_tokens": 0,
             "prefix_cache_queries": 0, "prefix_cache_hits": 0, "kv_cache_waste": 0.0}
    metrics.record_step(stats, [])
    return generate_latest(metrics.registry).decode()


@pytest.mark.parametrize("waits, requests, expected", [
    ([0, 1, 1, 0], 4, (1.0, True)),
    ([0, 0], 2, (0.0, True)),
    ([0, 2, 1, 0], 4, (2.0, False)),     # one abort waited for a step after the one in flight
    ([0, 1, 0], 4, (1.0, False)),        # an abort never reached the core
    ([], 4, (None, False)),
])
def test_the_step_check_holds_only_if_every_abort_waited_at_most_one_step(waits, requests, expected):
    metrics = EngineMetrics("m")
    before = metrics_text(metrics, AbortDelay(5, 0.5))   # counted before the storm: not the storm's
    after = metrics_text(metrics, *(AbortDelay(steps, 0.01 * (steps + 1)) for steps in waits))
    report, passed = abort_wait_check(before, after, requests, max_steps=1)
    assert (report["most_steps_from_abort_to_free"], passed) == expected
    assert report["aborts_in_engine_core"] == len(waits)
    if waits:
        mean = sum(0.01 * (steps + 1) for steps in waits) / len(waits)
        assert report["mean_seconds_from_abort_to_free"] == pytest.approx(mean, abs=1e-4)


def test_a_server_without_the_histogram_is_not_step_checked():
    assert abort_wait_check("", "vllm:num_requests_running 0\n", 4, max_steps=1) is None
