"""One Ray actor per rank, placed across a Ray cluster (several machines), driven with the same messages as ``mp``.

The executor joins the Ray cluster this process can reach (``RAY_ADDRESS``, or one started with ``ray start``
on this machine) or, where there is none, starts a local one, and stops it again at shutdown only then. It
reserves a placement group of one bundle per rank (``{"GPU": 1}`` on CUDA, ``{"CPU": 1}`` on CPU; bundle
``i`` holds rank ``i``) and starts one :class:`RayWorker` actor in each. Rank 0's actor names the address
the ranks meet at (``tcp://<its node's IP>:<a free port there>``); every actor then builds its
:class:`~llmserve.worker.worker.Worker` (threads, process groups, its shard of the weights).

Every step the same msgpack-encoded :class:`~llmserve.engine.messages.SchedulerOutput` goes to every actor
as bytes, and every actor answers with tagged bytes as a worker process does: ``O`` + the driver's msgpack
output, ``N`` (a step done on another rank), ``X`` + text (the step failed there; the rank carries on).
Nothing a client sent is pickled beyond being bytes. An actor that dies (:class:`ray.exceptions.RayActorError`)
or a step that takes longer than ``LLMSERVE_EXECUTE_MODEL_TIMEOUT_SECONDS`` (300 s) raises
:class:`~llmserve.executor.abstract.WorkerDiedError`: the engine is dead. Actors belong to this process,
so Ray stops them if it exits without calling :meth:`RayExecutor.shutdown`.

Ray is optional (``pip install 'llmserve[ray]'``) and imported only when this executor starts.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import torch

from llmserve.config import RAY_MISSING, EngineConfig
from llmserve.engine.messages import SchedulerOutput, encode
from llmserve.executor.abstract import (STARTUP_TIMEOUT_S, MultiRankExecutor, WorkerDiedError,
                                        ready_bodies)
from llmserve.executor.worker_process import WorkerEndpoint
from llmserve.worker.worker import WorkerPlacement

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 300.0   # a cluster that lacks the resources never places the group

class RayNotInstalledError(ImportError, ValueError):
    """``--distributed-executor-backend ray`` without Ray installed. Also a ValueError, so the CLI reports it as
    a configuration error (one line, exit status 2) rather than a traceback."""


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayNotInstalledError(RAY_MISSING) from exc
    return ray


def connect(ray: Any, device: torch.device, world_size: int) -> bool:
    """Join a Ray cluster; True when this call started a local one (which :meth:`RayExecutor.shutdown` stops).

    Already connected: that cluster. ``RAY_ADDRESS`` set: that cluster (an unreachable one is an error).
    Otherwise a cluster running on this machine (``ray start``), or else a new local instance.
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address)
        return False
    if not address:
        try:
            ray.init(address="auto")
            logger.info("Connected to the running Ray cluster")
            return False
        except ConnectionError:
            pass
    # A local instance: on the CPU every rank needs a CPU bundle, even where ranks outnumber cores.
    num_cpus = max(os.cpu_count() or 1, world_size) if device.type == "cpu" else None
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    logger.info("Started a local Ray instance")
    return True


