"""The quantised-experts benchmark builds each layer through the checkpoint loaders and prints one row per format."""

from __future__ import annotations

from llmserve.benchmarks.quantized_experts import main


def test_it_times_every_format_at_each_token_count(capsys):
    main(["--tokens", "1", "3", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| experts | 1 tokens: us (x float32) | 3 tokens: us (x float32) |"
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| float32", "| GPTQ 4-bit group 128", "| AWQ 4-bit group 128",
                                                          "| compressed-tensors W8A8"]
    assert all(row.count("x)") == 2 for row in rows[1:])
