"""The ``mp`` executor once a worker is gone: the step that finds it fails with WorkerDiedError, every worker
left is killed, and each later call fails at once with the same cause (not a broken pipe, another execute
timeout, or a reply read from an earlier call)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from llmserve.entrypoints.llm import LLM
from llmserve.executor.abstract import WorkerDiedError
from llmserve.sampling_params import SamplingParams


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_dead_engine_stays_dead(llama_dir, monkeypatch, fault):
    monkeypatch.setenv("LLMSERVE_EXECUTE_MODEL_TIMEOUT_SECONDS", "3")
    llm = LLM(str(llama_dir), tensor_parallel_size=2, distributed_executor_backend="mp",
              kv_cache_memory_bytes="8MiB", max_model_len=128, num_threads=2)
    executor = llm.engine.core.executor
    workers = [p.pid for p in executor.processes]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    try:
        assert len(llm.generate([{"prompt_token_ids": [1, 2, 3]}], params)[0].outputs[0].token_ids) == 4
        os.kill(workers[1], fault)
        with pytest.raises(WorkerDiedError) as first:
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], params)
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(WorkerDiedError, match=f"^the engine is dead: {re.escape(str(first.value))}$"):
                llm.generate([{"prompt_token_ids": [4, 5]}], params)
            assert time.monotonic() - start < 1.0
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _alive(pid)], "a worker was left running"
    finally:
        llm.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)   # reap it if it is our exited child
    except ChildProcessError:
        pass
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"
