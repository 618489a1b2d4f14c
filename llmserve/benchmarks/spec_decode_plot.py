"""``bench spec-decode --concurrency ... --plot PNG``: the speed-up of speculation against concurrency.

Two panels, throughput on/off and TPOT off/on, each sweep a line through its ratios summed over the rounds with
each round's ratio as a faint mark beside it (their spread is the harness' noise), and the lines at 1 and at 0.97
(the rule: speculation configured is never below 0.97x of off). ``--plot-runs`` adds earlier sweeps' ``--output-json``
files, so that proposers and workloads measured in separate runs share one figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmserve.benchmarks.plotting import pyplot
from llmserve.spec_decode.config import SpeculativeConfig

RULE = 0.97


def sweep_label(spec: SpeculativeConfig, workload: str) -> str:
    """What a sweep compared, short enough for a legend: proposer, k, adaptive, workload."""
    proposer = Path(spec.model).name if spec.model else spec.method
    return f"{proposer}, k={spec.num_speculative_tokens}{', adaptive' if spec.adaptive else ''}: {workload} prompts"


def load_sweep(path: str) -> dict[str, Any]:
    """The results of an earlier sweep from its ``--output-json`` file."""
    try:
        with open(path) as f:
            results = json.load(f)["results"]
        results["points"], results["label"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--plot-runs {path}: not the --output-json of a bench spec-decode --concurrency run "
                         f"({type(e).__name__}: {e})") from None
    return results


def plot_speedups(sweeps: list[dict[str, Any]], path: str, title: str) -> None:
    """Draw ``sweeps`` (each a sweep's results) into the PNG ``path``."""
    plt = pyplot()
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    panels = ((axes[0], "throughput_ratio", "output throughput, on / off"), (axes[1], "tpot_ratio", "TPOT, off / on"))
    levels = sorted({p["concurrency"] for sweep in sweeps for p in sweep["points"]})
    for i, sweep in enumerate(sweeps):
        color = f"C{i}"
        for ax, key, _ in panels:
            xs = [p["concurrency"] for p in sweep["points"]]
            ax.plot(xs, [p[key] for p in sweep["points"]], "o-", color=color, label=sweep["label"])
            for p in sweep["points"]:
                rounds = p[f"{key}_per_round"]
                ax.plot([p["concurrency"]] * len(rounds), rounds, "_", color=color, alpha=0.5, markersize=9)
    for ax, _, ylabel in panels:
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(RULE, color="red", linestyle="--", linewidth=0.8, label=f"{RULE} (the rule)" if ax is axes[0] else None)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("concurrent requests")
        ax.set_title(ylabel, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up (each round's as a dash)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
