"""``bench spec-decode --concurrency ... --plot PNG``: the speed-up of speculation against concurrency.

Two panels, throughput on/off and TPOT off/on, each sweep a line through its ratios summed over the rounds with
each round's ratio as a faint dash beside it (their spread is the harness' noise), and the lines at 1 and at 0.97
(the rule: speculation configured is never below 0.97x of off); below them the same between 0.9 and 1.1, where a
batch-1 speed-up of 2x would otherwise flatten the rest onto one line. ``--plot-runs`` adds earlier sweeps' ``--output-json``
files, so that proposers and workloads measured in separate runs share one figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmserve.benchmarks.plotting import pyplot
from llmserve.spec_decode.config import SpeculativeConfig

RULE = 0.97
ZOOM = (0.9, 1.1)   # the lower panels' range


def sweep_label(spec: SpeculativeConfig, workload: str) -> str:
    """What a sweep compared, short enough for a legend: proposer, k, adaptive, workload."""
    proposer = Path(spec.model).name if spec.model else spec.method
    return f"{proposer}, k={spec.num_speculative_tokens}{', adaptive' if spec.adaptive else ''}: {workload} prompts"


def load_sweep(path: str) -> dict[str, Any]:
    """The results of an earlier sweep from its ``--output-json`` file."""
    try:
        with open(path) as f:
            results = json.load(f)["results"]
        missing = [key for key in ("points", "label") if key not in results]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--plot-runs {path}: not the --output-json of a bench spec-decode --concurrency run "
                         f"({type(e).__name__}: {e})") from None
    return results


def plot_speedups(sweeps: list[dict[str, Any]], path: str, title: str) -> None:
    """Draw ``sweeps`` (each a sweep's results) into the PNG ``path``."""
    plt = pyplot()
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.6), sharex=True)
    keys = (("throughput_ratio", "output throughput, on / off"), ("tpot_ratio", "TPOT, off / on"))
    levels = sorted({p["concurrency"] for sweep in sweeps for p in sweep["points"]})
    for row in range(2):   # the whole range, then near 1, where the rule is read
        for (key, name), ax in zip(keys, axes[row]):
            for i, sweep in enumerate(sweeps):
                xs = [p["concurrency"] for p in sweep["points"]]
                ax.plot(xs, [p[key] for p in sweep["points"]], "o-", color=f"C{i}", label=sweep["label"])
                for p in sweep["points"]:
                    rounds = p[f"{key}_per_round"]
                    ax.plot([p["concurrency"]] * len(rounds), rounds, "_", color=f"C{i}", alpha=0.6, markersize=10)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.axhline(RULE, color="red", linestyle="--", linewidth=0.8, label=f"{RULE} (the rule)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(name if row == 0 else f"{name}, between {ZOOM[0]} and {ZOOM[1]}", fontsize=10)
            if row == 1:
                ax.set_ylim(*ZOOM)
                ax.set_xlabel("concurrent requests")
        axes[row][0].set_ylabel("speed-up (each round's as a dash)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
