"""Engine configuration: the knobs a user sets (vLLM's names) and the values derived from the checkpoint.

Importable without torch (it is imported where a dtype is resolved): the server's entry point parses the
flags and starts the engine core before torch loads."""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from llmserve.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    import torch

    from llmserve.structured_output import StructuredOutputSpec

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}

_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}
# What --quantization accepts: formats read from a checkpoint's quantization_config (the registry maps each to
# its config class), then schemes applied to a full-precision checkpoint at load.
CHECKPOINT_QUANTIZATION_FORMATS = ("gptq", "awq", "compressed-tensors")
LOAD_TIME_QUANTIZATION_SCHEMES = ("int8", "fp8")
QUANTIZATION_METHODS = (*CHECKPOINT_QUANTIZATION_FORMATS, *LOAD_TIME_QUANTIZATION_SCHEMES)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")   # what --kv-cache-dtype accepts


def cache_dir() -> Path:
    """Where llmserve keeps what it builds (demo checkpoints, compiled CPU kernels):
    ``$LLMSERVE_CACHE_DIR``, or ``~/.cache/llmserve``."""
    env = os.environ.get("LLMSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmserve"


def parse_size(value: str | int) -> int:
    """Parse a byte count such as ``4294967296``, ``4GiB`` or ``512MB``."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be non-negative, got {value}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: use a byte count or a number with a unit such as 4GiB or 512MB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


# CPU feature flags (as Linux lists them) that mean bfloat16 arithmetic in hardware: AMX tiles or AVX-512 dot products.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


RAY_MISSING = "the ray executor needs Ray: pip install 'llmserve[ray]'"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a module set to None in sys.modules, or one without a spec
        return False


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in info.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def auto_cpu_dtype(flags: frozenset[str], kernels_available: bool, quantized: bool) -> tuple[torch.dtype, str]:
    """What ``--dtype auto`` runs on a CPU with these feature ``flags``, and why.

    bfloat16 where the CPU multiplies it natively and the compiled kernels run: their bfloat16 paths read half
    the bytes and use the bf16 dot products, measured faster than float32 there (docs/benchmarks.md). float32
    elsewhere: without the instructions bfloat16 is widened to float32 anyway; without the kernels PyTorch's
    bfloat16 path is slower than its float32 one; and the quantised kernels take float32 activations.
    """
    import torch

    native = sorted(set(NATIVE_BF16_CPU_FLAGS) & flags)
    if not native:
        return torch.float32, f"the CPU has no native bfloat16 ({' or '.join(NATIVE_BF16_CPU_FLAGS)})"
    if quantized:
        return torch.float32, "the model is quantised (its kernels take float32 activations)"
    if not kernels_available:
        return torch.float32, "the CPU kernels are not available (PyTorch's bfloat16 path is slower than float32)"
    return torch.bfloat16, f"the CPU has native bfloat16 ({', '.join(native)})"


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: torch.device, *,
                  quantized: bool = False) -> torch.dtype:
    """``auto`` means :func:`auto_cpu_dtype` on CPU and the checkpoint's dtype on GPU."""
    return resolve_dtype_and_reason(dtype, checkpoint_dtype, device, quantized=quantized)[0]


def resolve_dtype_and_reason(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: torch.device, *,
                             quantized: bool = False) -> tuple[torch.dtype, str | None]:
    """:func:`resolve_dtype`, with the reason for ``auto``'s choice on CPU (None otherwise), for the start-up log."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype, None
    if dtype == "auto":
        if device.type == "cpu":
            from llmserve.layers.cpu_kernels import cpu_kernels

            return auto_cpu_dtype(cpu_flags(), cpu_kernels() is not None, quantized)
        return (checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16), None
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of auto, float32, bfloat16, float16")
    return getattr(torch, _DTYPES[dtype]), None


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """``--structured-outputs-config``, vLLM's flag: the grammar backend and the server-wide JSON whitespace rule.

    llmserve has one backend, llguidance (vLLM calls it ``guidance``), so ``backend`` only accepts the names
    that mean it; asking for another one is an error rather than a silent substitution.
    ``disable_any_whitespace`` makes every JSON constraint compact (as a request's own
    ``disable_any_whitespace`` does). ``disable_fallback: true`` asks that a constraint the backend cannot
    compile is never handed to another backend: with one backend that always holds (such a constraint is
    a 400), so both values behave as ``true`` does.
    """

    backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_fallback: bool = False

    BACKENDS = ("auto", "guidance", "llguidance")
    _VLLM_ONLY = ("disable_additional_properties", "reasoning_parser", "enable_in_reasoning")

    def __post_init__(self) -> None:
        if self.backend not in self.BACKENDS:
            raise ValueError(f"--structured-outputs-config: backend {self.backend!r} is not supported; llmserve "
                             f"enforces structured outputs with llguidance: use one of {', '.join(self.BACKENDS)}")
        for name in ("disable_any_whitespace", "disable_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"--structured-outputs-config: {name} must be true or false")

    def applied_to(self, spec: StructuredOutputSpec) -> StructuredOutputSpec:
        """A request's constraint under the server-wide whitespace rule."""
        if self.disable_any_whitespace and spec.any_whitespace and spec.kind in ("json", "json_object"):
            return msgspec.structs.replace(spec, any_whitespace=False)
        return spec

    @classmethod
    def parse(cls, value: StructuredOutputsConfig | Mapping[str, Any] | str | None) -> StructuredOutputsConfig:
        """The flag's JSON text (or a dict, for ``LLM(structured_outputs_config=...)``)."""
        if isinstance(value, cls):
            return value
        return cls(**_json_object_flag("--structured-outputs-config", value, '{"backend": "auto"}',
                                       ("backend", "disable_any_whitespace", "disable_fallback"), cls._VLLM_ONLY))


POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass(frozen=True)
class PoolerConfig:
    """``--pooler-config``, vLLM's flag: how an embedding request pools the final layer's hidden states.

    vLLM's defaults for a decoder model: the last prompt token's hidden state (``LAST``), L2-normalised.
    ``MEAN`` averages every prompt position, ``CLS`` takes the first one. A request's resolved copy of it
    travels to the workers with the request, so it is also the per-request pooling spec.
    """

    pooling_type: str = "LAST"
    normalize: bool = True

    _VLLM_ONLY = ("dimensions", "enable_chunked_processing", "max_embed_len", "softmax", "activation",
                  "step_tag_id", "returned_token_ids", "logit_bias")

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"--pooler-config: pooling_type {self.pooling_type!r} is not supported; use one of "
                             f"{', '.join(POOLING_TYPES)}")
        if not isinstance(self.normalize, bool):
            raise ValueError("--pooler-config: normalize must be true or false")

    @property
    def needs_every_position(self) -> bool:
        """Whether pooling reads positions before the last one (so none may be skipped as a prefix-cache hit)."""
        return self.pooling_type != "LAST"

    @classmethod
    def parse(cls, value: PoolerConfig | Mapping[str, Any] | str | None) -> PoolerConfig:
        """The flag's JSON text (or a dict, for ``LLM(pooler_config=...)``)."""
        if isinstance(value, cls):
            return value
        return cls(**_json_object_flag("--pooler-config", value, '{"pooling_type": "MEAN", "normalize": true}',
                                       ("pooling_type", "normalize"), cls._VLLM_ONLY))