class RayWorker:
    """The actor of one rank (made a Ray actor class by :class:`RayExecutor`); wraps a Worker."""

    def __init__(self, config: EngineConfig, rank: int, max_model_len: int, max_num_batched_tokens: int) -> None:
        self.config = config
        self.rank = rank
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.endpoint = WorkerEndpoint()
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
        if config.torch_device.type == "cpu":
            # Ray sets OMP_NUM_THREADS=1 in an actor's process; this rank gets its share of --num-threads
            # (of this node's cores when unset), as a worker process does. Worker.init_device agrees.
            threads = max(1, (config.num_threads or os.cpu_count() or 1) // config.world_size)
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)

    def node_ip_and_free_port(self) -> tuple[str, int]:
        """Where the ranks can meet: this node's IP and a port free on it (asked of rank 0)."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def info(self) -> dict[str, Any]:
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
                "torch_threads": torch.get_num_threads()}

    def init_worker(self, init_method: str) -> bytes:
        """Threads, process groups, weights (``R`` when ready, ``F`` + text when this rank cannot start)."""
        placement = WorkerPlacement(self.rank, self.config.tensor_parallel_size, self.config.pipeline_parallel_size,
                                    init_method)
        return self.endpoint.start(self.config, placement, self.max_model_len, self.max_num_batched_tokens)

    def control(self, method: str, *args: Any) -> bytes:
        return self.endpoint.control(method, list(args))

    def execute(self, payload: bytes) -> bytes:
        return self.endpoint.execute(payload)


class RayExecutor(MultiRankExecutor):
    def __init__(self, config: EngineConfig, max_model_len: int, max_num_batched_tokens: int) -> None:
        super().__init__(config, max_model_len, max_num_batched_tokens)
        ray = self._ray = import_ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.workers: list[Any] = []
        self.placement_group: Any = None
        device = config.torch_device
        self.owns_ray = connect(ray, device, self.world_size)
        try:
            resource = "GPU" if device.type == "cuda" else "CPU"
            self.placement_group = self._reserve(resource)
            actor_class = ray.remote(RayWorker)
            for rank in range(self.world_size):
                options: dict[str, Any] = {
                    "num_cpus": 1 if resource == "CPU" else 0,
                    "num_gpus": 1 if resource == "GPU" else 0,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group, placement_group_bundle_index=rank),
                }
                self.workers.append(actor_class.options(**options).remote(config, rank, max_model_len,
                                                                          max_num_batched_tokens))
            ip, port = self._call([self.workers[0].node_ip_and_free_port.remote()], STARTUP_TIMEOUT_S, "start")[0]
            init_method = f"tcp://{ip}:{port}"
            logger.info("Ray executor: %d ranks (%s), meeting at %s", self.world_size, resource, init_method)
            ready_bodies(self._call([w.init_worker.remote(init_method) for w in self.workers], STARTUP_TIMEOUT_S,
                                    "start"))
        except BaseException:
            self.shutdown()
            raise

    def _reserve(self, resource: str) -> Any:
        """A placement group of one ``{resource: 1}`` bundle per rank, once the cluster has placed it."""
        ray = self._ray
        total = ray.cluster_resources().get(resource, 0)
        if total < self.world_size:
            raise ValueError(f"the Ray cluster has {total:g} {resource}(s) in all, but tensor x pipeline parallel "
                             f"size {self.world_size} needs one {resource} per rank")
        group = ray.util.placement_group([{resource: 1}] * self.world_size, strategy="PACK")
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(group)
            raise WorkerDiedError(f"the Ray cluster did not place {self.world_size} bundles of one {resource} within "
                                  f"{PLACEMENT_TIMEOUT_S:.0f} s (free now: {ray.available_resources()})")
        return group

    # ------------------------------------------------------------------ calls
    def _call(self, refs: list[Any], timeout: float, what: str) -> list[Any]:
        """Every ref's value, in order; a dead actor, a failed call or silence raise WorkerDiedError at once."""
        ray = self._ray
        index = {ref: i for i, ref in enumerate(refs)}
        values: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, left)) if left > 0 else ([], pending)
            if not ready:
                silent = sorted(index[r] for r in pending)
                raise WorkerDiedError(f"worker rank(s) {silent} did not answer within {timeout:.0f} s ({what})")
            for ref in ready:
                rank = index[ref]
                try:
                    values[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise WorkerDiedError(f"worker rank {rank} died ({what}): {exc}") from None
                except ray.exceptions.RayError as exc:
                    raise WorkerDiedError(f"worker rank {rank} failed ({what}): {exc}") from None
        return [values[i] for i in range(len(refs))]

    def _control_replies(self, method: str, args: list[Any]) -> list[bytes]:
        return self._call([w.control.remote(method, *args) for w in self.workers], STARTUP_TIMEOUT_S, method)

    def _step_replies(self, sched: SchedulerOutput) -> list[bytes]:
        payload = encode(sched)
        return self._call([w.execute.remote(payload) for w in self.workers], self.execute_timeout, "step")

    def shutdown(self) -> None:
        ray = getattr(self, "_ray", None)
        if ray is None:
            return
        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception as exc:   # noqa: BLE001 - already gone, or Ray itself is down
                logger.debug("killing a worker actor: %s", exc)
        self.workers = []
        if self.placement_group is not None:
            try:
                ray.util.remove_placement_group(self.placement_group)
            except Exception as exc:   # noqa: BLE001
                logger.debug("removing the placement group: %s", exc)
            self.placement_group = None
        if getattr(self, "owns_ray", False) and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False
