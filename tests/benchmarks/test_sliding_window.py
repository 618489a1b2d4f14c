"""The sliding-window benchmark reports the window the engine found and the blocks its sequences held: on the
tiny Mistral given a 12-token window (``--window``), 4 requests of 8 + 40 tokens in 16 blocks of 4 tokens
(12 per request if it kept them all) run side by side, each in at most its window's and its prompt's blocks."""

from __future__ import annotations

import json

from llmserve.benchmarks.sliding_window import main
from tests.engine.test_hf_equivalence import llm_block_bytes


def test_reports_blocks_in_use_and_concurrency(checkpoint_dir, capsys):
    path = checkpoint_dir("mistral")
    main(["--model", str(path), "--window", "12", "--num-requests", "4", "--prompt-len", "8", "--output-len", "40",
          "--block-size", "4", "--kv-cache-memory-bytes", str(16 * llm_block_bytes(path, 4)),
          "--max-num-batched-tokens", "32"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["group_windows"] == [12] and report["num_blocks"] == 16
    assert report["max_running"] == 4 and report["preemptions"] == 0
    assert report["max_blocks_in_use"] <= 4 * (-(-(12 - 1 + 8) // 4) + 1)
    assert 0 < report["mean_blocks_in_use"] <= report["max_blocks_in_use"]
    assert 0 < report["mean_running"] <= report["max_running"]
    assert report["output_tokens_per_s"] > 0


def test_reports_the_groups_of_a_mixed_model(checkpoint_dir, capsys):
    """Gemma 2 (alternate sliding and full layers): a sliding and a full group, each block one layer's, so the
    same bytes hold twice the blocks of one that spans both layers."""
    path = checkpoint_dir("gemma2")
    main(["--model", str(path), "--num-requests", "2", "--prompt-len", "8", "--output-len", "24",
          "--block-size", "4", "--kv-cache-memory-bytes", str(16 * llm_block_bytes(path, 4)),
          "--max-num-batched-tokens", "32"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["group_windows"] == [10, None] and report["num_blocks"] == 32
    # each request: 8 full-group blocks and at most ceil((10 - 1 + 8) / 4) + 1 = 6 sliding-group ones
    assert report["max_running"] == 2 and report["max_blocks_in_use"] <= 2 * (8 + 6)
