"""Gloo against the shared-memory path, for the collectives of tensor parallelism on CPU.

``python -m llmserve.benchmarks.collectives`` spawns two ranks on this machine (one thread each, as a
TP=2 worker on a 2-core machine has), joins them over gloo as the engine does, and times the all-reduce
(and with ``--all-gather`` the all-gather) of float32 tensors from 1 KiB to 8 MiB through gloo and
through :mod:`llmserve.distributed.shm_all_reduce` (its segment sized for the largest tensor, whatever
the dispatch threshold). Each figure is rank 0's median over many back-to-back calls; a last column
says which is faster. ``shm_all_reduce.MAX_BYTES`` comes from this table. ``--contend N`` runs N
processes that only burn CPU meanwhile (a machine with more runnable processes than cores), which is
where the waiting ranks' ``sched_yield`` (``--spin-checks``) matters.

``--model DIR`` instead runs that checkpoint at tensor-parallel 2 (two workers as the ``mp`` executor
builds them, ``--threads`` each) through a prefill and ``--steps`` decode steps per batch size, and
reports rank 0's step time and the share of it spent in the TP collectives (the all-reduces after each
attention and MLP block, the LM head's all-gather).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmserve.distributed import parallel_state, shm_all_reduce

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _iterations(nbytes: int, scale: float) -> int:
    return max(30, min(3000, int(scale * (32 << 20) / nbytes)))


def _median_us(fn, iterations: int) -> float:
    for _ in range(min(10, iterations)):
        fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _burn() -> None:
    while True:
        pass


def _rank_main(rank: int, init_method: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    shm_all_reduce.SPIN_CHECKS = args.spin_checks
    parallel_state.init_distributed(rank, 2, 1, init_method)
    group = parallel_state.get_tp_group()
    sizes = [1 << k for k in range(args.min_kib.bit_length() - 1 + 10, args.max_mib.bit_length() - 1 + 21)]
    shm = shm_all_reduce.ShmCommunicator.create(group.group, rank, 2, max_bytes=sizes[-1])
    try:
        if shm is None:
            raise SystemExit("the shared-memory path is unavailable here (see the log)")
        dtype = DTYPES[args.dtype]
        rows = []
        for nbytes in sizes:
            numel = nbytes // torch.empty((), dtype=dtype).element_size()
            x = torch.randn(numel).to(dtype) + rank
            expected = x.clone()
            dist.all_reduce(expected, group=group.group)
            got = shm.all_reduce(x.clone())
            assert torch.equal(got, expected), f"shm and gloo disagree at {nbytes} bytes"
            iterations = _iterations(nbytes, args.scale)
            row = [nbytes]
            ops = [("all_reduce", lambda: dist.all_reduce(x, group=group.group), lambda: shm.all_reduce(x))]
            if args.all_gather:
                ops.append(("all_gather", lambda: dist.all_gather([torch.empty_like(x), torch.empty_like(x)], x,
                                                                  group=group.group),
                            lambda: shm.all_gather(x)))
            for _, gloo_fn, shm_fn in ops:
                x.copy_(expected)
                dist.barrier(group=group.group)
                gloo_us = _median_us(gloo_fn, iterations)
                x.copy_(expected)   # the repeated sums grow; keep them finite
                dist.barrier(group=group.group)
                shm_us = _median_us(shm_fn, iterations)
                row += [gloo_us, shm_us]
            rows.append(row)
        if rank == 0:
            _print_table(rows, args)
    finally:
        if shm is not None:
            shm.close()
        parallel_state.destroy_distributed()


class _Timed:
    """Wraps a collective and adds up the seconds spent in it."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def _model_main(rank: int, init_method: str, args: argparse.Namespace) -> None:
    from llmserve.config import EngineConfig
    from llmserve.engine.messages import CachedSequenceData, NewSequenceData, SchedulerOutput
    from llmserve.sampling_params import SamplingParams
    from llmserve.worker.worker import Worker, WorkerPlacement

    config = EngineConfig(model=args.model, tensor_parallel_size=2, num_threads=2 * args.threads,
                          kv_cache_memory_bytes="1GiB")
    worker = Worker(config, WorkerPlacement(rank, 2, 1, init_method), max_model_len=4096, max_num_batched_tokens=8192)
    worker.init_device()
    worker.load_model()
    bs = config.block_size
    blocks_per_seq = -(-(args.input_len + args.steps + 1) // bs)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    worker.initialize_cache(max(batch_sizes) * blocks_per_seq)
    group = parallel_state.get_tp_group()
    reduce_timer, gather_timer = _Timed(group.all_reduce), _Timed(group.all_gather)
    group.all_reduce, group.all_gather = reduce_timer, gather_timer   # the layers hold this object
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 1, ignore_eos=True)
    rows = []
    next_id = 0
    for batch in batch_sizes:
        ids = list(range(next_id, next_id + batch))
        next_id += batch
        new = [NewSequenceData(i, 0, [(7 * i + j) % 1000 + 10 for j in range(args.input_len)], [], params, None,
                               list(range(k * blocks_per_seq, (k + 1) * blocks_per_seq)), 0) for k, i in enumerate(ids)]
        worker.execute_model(SchedulerOutput(new_seqs=new, num_scheduled_tokens={i: args.input_len for i in ids}))
        step_s = collective_s = 0.0
        for step in range(args.steps):
            computed = args.input_len + step
            sched = SchedulerOutput(cached_seqs=[CachedSequenceData(i, [11], blocks_per_seq, [], computed) for i in ids],
                                    num_scheduled_tokens={i: 1 for i in ids})
            before = reduce_timer.seconds + gather_timer.seconds
            start = time.perf_counter()
            worker.execute_model(sched)
            step_s += time.perf_counter() - start
            collective_s += reduce_timer.seconds + gather_timer.seconds - before
        worker.execute_model(SchedulerOutput(finished_seq_ids=ids))
        rows.append((batch, 1e3 * step_s / args.steps, 1e3 * collective_s / args.steps))
    if rank == 0:
        print(f"{args.model}: tensor-parallel 2, {args.threads} thread(s) per rank, {args.steps} decode steps "
              f"after a {args.input_len}-token prefill; rank 0")
        print(f"{'batch':>6} | {'step ms':>8} | {'collectives ms':>14} | {'share':>6}")
        for batch, step_ms, coll_ms in rows:
            print(f"{batch:>6} | {step_ms:>8.2f} | {coll_ms:>14.2f} | {100 * coll_ms / step_ms:>5.1f}%")
    parallel_state.destroy_distributed()


