"""``llmserve bench abort-storm``, the CI version: 100 concurrent streams, each hung up after 0 to 32
chunks. Every request ends cancelled by its client; within two engine steps of the last hang-up nothing
runs or waits and no KV block is held (the step in flight when the server sees the hang-up, which it
does on its next write, plus at most one computed ahead); the server logged one "aborted" line per
request and no traceback."""

from __future__ import annotations

import pytest

from tests.benchmarks.reliability.checks import check_server, run_check


@pytest.fixture(scope="module")
def storm_server(llama_dir, tmp_path_factory):
    with check_server(llama_dir, tmp_path_factory.mktemp("abort-storm-logs")) as server:
        yield server


def test_abort_storm_frees_everything_at_once_and_logs_each_abort(storm_server):
    report = run_check("abort-storm", storm_server, "--requests", "100", "--server-log", str(storm_server.log_path))
    assert report["cancelled"] == 100 and report["failed"] == 0, report
    assert report["checks"] == {"every_request_cancelled": True, "blocks_free_after_last_cancel": True,
                                "blocks_free_within_steps_of_abort": True, "one_log_line_per_abort": True,
                                "no_tracebacks_in_log": True}, report
