"""The ray executor: one Ray actor per rank in a placement group, on a local Ray cluster that this module starts
once (4 CPUs). TP=2 and PP=2 equal Hugging Face transformers token for token (logprobs within 1e-3) with
chunked prefill and forced preemption; each actor uses its share of --num-threads although Ray caps OpenMP
at one thread; a killed actor or a hung step make the engine raise WorkerDiedError; shutdown kills every
actor and frees the placement group, but leaves a cluster it did not start running. Without Ray installed,
asking for the ray backend is a one-line error that says how to install it."""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.executor.abstract import WorkerDiedError
from tests.engine.test_hf_equivalence import PROMPTS, assert_matches_hf, llm_block_bytes

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'llmserve[ray]')")
CLUSTER_CPUS = 4


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance for the whole module (starting one takes seconds); stopped afterwards."""
    import ray

    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=CLUSTER_CPUS, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        mp.undo()


def ray_llm(path, tp: int, pp: int, **kwargs) -> LLM:
    """24 blocks of 4 tokens per rank (too few for the five prompts, so some are preempted), 7-token steps."""
    per_rank_block = llm_block_bytes(path, 4) // (tp * pp)
    kwargs = {"block_size": 4, "max_num_batched_tokens": 7, "kv_cache_memory_bytes": 24 * per_rank_block,
              "num_threads": tp * pp, **kwargs}
    return LLM(str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="ray",
               **kwargs)


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def assert_released(ray, executor, actors, group) -> None:
    """Every actor is dead, the placement group is removed and its CPUs are free again; Ray itself still runs
    (this module started it, not the executor)."""
    assert executor.workers == [] and executor.placement_group is None
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.info.remote(), timeout=60)
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) == CLUSTER_CPUS)
    assert ray.is_initialized()


# ---------------------------------------------------------------------------------------------- without a cluster
def test_missing_ray_is_a_one_line_error(llama_dir, monkeypatch, capsys):
    from llmserve.entrypoints.cli import main
    from llmserve.executor.ray_executor import RAY_MISSING, import_ray

    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'llmserve\[ray\]'"):
        import_ray()
    for command in (["generate", str(llama_dir), "--max-tokens", "1"], ["serve", str(llama_dir), "--port", "0"]):
        # serve too: at once, before the server starts its engine (not a traceback from the engine process)
        assert main([*command, "-tp", "2", "--distributed-executor-backend", "ray"]) == 2
        assert capsys.readouterr().err.strip() == f"error: {RAY_MISSING}"


class FakeRay:
    def __init__(self, initialized: bool = False, cluster_running: bool = False) -> None:
        self.initialized, self.cluster_running, self.calls = initialized, cluster_running, []

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)
        if kwargs.get("address") == "auto" and not self.cluster_running:
            raise ConnectionError("Could not find any running Ray instance.")
        self.initialized = True


def test_connect_joins_a_cluster_and_starts_one_only_where_there_is_none(monkeypatch):
    from llmserve.executor.ray_executor import connect

    cpu = torch.device("cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray = FakeRay(initialized=True)
    assert connect(ray, cpu, 2) is False and ray.calls == []              # this process is connected already
    ray = FakeRay(cluster_running=True)
    assert connect(ray, cpu, 2) is False and ray.calls == [{"address": "auto"}]   # `ray start` on this machine
    ray = FakeRay()
    assert connect(ray, cpu, 64) is True                                  # none: a local one, owned
    assert ray.calls[1]["num_cpus"] >= 64 and ray.calls[1]["include_dashboard"] is False
    ray = FakeRay()
    assert connect(ray, torch.device("cuda"), 2) is True and ray.calls[1]["num_cpus"] is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ray = FakeRay(cluster_running=False)
    assert connect(ray, cpu, 2) is False and ray.calls == [{"address": "10.0.0.1:6379"}]   # never a local one


# ---------------------------------------------------------------------------------------------- on a local cluster
@needs_ray
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_ray_matches_hf_with_chunked_prefill_and_preemption(ray_cluster, checkpoint_dir, tp, pp):
    ray = ray_cluster
    path = checkpoint_dir("llama")
    llm = ray_llm(path, tp, pp)
    executor = llm.engine.core.executor
    actors, group = list(executor.workers), executor.placement_group
    try:
        assert type(executor).__name__ == "RayExecutor" and not executor.owns_ray
        assert llm.engine.block_manager.num_blocks == 24
        infos = ray.get([actor.info.remote() for actor in actors])
        assert [i["rank"] for i in infos] == [0, 1] and len({i["pid"] for i in infos}) == 2
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0))
        assert llm.engine.scheduler.num_preemptions > 0
        assert_matches_hf(path, outputs, max_tokens=24)
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
        if pp == 2:
            # A step that outlasts LLMSERVE_EXECUTE_MODEL_TIMEOUT_SECONDS kills the engine.
            executor.execute_timeout = 1e-6
            llm.engine.add_request("slow", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=4))
            with pytest.raises(WorkerDiedError, match="did not answer within"):
                llm.engine.step()
    finally:
        llm.shutdown()
    assert_released(ray, executor, actors, group)


@needs_ray
def test_killed_actor_is_a_dead_engine_and_threads_are_shared(ray_cluster, llama_dir, monkeypatch):
    ray = ray_cluster
    monkeypatch.setenv("LLMSERVE_EXECUTE_MODEL_TIMEOUT_SECONDS", "120")
    llm = ray_llm(llama_dir, 2, 1, num_threads=4)
    executor = llm.engine.core.executor
    actors, group = list(executor.workers), executor.placement_group
    try:
        assert executor.execute_timeout == 120
        # Ray starts an actor with OMP_NUM_THREADS=1; each rank still gets its half of --num-threads 4.
        assert [i["torch_threads"] for i in ray.get([a.info.remote() for a in actors])] == [2, 2]
        llm.engine.add_request("r0", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        llm.engine.step()
        ray.kill(actors[1])
        with pytest.raises(WorkerDiedError, match="worker rank 1 died"):
            for _ in range(16):
                llm.engine.step()
    finally:
        llm.shutdown()
    assert_released(ray, executor, actors, group)


@needs_ray
def test_startup_error_names_the_cause_and_releases_the_cluster(ray_cluster, llama_dir):
    """The tiny llama has 4 query heads: 3 ranks cannot split them."""
    ray = ray_cluster
    with pytest.raises((WorkerDiedError, ValueError), match=r"not divisible by the tensor-parallel size \(3\)"):
        ray_llm(llama_dir, 3, 1, kv_cache_memory_bytes="1MiB")
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) == CLUSTER_CPUS)
