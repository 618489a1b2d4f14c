"""``llmserve bench overload``, the CI version, against a server whose engine steps take at least 10 ms
(so its capacity does not depend on the machine) with ``--max-num-seqs 4 --max-num-queued-reqs 4``:
after measuring capacity with 4 clients, requests arrive at 3x capacity for 10 s. The excess is refused
with 503 and ``Retry-After`` (never another failure), admitted requests finish within twice (queue limit
/ capacity + baseline p99), and at half capacity afterwards nothing is refused and latency is back
within twice the baseline."""

from __future__ import annotations

import pytest

from tests.benchmarks.reliability.checks import check_server, run_check
from tests.entrypoints.openai.conftest import HERE


@pytest.fixture(scope="module")
def overload_server(llama_dir, tmp_path_factory):
    with check_server(llama_dir, tmp_path_factory.mktemp("overload-logs"), "--max-num-seqs", "4",
                      "--max-num-queued-reqs", "4", "--step-delay", "0.01", wrapper=HERE / "slow_server.py") as server:
        yield server


def test_overload_refuses_the_excess_and_recovers(overload_server):
    report = run_check("overload", overload_server, "--max-num-queued-reqs", "4", "--concurrency", "4",
                       "--output-len", "32:32", "--capacity-seconds", "5", "--overload-seconds", "10",
                       "--recovery-seconds", "10")
    assert report["overload"]["rejected"] > 0 and report["overload"]["ok"] > 0, report
    assert all(report["checks"].values()), report