def _json_object_flag(flag: str, value: Mapping[str, Any] | str | None, example: str, known: tuple[str, ...],
                      vllm_only: tuple[str, ...]) -> dict[str, Any]:
    """A JSON-object flag's keys and values (JSON text or a dict); an unknown key is an error naming it."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{flag} must be a JSON object: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{flag} must be a JSON object, e.g. '{example}'")
    unknown = sorted(set(value) - set(known))
    if unknown:
        what = "is vLLM's but not supported" if unknown[0] in vllm_only else "is not a known key"
        raise ValueError(f"{flag}: {unknown[0]!r} {what}; the keys are {', '.join(known)}")
    return dict(value)


# Plain field annotations -> the values they take (bool is not an int here: True is no block size; NumPy's
# integers and floats are, a path is a string), the plain value kept, and their name in an error.
_PLAIN_TYPES: dict[str, tuple[tuple[type, ...], Callable[[Any], Any], str]] = {
    "bool": ((bool,), bool, "a boolean"), "int": ((numbers.Integral,), int, "an integer"),
    "float": ((numbers.Real,), float, "a number"), "str": ((str, os.PathLike), os.fspath, "a string")}


@dataclass
class EngineConfig:
    """Everything the engine needs to start; built from CLI flags or ``LLM(**kwargs)``."""

    model: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    download_dir: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    # None: the checkpoint's own quantization_config (if any); int8/fp8 quantise a float checkpoint at load
    quantization: str | None = None
    seed: int = 0
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    # auto (the model's dtype), or a quantised cache of one byte per entry: fp8 (= fp8_e4m3), fp8_e5m2, int8
    kv_cache_dtype: str = "auto"
    kv_cache_memory_bytes: int | str | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    max_logprobs: int = 20
    # streamed requests get an output every this many tokens (and their first and last at once), as vLLM's flag
    stream_interval: int = 1
    # decode steps an engine step may run in the compiled CPU loop (llmserve.engine.multi_step); 1: off
    num_scheduler_steps: int = 1
    num_threads: int | None = None
    # GPU only: run every step eagerly instead of replaying CUDA graphs for decode steps.
    enforce_eager: bool = False
    # GPU only: decode steps whose longest context exceeds this run eagerly (the graphs' block-table width).
    max_seq_len_to_capture: int = 8192
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # MoE layers distribute their experts over the tensor-parallel ranks instead of splitting every expert
    enable_expert_parallel: bool = False
    # uni (one rank in process), mp (a process per rank) or ray; None: uni for one rank, else mp
    distributed_executor_backend: str | None = None
    # JSON text or a dict, as vLLM's flag; normalised to StructuredOutputsConfig
    structured_outputs_config: StructuredOutputsConfig | Mapping[str, Any] | str | None = None
    # JSON text or a dict, as vLLM's flag; normalised to PoolerConfig (embedding requests' pooling)
    pooler_config: PoolerConfig | Mapping[str, Any] | str | None = None
    # JSON text or a dict, as vLLM's flag, or the two older flags; normalised to SpeculativeConfig (None: off)
    speculative_config: SpeculativeConfig | Mapping[str, Any] | str | None = None
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None
    # LoRA adapters (llmserve.lora): requests may name one; at most max_loras distinct ones per step, resident
    # in the layers' slots; max_cpu_loras (default max_loras) kept on the CPU; lora_dtype auto = the model's
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_dtype: str = "auto"

    def __post_init__(self) -> None:
        self._check_plain_types()
        self.structured_outputs_config = StructuredOutputsConfig.parse(self.structured_outputs_config)
        self.pooler_config = PoolerConfig.parse(self.pooler_config)
        self.speculative_config = SpeculativeConfig.resolve(self.speculative_config, self.speculative_model,
                                                            self.num_speculative_tokens)
        self.speculative_model = self.num_speculative_tokens = None   # folded into speculative_config
        if self.speculative_config is not None:
            self.speculative_config = self.speculative_config.for_target(self.tensor_parallel_size,
                                                                         self.pipeline_parallel_size)
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1 (leave it out for all cores), got {self.num_threads}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if isinstance(self.kv_cache_dtype, str) and self.kv_cache_dtype.strip().lower() == "auto":
            self.kv_cache_dtype = "auto"
        else:   # a quantised cache's dtype needs torch to check (float8 support)
            from llmserve.quantization.kv_cache import check_kv_cache_dtype

            self.kv_cache_dtype = check_kv_cache_dtype(self.kv_cache_dtype)
        if self.kv_cache_memory_bytes is not None:
            self.kv_cache_memory_bytes = parse_size(self.kv_cache_memory_bytes)
        if self.max_seq_len_to_capture < 1:
            raise ValueError(f"--max-seq-len-to-capture must be >= 1, got {self.max_seq_len_to_capture}")
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {self.stream_interval}")
        if self.num_scheduler_steps < 1:
            raise ValueError(f"--num-scheduler-steps must be >= 1, got {self.num_scheduler_steps}")
        if self.num_scheduler_steps > 1 and self.speculative_config is not None:
            raise ValueError("--num-scheduler-steps > 1 and speculative decoding both make several tokens a step: "
                             "use one of them")
        if self.max_logprobs < 0:
            raise ValueError(f"--max-logprobs must be >= 0, got {self.max_logprobs}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size and --pipeline-parallel-size must be >= 1, got "
                             f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")
        if self.enable_expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError("--enable-expert-parallel distributes experts over the tensor-parallel ranks: it needs "
                             "--tensor-parallel-size > 1")
        if self.distributed_executor_backend not in (None, "uni", "mp", "ray"):
            raise ValueError(f"--distributed-executor-backend must be uni, mp or ray, got "
                             f"{self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "ray" and not _importable("ray"):
            raise ValueError(RAY_MISSING)   # at once, not from the engine process once the server is up
        if self.distributed_executor_backend == "uni" and self.world_size > 1:
            raise ValueError(f"--distributed-executor-backend uni runs one rank, but tensor x pipeline parallel "
                             f"size is {self.world_size}; use mp or ray")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"unsupported dtype {self.dtype!r}; choose one of auto, float32, bfloat16, float16")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"unknown --quantization {self.quantization!r}; choose one of "
                             f"{', '.join(QUANTIZATION_METHODS)}")
        self._check_lora()

    def _check_lora(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"--max-loras and --max-lora-rank must be >= 1, got {self.max_loras} and "
                             f"{self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        elif self.max_cpu_loras < self.max_loras:
            raise ValueError(f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras ({self.max_loras})")
        if self.lora_dtype not in ("auto", *_DTYPES):
            raise ValueError(f"unsupported --lora-dtype {self.lora_dtype!r}; choose one of auto, float32, bfloat16, "
                             "float16")
        if self.enable_lora and self.pipeline_parallel_size > 1:
            raise ValueError("--enable-lora is not supported with --pipeline-parallel-size > 1")

    def _check_plain_types(self) -> None:
        """Each field annotated with a plain type (``bool``, ``int``, ``float``, ``str``, or one of them ``| None``)
        holds that type: ``LLM(enable_prefix_caching="false")`` would otherwise turn the feature on."""
        for item in fields(self):
            kinds = [k.strip() for k in str(item.type).split("|")]
            optional = "None" in kinds
            kinds = [k for k in kinds if k != "None"]
            if len(kinds) != 1 or kinds[0] not in _PLAIN_TYPES:
                continue
            value = getattr(self, item.name)
            if value is None and optional:
                continue
            allowed, plain, what = _PLAIN_TYPES[kinds[0]]
            if not isinstance(value, allowed) or (kinds[0] != "bool" and isinstance(value, bool)):
                flag = "--" + item.name.replace("_", "-")
                raise ValueError(f"{flag} ({item.name}) must be {what}{' or None' if optional else ''}, got {value!r}")
            setattr(self, item.name, plain(value))

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def flags_without_effect(self) -> list[str]:
        """Warnings for flags this engine's device makes no use of: CUDA-only flags on another device, and on CUDA
        ``--gpu-memory-utilization`` beside ``--kv-cache-memory-bytes`` (which then sizes the KV cache alone)."""
        device = self.torch_device.type
        ignored = self.cuda_only_flags_set()
        if device != "cuda":
            return [f"{', '.join(ignored)}: CUDA only, no effect on this {device} engine"] if ignored else []
        if self.kv_cache_memory_bytes is not None and "--gpu-memory-utilization" in ignored:
            return ["--gpu-memory-utilization: no effect, --kv-cache-memory-bytes sizes the KV cache"]
        return []

    def cuda_only_flags_set(self) -> list[str]:
        """The CUDA-only flags given values other than their defaults (they do nothing on a CPU engine, which
        logs them rather than refusing a configuration written for either device)."""
        defaults = {f.name: f.default for f in fields(self)}
        return [f"--{name.replace('_', '-')}" for name in ("gpu_memory_utilization", "enforce_eager",
                                                          "max_seq_len_to_capture")
                if getattr(self, name) != defaults[name]]
