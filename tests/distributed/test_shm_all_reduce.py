"""The shared-memory all-reduce / all-gather of a CPU tensor-parallel group, over real processes joined by
``parallel_state.init_distributed``: exact sums in rank order, bitwise the same on every rank, many calls
in a row (the parity of the sequence numbers), slot-sized pieces for what does not fit a slot, gloo for what
shared memory cannot take, an aborted step and the recovery after it, and no segment left behind."""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmserve.distributed import parallel_state, shm_all_reduce
from llmserve.distributed.shm_all_reduce import SHM_ALL_REDUCE_ENV, SHM_DIR, CollectiveAbortedError, ShmCommunicator

pytestmark = pytest.mark.skipif(not shm_all_reduce._supported_here(), reason="no /dev/shm or not x86-64")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUMELS = (1, 7, 1000, 65_537)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_input(rank: int, dtype: torch.dtype, numel: int, call: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * call + rank)
    return (torch.randn(numel, generator=g) * 3).to(dtype)


def reference_sum(world: int, dtype: torch.dtype, numel: int, call: int) -> torch.Tensor:
    parts = [rank_input(r, dtype, numel, call) for r in range(world)]
    if world > 2 and dtype != torch.float32:   # 16-bit with more than two ranks: float32 accumulation
        acc = parts[0].float()
        for p in parts[1:]:
            acc += p
        return acc.to(dtype)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


def mapped(name: str) -> bool:
    return name in Path("/proc/self/maps").read_text()