def _print_table(rows: list[list], args: argparse.Namespace) -> None:
    def size(n: int) -> str:
        return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"

    ops = ["all_reduce"] + (["all_gather"] if args.all_gather else [])
    header = f"{'size':>8}" + "".join(f" | {op + ' gloo us':>18} {'shm us':>8} {'faster':>6}" for op in ops)
    print(f"{args.dtype}, 2 ranks, {args.threads} thread(s) each, {args.contend} CPU burner(s), "
          f"spin checks {args.spin_checks}, median per call (rank 0)")
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{size(row[0]):>8}"
        for i in range(len(ops)):
            gloo_us, shm_us = row[1 + 2 * i], row[2 + 2 * i]
            line += f" | {gloo_us:>18.1f} {shm_us:>8.1f} {'shm' if shm_us < gloo_us else 'gloo':>6}"
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--min-kib", type=int, default=1, help="smallest tensor, KiB (a power of two)")
    parser.add_argument("--max-mib", type=int, default=8, help="largest tensor, MiB (a power of two)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--scale", type=float, default=1.0, help="scales the number of calls per size")
    parser.add_argument("--all-gather", action="store_true", help="also time the all-gather")
    parser.add_argument("--spin-checks", type=int, default=shm_all_reduce.SPIN_CHECKS,
                        help="flag checks before a waiting rank starts to sched_yield")
    parser.add_argument("--contend", type=int, default=0, help="CPU-burning processes to run meanwhile")
    parser.add_argument("--model", default=None, help="time a TP=2 model's decode steps instead (checkpoint folder)")
    parser.add_argument("--batch-sizes", default="1,64", help="--model: decode batch sizes")
    parser.add_argument("--input-len", type=int, default=128, help="--model: prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=32, help="--model: decode steps timed per batch size")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    burners = [ctx.Process(target=_burn, daemon=True) for _ in range(args.contend)]
    for burner in burners:
        burner.start()
    try:
        target = _model_main if args.model else _rank_main
        mp.spawn(target, args=(f"tcp://127.0.0.1:{_free_port()}", args), nprocs=2, join=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.join()


if __name__ == "__main__":
    main()
