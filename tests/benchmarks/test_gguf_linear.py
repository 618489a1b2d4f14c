"""The GGUF linear benchmark builds each packed layout from GGUF blocks and prints one row per layout."""

from __future__ import annotations

import pytest

from llmserve.benchmarks.gguf_linear import main

pytest.importorskip("gguf")


def test_it_times_every_layout_at_each_row_count(capsys):
    main(["--rows", "1", "3", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| layout | 1 rows: us (x float32) | 3 rows: us (x float32) |"
    assert [row.split(" (")[0] for row in rows[1:]] == ["| float32", "| bfloat16", "| Q4_K packed", "| Q6_K packed",
                                                        "| Q8_0 packed"]
    assert all(row.count("x)") == 2 for row in rows[1:])
