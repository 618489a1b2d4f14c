"""``llmserve bench soak``, the CI version: 100 streaming clients for 60 s against the tiny checkpoint,
mixed prompt and output lengths, one request in ten dropped after a random number of chunks. No request
fails that its client did not cancel; after the drain nothing runs or waits and no KV block is held; the
server's memory (with its engine-core process) grows less than 5% from the end of the warm-up to the
end of the drain; p99 TTFT is reported."""

from __future__ import annotations

import pytest

from tests.benchmarks.reliability.checks import check_server, run_check


@pytest.fixture(scope="module")
def soak_server(llama_dir, tmp_path_factory):
    with check_server(llama_dir, tmp_path_factory.mktemp("soak-logs")) as server:
        yield server


def test_soak_100_clients_for_60_seconds(soak_server):
    report = run_check("soak", soak_server, "--clients", "100", "--duration", "60", "--ramp-up", "2")
    assert report["failed"] == 0 and report["rejected"] == 0, report["failures"]
    assert report["ok"] > 100 and report["cancelled"] > 0, report
    assert report["checks"] == {"no_failed_requests": True, "drained_with_no_blocks_held": True,
                                "rss_growth_below_limit": True}, report
    assert report["ttft_ms"]["p99"] is not None
