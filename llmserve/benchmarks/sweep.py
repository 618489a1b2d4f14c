"""``llmserve bench sweep``: ``bench serve`` at increasing request rates, a plot, and the capacity.

Each rate gets fresh requests (seed + rate index, so the server's prefix cache never serves a prompt
from an earlier rate) with Poisson arrivals. The PNG shows p50/p99 TTFT, p50/p99 TPOT and throughput
against the offered rate; the capacity printed is the highest rate at which that rate and every lower
one meet all ``--slo`` targets with no failed request: the rate to provision against.

``--save-result`` saves every rate's metrics and the capacity as JSON, with ``bench serve``'s result
flags (``--result-dir``, ``--result-filename``, ``--append-result``, ``--metadata``, ``--label``); the
default file name is ``{backend}-sweep-{lowest}-{highest}qps[-concurrency{N}]-{model}-{date}.json``.

SLOs are ``METRIC_STAT:MS`` with METRIC one of ttft, tpot, itl, e2el and STAT mean, median or pNN,
e.g. ``--slo ttft_p99:2000 tpot_p99:100``.
"""

from __future__ import annotations

import argparse
import copy
import re
from typing import Any

from llmserve.benchmarks.metrics import DETAIL_FIELDS, METRIC_NAMES, parse_metric_list, parse_percentiles
from llmserve.benchmarks.plotting import pyplot, require_matplotlib
from llmserve.benchmarks.results import default_filename, save_result, saving
from llmserve.benchmarks.serve import benchmark_at_rate, build_requests, prepare, result_header

SWEEP_FIELDS = ("request_rates", "slo", "capacity_request_rate", "points")   # besides serve's header
SLO_PATTERN = re.compile(r"^(ttft|tpot|itl|e2el)_(mean|median|p\d+(?:\.\d+)?)$")


def parse_rates(value: str) -> list[float]:
    try:
        rates = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--request-rates must be comma-separated numbers, got {value!r}") from None
    if not rates or any(not 0 < r < float("inf") for r in rates):
        raise ValueError(f"--request-rates must be finite and > 0, got {value!r}")
    return sorted(rates)


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """``ttft_p99:2000`` -> {"p99_ttft_ms": 2000.0} (keys as in the serve metrics)."""
    slos: dict[str, float] = {}
    for item in items or []:
        for pair in item.replace(",", " ").split():
            name, sep, value = pair.partition(":")
            match = SLO_PATTERN.match(name)
            if not sep or not match:
                raise ValueError(f"invalid --slo {pair!r}: use METRIC_STAT:MS, METRIC one of {', '.join(METRIC_NAMES)}"
                                 ", STAT mean, median or pNN (e.g. ttft_p99:2000)")
            metric, stat = match.groups()
            if stat.startswith("p"):
                stat = f"p{float(stat[1:]):g}"
            try:
                slos[f"{stat}_{metric}_ms"] = float(value)
            except ValueError:
                raise ValueError(f"invalid --slo value in {pair!r}: not a number") from None
    return slos


def slo_metrics_and_percentiles(slos: dict[str, float]) -> tuple[list[str], list[float]]:
    """Metrics and percentiles every SLO needs, plus what the plot draws (p50/p99 TTFT and TPOT)."""
    metrics = {"ttft", "tpot"}
    percentiles = {50.0, 99.0}
    for key in slos:
        stat, metric, _ = key.split("_")
        metrics.add(metric)
        if stat.startswith("p"):
            percentiles.add(float(stat[1:]))
    return [m for m in METRIC_NAMES if m in metrics], sorted(percentiles)


def meets(metrics: dict[str, Any], slos: dict[str, float]) -> bool:
    return metrics["failed"] == 0 and all(metrics[key] <= limit for key, limit in slos.items())


def capacity(points: list[dict[str, Any]]) -> float | None:
    """The highest rate such that it and every lower rate met the SLOs (``None`` if the lowest did not)."""
    best = None
    for point in points:
        if not point["meets_slo"]:
            break
        best = point["request_rate"]
    return best


