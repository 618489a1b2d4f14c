"""KV blocks in use and sequences running at once for long generations on a model with sliding-window layers.

``python -m llmserve.benchmarks.sliding_window --model DIR`` sends ``--num-requests`` requests of
``--prompt-len`` random tokens generating ``--output-len`` tokens each (greedy, EOS ignored) into a cache of
``--kv-cache-memory-bytes``, steps the engine to the end and reports, as one JSON line: the most sequences
that ran in one step and their mean over steps, the most KV blocks in use after a step and their mean,
preemptions, steps, and generated tokens per second. The blocks out of a sliding layer's window are freed
(:mod:`llmserve.engine.block_manager`; a model that mixes full and sliding layers frees its sliding groups'),
so the same cache runs more sequences at once; the report names the KV-cache groups' windows the engine
found (``[null]``: one group that keeps every block). ``--window N`` first rewrites the checkpoint's
``sliding_window`` on every layer into a copy (for a generated checkpoint that has none).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams


def with_window(model: str, window: int, into: Path) -> str:
    """A copy of checkpoint folder ``model`` whose config slides ``window`` tokens on every layer."""
    path = Path(shutil.copytree(model, into / "model"))
    config = json.loads((path / "config.json").read_text())
    config.update(sliding_window=window, use_sliding_window=True, max_window_layers=0)
    config.pop("layer_types", None)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def run(model: str, num_requests: int, prompt_len: int, output_len: int, block_size: int,
        kv_cache_memory_bytes: str, max_num_batched_tokens: int, seed: int = 0,
        pipeline_parallel_size: int = 1) -> dict[str, Any]:
    llm = LLM(model, block_size=block_size, kv_cache_memory_bytes=kv_cache_memory_bytes,
              max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False,
              max_model_len=prompt_len + output_len, pipeline_parallel_size=pipeline_parallel_size)
    engine = llm.engine
    vocab = engine.vocab_size
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i in range(num_requests):
        engine.add_request(str(i), [rng.randrange(3, vocab) for _ in range(prompt_len)], params)
    blocks = engine.block_manager
    most_running = most_blocks = steps = block_steps = running_steps = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        in_use = blocks.num_blocks - blocks.num_free_blocks
        most_running = max(most_running, len(engine.scheduler.running))
        running_steps += len(engine.scheduler.running)
        most_blocks = max(most_blocks, in_use)
        steps += 1
        block_steps += in_use
    elapsed = time.perf_counter() - start
    result = {"group_windows": blocks.group_windows, "num_blocks": blocks.num_blocks,
              "block_size": block_size, "max_running": most_running,
              "mean_running": round(running_steps / max(1, steps), 2), "max_blocks_in_use": most_blocks,
              "mean_blocks_in_use": round(block_steps / max(1, steps), 1), "steps": steps,
              "preemptions": engine.scheduler.num_preemptions,
              "output_tokens_per_s": round(num_requests * output_len / elapsed, 1)}
    llm.shutdown()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory")
    parser.add_argument("--window", type=int, help="rewrite the checkpoint's sliding_window (every layer) in a copy")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=768)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory-bytes", default="1MiB")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1,
                        help="pipeline stages (one worker process each; the cache bytes are per rank)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = with_window(args.model, args.window, Path(tmp)) if args.window else args.model
        print(json.dumps(run(model, args.num_requests, args.prompt_len, args.output_len, args.block_size,
                             args.kv_cache_memory_bytes, args.max_num_batched_tokens,
                             pipeline_parallel_size=args.pipeline_parallel_size)))


if __name__ == "__main__":
    main()
