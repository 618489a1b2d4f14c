"""One rank of the model: its device and threads, its shard of the weights, its KV cache, its model runner.

The engine core never touches a worker directly; an executor drives every rank with the same calls and
the same :class:`~llmserve.engine.messages.SchedulerOutput`, in process or in a process of its own.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmserve.config import EngineConfig, resolve_dtype
from llmserve.distributed.parallel_state import get_pp_group, get_tp_group, init_distributed
from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput
from llmserve.layers.attention.backend import get_attention_backend
from llmserve.layers.attention.layer import Attention, set_kv_cache_dtype
from llmserve.layers.fused_moe import FusedMoE
from llmserve.lora.model_manager import LoRAModelManager
from llmserve.model_loader.loader import checkpoint_dtype, load_config, load_model, resolve_model_path
from llmserve.quantization.kv_cache import kv_cache_capacity_gain
from llmserve.quantization.registry import checkpoint_quantization
from llmserve.spec_decode.draft_model_proposer import DraftModelProposer
from llmserve.worker.model_runner import ModelRunner
from llmserve.worker.step_timing import measure_step_times

if TYPE_CHECKING:
    from llmserve.structured_output import GrammarCompiler

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 4 * 2**30   # vLLM's CPU default


@dataclass(frozen=True)
class WorkerPlacement:
    """Where a worker sits in the job: its global rank and the group sizes, and how ranks meet."""

    rank: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_init_method: str | None = None   # tcp://host:port; None for a single rank

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class Worker:
    def __init__(self, config: EngineConfig, placement: WorkerPlacement, max_model_len: int,
                 max_num_batched_tokens: int) -> None:
        self.config = config
        self.placement = placement
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.device = config.torch_device
        self.runner: ModelRunner | None = None

    def init_device(self) -> None:
        """Threads (each rank gets its share of ``--num-threads``), seed, and the process groups."""
        world = self.placement.world_size
        threads = self.config.num_threads
        if world > 1:
            threads = max(1, (threads or os.cpu_count() or 1) // world)
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(self.config.seed)
        if world > 1:
            assert self.placement.distributed_init_method is not None
            if self.device.type == "cuda":
                torch.cuda.set_device(self.placement.rank % torch.cuda.device_count())
                self.device = torch.device("cuda", torch.cuda.current_device())
            init_distributed(self.placement.rank, self.placement.tensor_parallel_size,
                             self.placement.pipeline_parallel_size, self.placement.distributed_init_method,
                             backend="nccl" if self.device.type == "cuda" else "gloo",
                             enable_expert_parallel=self.config.enable_expert_parallel)

    def load_model(self) -> None:
        config = self.config
        path = resolve_model_path(config.model, config.revision, config.download_dir)
        hf_config = load_config(path, config.trust_remote_code, config.revision)
        quantized = config.quantization is not None or checkpoint_quantization(hf_config) is not None
        dtype = resolve_dtype(config.dtype, checkpoint_dtype(hf_config), self.device, quantized=quantized)
        t0 = time.perf_counter()
        model = load_model(hf_config, path, dtype, self.device, config.quantization)
        if config.enable_expert_parallel and not any(isinstance(m, FusedMoE) for m in model.modules()):
            raise ValueError(f"--enable-expert-parallel: {type(model).__name__} has no mixture-of-experts layers "
                             f"to distribute")
        if self.placement.rank == 0:
            logger.info("Loaded %s (%s, %s) from %s in %.1f s", type(model).__name__, dtype, self.device, path,
                        time.perf_counter() - t0)
        set_kv_cache_dtype(model, config.kv_cache_dtype)
        layers = model.attention_layers()
        backend = get_attention_backend(self.device, dtype, num_kv_heads=layers[0].num_kv_heads,
                                        latent_attention=any(a.values_in_key_cache for a in layers))
        driver = get_tp_group().is_first_rank and get_pp_group().is_last_rank   # the rank that samples
        lora = None
        if config.enable_lora:
            assert config.max_cpu_loras is not None
            lora = LoRAModelManager(model, config.max_loras, config.max_lora_rank, config.max_cpu_loras,
                                    dtype if config.lora_dtype == "auto" else resolve_dtype(config.lora_dtype, None, self.device), self.device)
            if self.device.type == "cuda" and not config.enforce_eager and self.placement.rank == 0:
                logger.info("LoRA is on: decode steps with adapter rows run eagerly (CUDA graphs for the others)")
        spec = config.speculative_config
        drafter = None
        if spec is not None and spec.method == "draft_model":
            drafter = DraftModelProposer.load(spec, config, hf_config, dtype, self.device, self.max_model_len)
        self.runner = ModelRunner(model, backend, config.block_size, int(hf_config.vocab_size), self.device, dtype,
                                  max_num_seqs=config.max_num_seqs,
                                  enforce_eager=config.enforce_eager or drafter is not None,
                                  max_seq_len_to_capture=config.max_seq_len_to_capture,
                                  max_model_len=self.max_model_len,
                                  load_grammar_compiler=self._grammar_compiler if driver else None,
                                  lora_manager=lora, drafter=drafter, num_scheduler_steps=config.num_scheduler_steps)

    def _grammar_compiler(self) -> GrammarCompiler:
        """The compiler of structured-output grammars for this model: its vocabulary (the logits' width) and
        the EOS ids the scheduler stops on, which a grammar allows exactly where the output may end."""
        from llmserve.engine.input_processor import ModelInfo
        from llmserve.structured_output import GrammarCompiler

        info = ModelInfo(self.config)
        return GrammarCompiler(info.tokenizer, info.vocab_size, info.eos_token_ids)

    def kv_cache_bytes_per_block(self) -> int:
        assert self.runner is not None
        return self.runner.kv_cache_bytes_per_block()

    def kv_cache_group_windows(self) -> list[int | None]:
        """Each KV-cache group's window (None: full attention; see :mod:`llmserve.worker.kv_cache_groups`), the same
        on every rank (pipeline stages form the whole model's groups): the block manager keeps a table per group."""
        assert self.runner is not None
        return self.runner.kv_cache_groups.windows

    def multi_step_max_rows(self) -> int | None:
        """The most rows a multi-step step runs in this rank's compiled loop (None: any; see
        :meth:`~llmserve.models.llama_fused_decode.FusedDecode.takes_steps`)."""
        assert self.runner is not None
        multi_step = self.runner.multi_step
        return None if multi_step is None else multi_step.steps_max_rows

    def available_kv_blocks(self) -> int:
        """How many blocks this rank's KV-cache budget holds (``--kv-cache-memory-bytes`` per rank, or
        on CUDA what a profiled worst-case step leaves of ``--gpu-memory-utilization``)."""
        assert self.runner is not None
        per_block = self.runner.kv_cache_bytes_per_block()
        budget = self.config.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            budget = self.runner.profile_kv_cache_budget(self.max_num_batched_tokens, self.config.max_num_seqs,
                                                         self.max_model_len, self.config.gpu_memory_utilization)
        elif budget is None:
            budget = CPU_DEFAULT_KV_CACHE_BYTES
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise ValueError(f"the KV-cache budget ({budget} bytes) is smaller than one block ({per_block} bytes); "
                             "raise --kv-cache-memory-bytes or --gpu-memory-utilization")
        if self.runner.drafter is not None and self.placement.rank == 0:
            target_per_block = self.runner.kv_cache_bytes_per_block(with_draft=False)
            logger.info("The draft model's KV layers take their share of the pool: %d KV blocks instead of %d",
                        num_blocks, int(budget // target_per_block))
        return num_blocks

    def initialize_cache(self, num_blocks: int) -> None:
        assert self.runner is not None
        self.runner.allocate_kv_cache(num_blocks)
        if self.placement.rank == 0:
            model = self.runner.model
            layers = model.attention_layers()
            shared = sum(isinstance(m, Attention) for m in model.modules()) - len(layers)
            note = f" ({shared} more reuse an earlier layer's K/V and hold none)" if shared else ""
            latent = next((a for a in layers if a.values_in_key_cache), None)
            if latent is not None:
                note += (f" (latent attention: one {latent.kv_cache_elements_per_token()}-value entry per token and "
                         f"layer, read as key and value)")
            if self.runner.drafter is not None:
                note += f" and of the draft model's {len(self.runner.drafter.attention_layers())}"
            groups = self.runner.kv_cache_groups
            if groups.num_groups > 1:
                logger.info("KV cache: %d blocks in each of %d cache tensors, shared by %d KV-cache groups of the %d "
                            "attention layers%s (a block holds one group's K/V, in a page as large as the largest "
                            "layer's of its tensor)", num_blocks, groups.group_size, groups.num_groups, len(layers),
                            note)
            else:
                logger.info("KV cache: %d blocks in each of %d attention layers%s", num_blocks, len(layers), note)
            if self.config.kv_cache_dtype != "auto":
                logger.info(kv_cache_capacity_gain(self.config.kv_cache_dtype, num_blocks, self.config.block_size,
                                                   self.max_model_len, self.runner.kv_cache_bytes_per_block(),
                                                   self.runner.kv_cache_bytes_per_block(model_dtype=True),
                                                   self.runner.dtype))

    def measure_step_times(self, token_counts: list[int]) -> dict[str, list[float] | None]:
        assert self.runner is not None
        return measure_step_times(self.runner, token_counts, self.max_model_len)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        assert self.runner is not None
        try:
            return self.runner.execute_model(sched)
        except Exception:
            try:
                self.runner.fail_step(sched)
            except Exception:   # noqa: BLE001 - the step's own error is the one to report
                logger.exception("could not hand the failed step on to the other ranks")
            raise

    def recover_after_failed_step(self) -> None:
        """Collective over every rank, after a step failed on any: the tensor-parallel collectives line up again."""
        get_tp_group().recover_after_failed_step()
