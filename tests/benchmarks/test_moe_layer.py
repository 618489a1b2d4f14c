"""The MoE-layer benchmark loads the experts as the model loader does and prints one row per token count, in either
dtype."""

from __future__ import annotations

import pytest
import torch

from llmserve.benchmarks.moe_layer import main, moe_layer
from llmserve.layers.cpu_kernels import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the benchmark measures the CPU kernels' MoE path")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_it_times_both_layers_at_each_token_count(capsys, dtype):
    main(["--dtype", dtype, "--tokens", "1", "5", "--repeats", "1"])
    out = capsys.readouterr().out
    assert out.startswith(f"{dtype}, ")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == ["| tokens", "dense MLP", "MoE layer", "MoE / dense |"]
    assert [row[0] for row in rows[1:]] == ["| 1", "| 5"]
    assert all(float(r[3].rstrip(" |")) == pytest.approx(float(r[2]) / float(r[1]), rel=0.05) for r in rows[1:])


def test_the_moe_layer_runs_on_blocked_experts():
    assert moe_layer(torch.bfloat16).w13_weight.dim() == 5   # [E, out/16, in/2, 16, 2]
