"""The LoRA-kernel benchmark times one adapter and a mix on every library it is given, per projection and in all."""

from __future__ import annotations

import pytest

from llmserve.benchmarks.lora_kernel import main
from llmserve.layers.cpu_kernel_build import build_library
from llmserve.layers.cpu_kernels import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the benchmark measures the CPU LoRA kernel")


def table(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and "---" not in line]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_it_times_one_adapter_and_a_mix_per_library(capsys, dtype):
    library = build_library()
    main(["--rank", "4", "--adapters", "3", "--rows", "6", "--layers", "1", "--repeats", "1", "--dtype", dtype,
          "--library", str(library), "--library", str(library)])
    out = capsys.readouterr().out
    assert out.startswith(f"{dtype}, rank 4, 6 rows, 1 layers, ")
    assert f"library 1: {library}" in out
    rows = table(out)
    assert rows[0] == ["library", "adapters", "qkv_proj", "o_proj", "gate_up_proj", "down_proj", "all"]
    assert [row[:2] for row in rows[1:]] == [["0", "1"], ["0", "3 mixed"], ["1", "1"], ["1", "3 mixed"]]
    for row in rows[1:]:
        assert float(row[6]) == pytest.approx(sum(float(t) for t in row[2:6]), abs=0.011)


def test_a_mix_needs_a_row_per_adapter():
    with pytest.raises(SystemExit):
        main(["--adapters", "8", "--rows", "4"])
