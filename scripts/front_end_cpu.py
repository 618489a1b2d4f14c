"""CPU time the API server process and the load generator spend per 1,000 streamed tokens.

Starts ``llmserve serve`` once per ``--source`` (a checkout whose ``llmserve`` the server imports, so two
versions can be compared in one session; its engine core is a child process, not counted), then runs
``llmserve bench serve``'s load loop (the ``--source``'s own) in a fresh process per run, alternating
between the servers, once per ``--concurrency``, ``--runs`` times. Each run prints the server process's
CPU seconds (all its threads, not its children), the engine-core process's and the load generator's, per
1,000 completion tokens, and their context switches (voluntary + involuntary, all threads) per 1,000
tokens. On a machine whose cores the step loop's threads fill, the server's and the load generator's CPU
is taken from the steps: it is the part of the HTTP-vs-offline gap that this script measures.

    python scripts/front_end_cpu.py --model ~/.cache/llmserve/models/llmserve-demo-llama-125m \
        --source /path/to/before /path/to/after --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from llmserve.benchmarks.datasets import allowed_token_ids, sample_random
from llmserve.benchmarks.serve import Target, run_benchmark


def switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of ``pid``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def engine_core_pid(server_pid: int) -> int:
    """The server's engine-core process: its spawned child (not multiprocessing's resource tracker)."""
    for child in psutil.Process(server_pid).children():
        if "spawn_main" in " ".join(child.cmdline()):
            return child.pid
    raise SystemExit(f"no engine-core process under the server (pid {server_pid})")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise SystemExit("the server did not start")


def client(url: str, concurrency: int, num: int, input_len: int, output_len: int) -> None:
    """One timed load (the importing checkout's load generator); prints its figures as JSON."""
    models = httpx.get(url + "/v1/models").json()["data"]
    target = Target(url, "/v1/completions", models[0]["id"], sampling={"temperature": 0.0})
    requests = sample_random(num, input_len, output_len, 0.0, 0, token_ids=allowed_token_ids(32000, low=100))
    own = resource.getrusage(resource.RUSAGE_SELF)
    results, duration = asyncio.run(run_benchmark(target, requests, float("inf"), concurrency,
                                                  ignore_eos=True, disable_tqdm=True))
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"tokens": sum(r.output_tokens for r in results if r.success),
                      "failed": sum(not r.success for r in results), "duration": duration,
                      "cpu": after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime,
                      "switches": after.ru_nvcsw + after.ru_nivcsw - own.ru_nvcsw - own.ru_nivcsw}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--source", nargs="+", default=[str(Path(__file__).resolve().parents[1])])
    parser.add_argument("--port", type=int, default=8123, help="the first server's; the next ones count up")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--num-prompts", type=int, nargs="+", default=[64, 4],
                        help="requests per run, one per --concurrency")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--client", nargs=3, type=str, help=argparse.SUPPRESS)   # internal: URL CONCURRENCY NUM
    args = parser.parse_args()
    if args.client:
        client(args.client[0], int(args.client[1]), int(args.client[2]), args.input_len, args.output_len)
        return

    servers = []
    try:
        for i, source in enumerate(args.source):
            env = dict(os.environ, PYTHONPATH=source)
            proc = subprocess.Popen([sys.executable, "-m", "llmserve.entrypoints.cli", "serve", args.model,
                                     "--dtype", args.dtype, "--port", str(args.port + i),
                                     "--kv-cache-memory-bytes", "2GiB"], cwd=source, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append((source, f"http://127.0.0.1:{args.port + i}", proc, env))
        for _, url, proc, _ in servers:
            wait_ready(url, proc)
        cores = {proc.pid: engine_core_pid(proc.pid) for _, _, proc, _ in servers}
        for run in range(args.runs):
            for concurrency, num in zip(args.concurrency, args.num_prompts):
                for source, url, proc, env in servers:
                    s_cpu, s_sw = cpu(proc.pid), switches(proc.pid)
                    c_cpu, c_sw = cpu(cores[proc.pid]), switches(cores[proc.pid])
                    out = subprocess.run([sys.executable, __file__, "--model", args.model, "--input-len",
                                          str(args.input_len), "--output-len", str(args.output_len),
                                          "--client", url, str(concurrency), str(num)], cwd=source, env=env,
                                         capture_output=True, text=True, check=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    k = 1000.0 / max(r["tokens"], 1)
                    print(f"run {run} {source}: concurrency {concurrency:2d}: {r['tokens']} tokens in "
                          f"{r['duration']:.1f} s ({r['tokens'] / r['duration']:.0f} tok/s, {r['failed']} failed); "
                          f"per 1,000 tokens: server {(cpu(proc.pid) - s_cpu) * k:.3f} CPU s, "
                          f"{(switches(proc.pid) - s_sw) * k:.0f} switches; engine core "
                          f"{(cpu(cores[proc.pid]) - c_cpu) * k:.3f} CPU s, "
                          f"{(switches(cores[proc.pid]) - c_sw) * k:.0f} switches; client {r['cpu'] * k:.3f} CPU s, "
                          f"{r['switches'] * k:.0f} switches; load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for _, _, proc, _ in servers:
            proc.terminate()
        for _, _, proc, _ in servers:
            proc.wait(30)


if __name__ == "__main__":
    main()
