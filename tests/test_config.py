"""Engine configuration: ``--structured-outputs-config`` and ``--pooler-config`` as vLLM's flags (JSON).

* JSON text, a dict or nothing give a :class:`StructuredOutputsConfig`; ``backend`` takes ``auto``, ``guidance``
  (vLLM's name for llguidance) or ``llguidance``; ``disable_any_whitespace`` and ``disable_fallback`` booleans.
* Another backend (``xgrammar``, ``outlines``) is refused naming the ones supported; so are malformed JSON, a
  non-object, a vLLM key llmserve does not honour, an unknown key and a non-boolean option.
* ``--pooler-config``: ``pooling_type`` LAST (the default), MEAN or CLS, ``normalize`` (default true); another
  pooling type, a vLLM key llmserve does not honour (``dimensions``), an unknown key or a non-boolean
  ``normalize`` is refused naming it.
* ``--enable-expert-parallel`` needs more than one tensor-parallel rank (the experts are distributed over them).
* The command line passes the flags through to :class:`EngineConfig`.
* ``--dtype auto`` on CPU: bfloat16 where the CPU flags say native bfloat16 (``avx512_bf16``, ``amx_bf16``), the
  compiled kernels load and the model is not quantised; float32 otherwise (the flags are injected here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from llmserve.config import (CHECKPOINT_QUANTIZATION_FORMATS, EngineConfig, PoolerConfig, StructuredOutputsConfig,
                             auto_cpu_dtype, resolve_dtype)
from llmserve.entrypoints.cli_args import add_engine_args, engine_config_from_args


@pytest.mark.parametrize("value, expected", [
    (None, StructuredOutputsConfig()),
    ('{"backend": "guidance"}', StructuredOutputsConfig(backend="guidance")),
    ({"backend": "llguidance", "disable_any_whitespace": True},
     StructuredOutputsConfig(backend="llguidance", disable_any_whitespace=True)),
    ('{"backend": "auto", "disable_fallback": true}', StructuredOutputsConfig(disable_fallback=True)),
])
def test_structured_outputs_config_parses(value, expected):
    assert EngineConfig(structured_outputs_config=value).structured_outputs_config == expected


@pytest.mark.parametrize("value, fragment", [
    ('{"backend": "xgrammar"}', "backend 'xgrammar' is not supported; llmserve enforces structured outputs with "
                                "llguidance: use one of auto, guidance, llguidance"),
    ({"backend": "outlines"}, "'outlines' is not supported"),
    ("{backend: auto}", "must be a JSON object"),
    ("[1]", "must be a JSON object"),
    ('{"reasoning_parser": "deepseek_r1"}', "'reasoning_parser' is vLLM's but not supported"),
    ('{"colour": 1}', "'colour' is not a known key"),
    ('{"disable_any_whitespace": "yes"}', "disable_any_whitespace must be true or false"),
])
def test_bad_structured_outputs_config_is_refused(value, fragment):
    with pytest.raises(ValueError, match="--structured-outputs-config") as info:
        EngineConfig(structured_outputs_config=value)
    assert fragment in str(info.value)


def test_the_flag_reaches_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--structured-outputs-config", '{"disable_any_whitespace": true}'])
    assert engine_config_from_args(args).structured_outputs_config == StructuredOutputsConfig(
        disable_any_whitespace=True)


@pytest.mark.parametrize("value, expected", [
    (None, PoolerConfig("LAST", True)),
    ('{"pooling_type": "MEAN"}', PoolerConfig("MEAN", True)),
    ({"pooling_type": "CLS", "normalize": False}, PoolerConfig("CLS", False)),
])
def test_pooler_config_parses(value, expected):
    assert EngineConfig(pooler_config=value).pooler_config == expected


@pytest.mark.parametrize("value, fragment", [
    ('{"pooling_type": "STEP"}', "pooling_type 'STEP' is not supported; use one of LAST, MEAN, CLS"),
    ('{"dimensions": 64}', "'dimensions' is vLLM's but not supported"),
    ('{"pooling": "MEAN"}', "'pooling' is not a known key; the keys are pooling_type, normalize"),
    ('{"normalize": 1}', "normalize must be true or false"),
    ("MEAN", "must be a JSON object"),
])
def test_bad_pooler_config_is_refused(value, fragment):
    with pytest.raises(ValueError, match="--pooler-config") as info:
        EngineConfig(pooler_config=value)
    assert fragment in str(info.value)


def test_the_pooler_flag_reaches_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--pooler-config", '{"pooling_type": "MEAN", "normalize": false}'])
    assert engine_config_from_args(args).pooler_config == PoolerConfig("MEAN", False)


def test_expert_parallelism_needs_tensor_parallel_ranks():
    with pytest.raises(ValueError, match="--enable-expert-parallel .* --tensor-parallel-size > 1"):
        EngineConfig(enable_expert_parallel=True)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["-tp", "2", "--enable-expert-parallel"])
    config = engine_config_from_args(args)
    assert config.enable_expert_parallel and config.tensor_parallel_size == 2
    assert not engine_config_from_args(parser.parse_args(["-tp", "2"])).enable_expert_parallel


def test_lora_flags_reach_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(
        ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "8", "--lora-dtype",
         "bfloat16"]))
    assert (config.enable_lora, config.max_loras, config.max_lora_rank, config.max_cpu_loras, config.lora_dtype) == \
        (True, 4, 64, 8, "bfloat16")
    assert EngineConfig(max_loras=3).max_cpu_loras == 3   # vLLM's default: --max-loras


@pytest.mark.parametrize("kwargs,fragment", [
    ({"max_loras": 0}, "--max-loras and --max-lora-rank must be >= 1"),
    ({"max_loras": 4, "max_cpu_loras": 2}, "--max-cpu-loras (2) must be >= --max-loras (4)"),
    ({"lora_dtype": "int8"}, "unsupported --lora-dtype 'int8'"),
    ({"enable_lora": True, "pipeline_parallel_size": 2}, "not supported with --pipeline-parallel-size"),
])
def test_bad_lora_config_is_refused(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        EngineConfig(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("flags,quantized,kernels,expected,reason", [
    ({"avx512f", "avx512_bf16"}, False, True, torch.bfloat16, "native bfloat16 (avx512_bf16)"),
    ({"amx_bf16", "amx_tile", "avx512_bf16"}, False, True, torch.bfloat16, "native bfloat16 (amx_bf16, avx512_bf16)"),
    ({"avx512f", "avx2", "fma"}, False, True, torch.float32, "no native bfloat16"),
    (set(), False, True, torch.float32, "no native bfloat16"),
    ({"avx512_bf16"}, True, True, torch.float32, "quantised"),
    ({"avx512_bf16"}, False, False, torch.float32, "CPU kernels are not available"),
])
def test_auto_dtype_on_cpu_is_bf16_only_where_the_cpu_has_native_bf16(flags, quantized, kernels, expected, reason):
    dtype, why = auto_cpu_dtype(frozenset(flags), kernels, quantized)
    assert dtype == expected and reason in why


def test_resolve_dtype_reads_the_cpu_flags_only_for_auto_on_cpu(monkeypatch):
    from llmserve import config

    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", None, cpu) == torch.bfloat16
    assert resolve_dtype("auto", None, cpu, quantized=True) == torch.float32
    assert resolve_dtype("float32", None, cpu) == torch.float32
    assert resolve_dtype("auto", torch.float16, torch.device("cuda")) == torch.float16
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"avx2"}))
    assert resolve_dtype("auto", torch.bfloat16, cpu) == torch.float32


def test_quantization_flag_names_are_the_formats_the_registry_reads():
    from llmserve.quantization.registry import CHECKPOINT_FORMATS

    assert tuple(CHECKPOINT_FORMATS) == CHECKPOINT_QUANTIZATION_FORMATS


@pytest.mark.parametrize("threads", [0, -2])
def test_num_threads_must_be_positive(threads):
    """0 is not "all cores" (leaving the flag out is): a typo is refused, not silently widened."""
    with pytest.raises(ValueError, match=f"--num-threads must be >= 1 .*got {threads}"):
        EngineConfig(num_threads=threads)


def test_cuda_only_flags_given_are_named():
    assert EngineConfig().cuda_only_flags_set() == []
    config = EngineConfig(enforce_eager=True, gpu_memory_utilization=0.5, max_seq_len_to_capture=16)
    assert config.cuda_only_flags_set() == ["--gpu-memory-utilization", "--enforce-eager", "--max-seq-len-to-capture"]


def test_flags_without_effect_on_each_device():
    """On CPU every CUDA-only flag given is named; on CUDA only --gpu-memory-utilization beside
    --kv-cache-memory-bytes, which then sizes the cache alone (a config for a CUDA device builds without one)."""
    assert EngineConfig(device="cpu").flags_without_effect() == []
    assert EngineConfig(device="cpu", enforce_eager=True, gpu_memory_utilization=0.5).flags_without_effect() == [
        "--gpu-memory-utilization, --enforce-eager: CUDA only, no effect on this cpu engine"]
    on_cuda = EngineConfig(device="cuda", gpu_memory_utilization=0.5, kv_cache_memory_bytes="1GiB")
    assert on_cuda.flags_without_effect() == [
        "--gpu-memory-utilization: no effect, --kv-cache-memory-bytes sizes the KV cache"]
    assert EngineConfig(device="cuda", gpu_memory_utilization=0.5).flags_without_effect() == []
    assert EngineConfig(device="cuda", kv_cache_memory_bytes="1GiB", enforce_eager=True).flags_without_effect() == []


def test_a_cpu_engine_logs_the_cuda_only_flags_it_ignores(llama_dir, caplog):
    from llmserve.entrypoints.llm import LLM

    with caplog.at_level("WARNING", logger="llmserve.engine.core"):
        LLM(str(llama_dir), device="cpu", enforce_eager=True, kv_cache_memory_bytes="8MiB", max_model_len=64)
    assert any("--enforce-eager: CUDA only, no effect on this cpu engine" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kwargs, message", [
    ({"enable_prefix_caching": "false"}, r"--enable-prefix-caching \(enable_prefix_caching\) must be a boolean, got "
                                         r"'false'"),
    ({"enable_lora": 1}, "must be a boolean"),
    ({"max_num_seqs": 2.5}, r"--max-num-seqs \(max_num_seqs\) must be an integer"),
    ({"block_size": "16"}, "must be an integer"),
    ({"block_size": True}, "must be an integer"),
    ({"seed": None}, "must be an integer"),
    ({"max_model_len": "2048"}, "must be an integer or None"),
    ({"dtype": 16}, "must be a string"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_flag(kwargs, message):
    """``LLM(enable_prefix_caching="false")`` used to turn caching on (a non-empty string is true)."""
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_values_of_the_right_type_pass_as_plain_values():
    """NumPy's integers and floats are numbers and a path is a string, as before the check; they are kept as plain
    Python values (a config crosses to worker processes)."""
    config = EngineConfig(model=Path("/models/m"), gpu_memory_utilization=np.float32(0.5), max_model_len=np.int64(128),
                          seed=np.int64(3), enable_prefix_caching=False)
    assert (config.model, config.gpu_memory_utilization, config.max_model_len, config.seed) == ("/models/m", 0.5, 128, 3)
    assert type(config.max_model_len) is int and type(config.gpu_memory_utilization) is float
    assert not config.enable_prefix_caching
