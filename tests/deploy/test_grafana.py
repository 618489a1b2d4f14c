"""The Grafana dashboard (deploy/grafana/llmserve.json) reads what the server exports.

Every panel query is valid PromQL once Grafana's variables are filled in, and every metric it names is one
llmserve's /metrics exposes (counters with their ``_total``, histograms with their ``_bucket``), so renaming
a metric without updating the dashboard fails here (the speculative-decoding panels read the counters the
server exports when speculation is on). Panels have unique ids, sit on the grid without
overlapping, and take the data source and the model from the dashboard's variables. The Prometheus scrape
example points at /metrics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmserve.metrics.prometheus import EngineMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy/grafana/llmserve.json").read_text())
PANELS = DASHBOARD["panels"]
EXPRESSIONS = [target["expr"] for panel in PANELS for target in panel["targets"]]


def exported_names() -> set[str]:
    text = generate_latest(EngineMetrics("tiny", num_speculative_tokens=4).registry).decode()   # + spec decoding
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_every_query_is_promql_over_exported_metrics(expr):
    promql = pytest.importorskip("promql_parser")
    promql.parse(expr.replace("$__rate_interval", "1m").replace("$model_name", ".*"))
    names = set(re.findall(r"\b((?:vllm|llmserve):[A-Za-z0-9_]+)", expr))
    assert names and names <= exported_names(), names - exported_names()
    assert 'model_name=~"$model_name"' in expr


def test_panels_are_laid_out_and_use_the_variables():
    assert len({panel["id"] for panel in PANELS}) == len(PANELS)
    cells = set()
    for panel in PANELS:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        covered = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not covered & cells, panel["title"]
        cells |= covered
        assert panel["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert variables == {"datasource", "model_name"}


def test_the_dashboard_covers_what_operators_watch():
    covered = " ".join(EXPRESSIONS)
    for metric in ("vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                   "vllm:time_per_output_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                   "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total",
                   "vllm:num_preemptions_total", "vllm:spec_decode_num_accepted_tokens_total",
                   "vllm:spec_decode_num_accepted_tokens_per_pos_total"):
        assert metric in covered


def test_scrape_example_reads_metrics():
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    assert "metrics_path: /metrics" in text and "job_name: llmserve" in text