def plot_sweep(points: list[dict[str, Any]], slos: dict[str, float], path: str, title: str,
               capacity_rate: float | None) -> None:
    plt = pyplot()
    import matplotlib.ticker

    rates = [p["request_rate"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, label in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        ax.plot(rates, [p["metrics"][f"median_{metric}_ms"] for p in points], "o-", label="p50")
        ax.plot(rates, [p["metrics"][f"p99_{metric}_ms"] for p in points], "s-", label="p99")
        for key, limit in slos.items():
            if key.endswith(f"_{metric}_ms"):
                ax.axhline(limit, color="red", linestyle="--", linewidth=1, label=f"SLO {key[:-3]} {limit:g}")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    ax = axes[2]
    ax.plot(rates, [p["metrics"]["output_throughput"] for p in points], "o-", color="tab:green",
            label="output tokens/s")
    ax.set_ylabel("output tokens/s")
    twin = ax.twinx()
    twin.plot(rates, [p["metrics"]["request_throughput"] for p in points], "s--", color="tab:purple",
              label="completed req/s")
    twin.plot(rates, rates, ":", color="gray", label="offered req/s")
    twin.set_ylabel("requests/s")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    for ax in axes:
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:2]:
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if capacity_rate is not None:
            ax.axvline(capacity_rate, color="red", alpha=0.3, linewidth=6)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(title + (f" - capacity {capacity_rate:g} req/s" if capacity_rate is not None else
                          " - no rate meets the SLO"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    rates = parse_rates(args.request_rates)
    slos = parse_slos(args.slo)
    needed_metrics, needed_percentiles = slo_metrics_and_percentiles(slos)
    args.percentile_metrics = ",".join(m for m in METRIC_NAMES if m in set(needed_metrics)
                                       | set(parse_metric_list(args.percentile_metrics)))
    args.metric_percentiles = ",".join(f"{p:g}" for p in sorted(set(needed_percentiles)
                                                                  | set(parse_percentiles(args.metric_percentiles))))
    if args.plot:
        require_matplotlib("bench sweep (--plot '' for no plot)")
    target, tokenizer, requests = prepare(args, SWEEP_FIELDS)
    points = []
    print(f"{'rate':>7} {'done req/s':>10} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
          f"{'TPOT p99':>9} {'failed':>6}  SLO")
    for i, rate in enumerate(rates):
        run_args = copy.copy(args)
        run_args.seed = args.seed + i
        run_requests = requests if i == 0 else build_requests(run_args, target, tokenizer)
        metrics = benchmark_at_rate(target, run_requests, tokenizer, rate, run_args, description=f"rate {rate:g}")
        for name in DETAIL_FIELDS:
            metrics.pop(name, None)
        ok = meets(metrics, slos)
        points.append({"request_rate": rate, "meets_slo": ok, "metrics": metrics})
        print(f"{rate:>7g} {metrics['request_throughput']:>10.2f} {metrics['output_throughput']:>10.1f} "
              f"{metrics['median_ttft_ms']:>9.1f} {metrics['p99_ttft_ms']:>9.1f} {metrics['median_tpot_ms']:>9.1f} "
              f"{metrics['p99_tpot_ms']:>9.1f} {metrics['failed']:>6}  {'met' if ok else 'MISSED'}")
    cap = capacity(points)
    slo_text = ", ".join(f"{k[:-3]} <= {v:g} ms" for k, v in slos.items()) or "no SLO given"
    if cap is None:
        print(f"capacity: no tested rate meets the SLO ({slo_text})")
    else:
        print(f"capacity: {cap:g} req/s is the highest tested rate that meets the SLO ({slo_text})"
              + (" at every rate up to it" if len(points) > 1 else ""))
    result = dict(result_header(args, target, tokenizer, float("inf")), request_rate=None,
                  request_rates=rates, slo=slos, capacity_request_rate=cap, points=points)
    if args.plot:
        plot_sweep(points, slos, args.plot, f"{target.model} {target.endpoint}, {args.dataset_name}, "
                   f"{args.num_prompts} requests per rate", cap)
        print(f"plot: {args.plot}")
    if saving(args):
        name = default_filename(args.label or f"{target.backend}-sweep", f"{rates[0]:g}-{rates[-1]:g}",
                                args.max_concurrency, target.model, result["date"])
        print(f"result: {save_result(args, result, name)}")
    return result
