"""Tensor parallelism for real: two processes joined over gloo, each building and loading its shard of
the tiny model, give the single-process logits (on every rank)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from llmserve.distributed import parallel_state
from llmserve.model_loader.loader import load_config, load_model
from tests.model_helpers import CPU, PROMPT, bind_cache, load_tiny, step_metadata

FAMILIES = ("llama", "llama3")   # llama3: tied embeddings, vocab 2000 padded to 2 x 1008 rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logits_of(model) -> torch.Tensor:
    with torch.inference_mode():
        ids, positions = torch.tensor(PROMPT), torch.arange(len(PROMPT))
        return model.compute_logits(model(ids, positions, step_metadata(bind_cache(model), 0, len(PROMPT))))


def _rank_main(rank: int, world_size: int, init_method: str, paths: list[str], configs: list[dict],
               out_dir: str) -> None:
    torch.set_num_threads(1)
    parallel_state.init_distributed(rank, world_size, 1, init_method)
    try:
        for family, path, config in zip(FAMILIES, paths, configs):
            # The config as plain attributes: a rank then never imports transformers' config classes (seconds).
            model = load_model(SimpleNamespace(**config), Path(path), torch.float32, CPU)
            assert model.model.layers[0].self_attn.num_heads == 4 // world_size
            torch.save(logits_of(model), Path(out_dir) / f"{family}-rank{rank}.pt")
    finally:
        parallel_state.destroy_distributed()


def test_two_ranks_over_gloo_match_one_process(checkpoint_dir, tmp_path):
    paths = [str(checkpoint_dir(f)) for f in FAMILIES]
    configs = [load_config(Path(p)).to_dict() for p in paths]
    context = mp.spawn(_rank_main, args=(2, f"tcp://127.0.0.1:{free_port()}", paths, configs, str(tmp_path)),
                       nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the TP=2 ranks did not finish in 180 s")
    for family, path in zip(FAMILIES, paths):
        expected = logits_of(load_tiny(Path(path)))
        for rank in range(2):
            got = torch.load(tmp_path / f"{family}-rank{rank}.pt")
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