def _rank_main(rank: int, world: int, ports: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)
    parallel_state.init_distributed(rank, world, 1, f"tcp://127.0.0.1:{ports[0]}")
    results: dict[str, torch.Tensor] = {}
    tp = parallel_state.get_tp_group()
    shm = tp.shm
    try:
        assert shm is not None, "ranks on one machine get the shared-memory path"
        name = shm.name
        assert mapped(name) and not (SHM_DIR / name).exists(), "unlinked once every rank has it mapped"
        call = 0

        def expect_shm(fn, used: bool = True, calls: int = 1):
            before = shm._seq
            out = fn()
            assert shm._seq == before + int(used) * calls, "took the other path"
            return out

        # Sums for several sizes and dtypes, many calls in a row (both parities, sizes changing).
        for repeat in range(3):
            for dtype in DTYPES:
                for numel in NUMELS:
                    call += 1
                    x = rank_input(rank, dtype, numel, call)
                    out = expect_shm(lambda: tp.all_reduce(x))
                    assert out is x
                    torch.testing.assert_close(x, reference_sum(world, dtype, numel, call), rtol=0, atol=0)
                    results[f"sum-{call}"] = x.clone()
        for _ in range(200):   # the short calls a decode step makes, back to back
            call += 1
            x = rank_input(rank, torch.bfloat16, 4096, call)
            expect_shm(lambda: tp.all_reduce(x))
            assert torch.equal(x, reference_sum(world, torch.bfloat16, 4096, call))
        results["last-bf16"] = x

        # Two ranks: what gloo gives, bit for bit (sums in the dtype, rounded once per add).
        if world == 2:
            for dtype in DTYPES:
                call += 1
                x = rank_input(rank, dtype, 5000, call)
                y = x.clone()
                dist.all_reduce(y, group=tp.group)
                expect_shm(lambda: tp.all_reduce(x))
                assert torch.equal(x, y), dtype

        # A multi-dimensional tensor, and an inference tensor reduced outside inference mode.
        call += 1
        x = rank_input(rank, torch.float32, 6 * 40, call).view(6, 40)
        expect_shm(lambda: tp.all_reduce(x))
        assert torch.equal(x, reference_sum(world, torch.float32, 240, call).view(6, 40))
        call += 1
        with torch.inference_mode():
            x = rank_input(rank, torch.float32, 64, call)
        expect_shm(lambda: tp.all_reduce(x))
        assert torch.equal(x, reference_sum(world, torch.float32, 64, call))

        # All-gather, along the last and the first dim.
        for dim in (-1, 0):
            call += 1
            x = rank_input(rank, torch.float32, 3 * 5, call).view(3, 5)
            got = expect_shm(lambda: tp.all_gather(x, dim))
            want = torch.cat([rank_input(r, torch.float32, 15, call).view(3, 5) for r in range(world)], dim=dim)
            assert torch.equal(got, want)
            assert got.data_ptr() != x.data_ptr()

        # Broadcast: the member src's tensor on every rank, in place, through the segment.
        for src in range(world):
            x = torch.full((3, 4), rank * 10 + 1, dtype=torch.int64)
            assert expect_shm(lambda: tp.broadcast(x, src)) is x
            assert x.tolist() == [[src * 10 + 1] * 4] * 3

        # Gloo: a non-contiguous tensor, an integer tensor.
        call += 1
        base = rank_input(rank, torch.float32, 8 * 16, call).view(8, 16)
        x = base.t()
        assert not x.is_contiguous()
        expect_shm(lambda: tp.all_reduce(x), used=False)
        want = sum(rank_input(r, torch.float32, 128, call).view(8, 16) for r in range(world)).t()
        torch.testing.assert_close(x, want)
        got = expect_shm(lambda: tp.all_gather(x, 0), used=False)
        assert got.shape == (16 * world, 8)
        x = torch.full((10,), rank + 1, dtype=torch.int64)
        expect_shm(lambda: tp.all_reduce(x), used=False)
        assert x.tolist() == [world * (world + 1) // 2] * 10

        # Larger than a slot: in slot-sized pieces, the same sums; exactly a slot: one call.
        numel = shm.max_bytes // 4
        for extra, calls in ((1, 2), (0, 1)):
            call += 1
            x = rank_input(rank, torch.float32, numel + extra, call)
            expect_shm(lambda: tp.all_reduce(x), calls=calls)
            torch.testing.assert_close(x, reference_sum(world, torch.float32, numel + extra, call), rtol=0, atol=0)
        call += 1
        x = rank_input(rank, torch.float32, 2 * numel + 6, call).view(-1, 2)   # three pieces
        got = expect_shm(lambda: tp.all_gather(x, -1), calls=3)
        assert torch.equal(got, torch.cat([rank_input(r, torch.float32, 2 * numel + 6, call).view(-1, 2)
                                           for r in range(world)], dim=-1))

        # A step that fails on the last rank before a collective: the others' wait raises instead of hanging,
        # whatever each had already done; after the recovery the counters agree and sums are right again.
        x = torch.ones(8)
        if rank == world - 1:
            tp.abort_step()
        else:
            with pytest.raises(CollectiveAbortedError):
                tp.all_reduce(x)   # answered by nobody: the abort ends it
        tp.recover_after_failed_step()
        call += 1
        x = rank_input(rank, torch.float32, 100, call)
        expect_shm(lambda: tp.all_reduce(x))
        assert torch.equal(x, reference_sum(world, torch.float32, 100, call))

        # Interleaved with gloo, the sequence numbers stay in step.
        call += 1
        x = rank_input(rank, torch.float16, 333, call)
        expect_shm(lambda: tp.all_reduce(x))
        assert torch.equal(x, reference_sum(world, torch.float16, 333, call))
        results["final"] = x
    finally:
        parallel_state.destroy_distributed()
    assert parallel_state.get_tp_group().shm is None
    assert not mapped(name), "destroy_distributed unmaps the segment"
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")

    if world == 2:   # one rank opted out: the whole group stays on gloo, and still agrees
        if rank == 1:
            os.environ[SHM_ALL_REDUCE_ENV] = "0"
        parallel_state.init_distributed(rank, world, 1, f"tcp://127.0.0.1:{ports[1]}")
        try:
            assert parallel_state.get_tp_group().shm is None
            x = torch.full((4,), float(rank + 1))
            assert parallel_state.get_tp_group().all_reduce(x).tolist() == [3.0] * 4
            x = torch.full((4,), rank + 1)
            assert parallel_state.get_tp_group().broadcast(x, 1).tolist() == [2] * 4
        finally:
            parallel_state.destroy_distributed()
    Path(out_dir, f"rank{rank}.done").write_text(name)


def run_ranks(world: int, out_dir: Path) -> None:
    context = mp.spawn(_rank_main, args=(world, [free_port(), free_port()], str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish in 240 s")


@pytest.mark.parametrize("world", [2, 3])
def test_shm_collectives_over_real_processes(world, tmp_path):
    before = {p.name for p in SHM_DIR.iterdir()}
    run_ranks(world, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert results[0].keys() == results[1].keys() and len(results[0]) == 38
    for rank_results in results[1:]:   # bitwise the same on every rank
        for key, value in results[0].items():
            assert torch.equal(value, rank_results[key]), key
    name = (tmp_path / "rank0.done").read_text()
    assert name.startswith("llmserve-allreduce-")
    assert not (SHM_DIR / name).exists()
    assert not {p.name for p in SHM_DIR.iterdir()} - before, "no segment left in /dev/shm"


def test_a_dead_peer_raises_instead_of_hanging(monkeypatch):
    """A rank whose peer died before publishing gives up (after SLEEP_AFTER_S, at a peer check)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    comm = ShmCommunicator(0, 2, mmap.mmap(-1, 4096 + 4 * 4096), 4096, "test", [dead.pid])
    monkeypatch.setattr(shm_all_reduce, "SLEEP_AFTER_S", 0.001)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="died"):
        comm.all_reduce(torch.ones(16))
    assert time.monotonic() - start < 30
    comm.close()
