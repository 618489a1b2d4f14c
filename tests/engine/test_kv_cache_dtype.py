"""``--kv-cache-dtype``: a quantised KV cache through the whole engine (chunked prefill, prefix-cache hits) keeps
the greedy output of the model-dtype cache, holds more blocks in the same memory, and bad values are refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from llmserve.config import EngineConfig
from llmserve.entrypoints.cli import build_parser
from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM
from llmserve.models.llama import CheckpointMismatchError
from llmserve.model_loader.loader import load_config, load_model
from llmserve.sampling_params import SamplingParams

# Prompts of several chunks (max_num_batched_tokens=16) and a shared prefix, each sent twice: the second time
# from the prefix cache.
PROMPTS = [list(range(40, 90)), [5, 17, 99, 300, 42, 7], list(range(40, 70)) + [1500, 3, 3, 800, 12],
           [1500, 3, 3, 3, 800, 12, 77, 901, 4, 66, 1999, 31]]
MAX_TOKENS = 16
# Per (family, format): the largest |logprob difference| from the model-dtype cache on the tokens both agree on,
# and the least share of tokens that agree (counted up to each sequence's first difference, after which the
# contexts differ). The float32 logits move by the attention outputs' rounding
# (tests/layers/attention/test_quantized_kv_cache.py: int8's steps are finer than e4m3's relative 2^-4, itself
# finer than e5m2's 2^-3) carried through the layers, so a greedy token can change only where the reference's top
# two logprobs lie within twice the tolerance: every difference must come at such a near-tie. The random-weight
# models have many near-ties, so agreement can end early. Bounds are the measured values (docs/quantization.md)
# with a margin. DeepSeek's are loose: absorbed MLA queries are large (W_UK^T q), so the latent's rounding moves
# its scores several times more than a per-head key's; Gemma 4's later layers read an earlier layer's cache.
BOUNDS = {("llama", "int8"): (0.2, 0.9), ("llama", "fp8"): (0.25, 0.5), ("llama", "fp8_e5m2"): (0.4, 0.5),
          ("gemma4", "int8"): (0.2, 0.4), ("gemma4", "fp8"): (0.4, 0.1),
          ("deepseek_v3", "int8"): (1.6, 0.5), ("deepseek_v3", "fp8"): (1.6, 0.3)}


def greedy(path, **engine_args) -> tuple[list, int]:
    """Each prompt's completion (twice: the second from the prefix cache) and the cache's block count."""
    llm = LLM(str(path), kv_cache_memory_bytes="4MiB", max_model_len=128, max_num_batched_tokens=16,
              **engine_args)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=2, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS] * 2, params)
    return [o.outputs[0] for o in outputs], llm.engine.core.block_manager.num_blocks


@pytest.fixture(scope="module")
def auto(checkpoint_dir):
    references = {}

    def get(family: str):
        if family not in references:
            references[family] = greedy(checkpoint_dir(family))
        return references[family]

    return get


# Llama in every format; multi-head latent attention (DeepSeek: one latent cache, read with the key's scale) and
# Gemma 4's KV sharing (later layers read an earlier layer's quantised cache with its scales) in int8 and fp8.
CASES = list(BOUNDS)


@pytest.mark.parametrize("family,kv_cache_dtype", CASES)
def test_quantised_cache_keeps_greedy_output_and_holds_4x_the_blocks_of_float32(checkpoint_dir, auto, family,
                                                                                 kv_cache_dtype):
    (reference, auto_blocks) = auto(family)
    results, blocks = greedy(checkpoint_dir(family), kv_cache_dtype=kv_cache_dtype)
    tolerance, min_agreement = BOUNDS[family, kv_cache_dtype]
    agreeing = 0
    for ref, out in zip(reference, results):
        same = next((i for i, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)) if a != b), MAX_TOKENS)
        agreeing += same
        for t, ref_lp, lp in zip(ref.token_ids[:same], ref.logprobs[:same], out.logprobs[:same]):
            assert abs(ref_lp[t].logprob - lp[t].logprob) < tolerance
        if same < MAX_TOKENS:
            top = sorted((p.logprob for p in ref.logprobs[same].values()), reverse=True)
            assert top[0] - top[1] < 2 * tolerance, f"token {same} changed where the reference led by {top[0] - top[1]}"
    rate = agreeing / (MAX_TOKENS * len(reference))
    assert rate >= min_agreement, rate
    # A prefix-cache hit reads the same quantised blocks: each prompt's two runs agree exactly.
    assert [o.token_ids for o in results[:len(PROMPTS)]] == [o.token_ids for o in results[len(PROMPTS):]]
    assert blocks == 4 * auto_blocks   # 1 byte per entry against float32's 4 (4MiB divides evenly)


def test_parallel_samples_copy_quantised_blocks_on_write(llama_dir):
    """n > 1 shares the prompt's last partial block, copied when a sample first writes to it (copy-on-write
    through the quantised cache): greedy samples stay identical."""
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="1MiB", max_model_len=64, kv_cache_dtype="fp8")
    out = llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(n=2, max_tokens=8, temperature=0,
                                                                         ignore_eos=True))[0]
    assert [len(o.token_ids) for o in out.outputs] == [8, 8]   # (a failed copy ends both after one token)
    assert out.outputs[0].token_ids == out.outputs[1].token_ids


def test_bfloat16_model_holds_twice_the_blocks(llama_dir):
    def blocks(**args) -> int:
        return LLM(str(llama_dir), dtype="bfloat16", kv_cache_memory_bytes="1MiB", max_model_len=64,
                   **args).engine.core.block_manager.num_blocks

    assert blocks(kv_cache_dtype="fp8") == 2 * blocks()


@pytest.mark.parametrize("value", ["fp16", "float8", "int4", "FP9"])
def test_bad_values_are_refused(llama_dir, value, capsys):
    with pytest.raises(ValueError, match=f"unsupported --kv-cache-dtype '{value}'; choose one of auto, fp8, "
                                         f"fp8_e4m3, fp8_e5m2, int8"):
        LLM(str(llama_dir), kv_cache_dtype=value)
    with pytest.raises(SystemExit):   # the server (and every command) refuses it before starting
        build_parser().parse_args(["serve", str(llama_dir), "--kv-cache-dtype", value])
    assert "--kv-cache-dtype: invalid choice" in capsys.readouterr().err


def test_cli_flag_reaches_the_engine_config(llama_dir):
    args = build_parser().parse_args(["serve", str(llama_dir), "--kv-cache-dtype", "fp8"])
    assert engine_config_from_args(args).kv_cache_dtype == "fp8_e4m3"
    assert EngineConfig(kv_cache_dtype="int8").kv_cache_dtype == "int8"
    assert EngineConfig().kv_cache_dtype == "auto"


def test_checkpoint_scales_are_used_and_int8_is_not_recalibrated(llama_dir, tmp_path):
    """An FP8 checkpoint's per-layer ``k_scale``/``v_scale`` (compressed-tensors naming) and an older one's
    ``kv_scale`` replace the defaults (and an int8 cache then needs no calibration); a bad one is refused."""
    shutil.copytree(llama_dir, tmp_path / "model")
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.04), "model.layers.0.self_attn.v_scale":
              torch.tensor(0.03), "model.layers.1.self_attn.kv_scale": torch.tensor([0.05])}
    save_file(scales, str(tmp_path / "model" / "kv_scales.safetensors"))
    model = load_model(load_config(tmp_path / "model"), tmp_path / "model", torch.float32, torch.device("cpu"))
    first, second = model.attention_layers()
    assert first.kv_scales.tolist() == pytest.approx([0.04, 0.03]) and second.kv_scales.tolist() == pytest.approx(
        [0.05, 0.05])
    first.set_kv_cache_dtype("int8")
    assert not first.needs_kv_calibration()
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(-1.0)}, str(tmp_path / "model" /
                                                                            "kv_scales.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="k_scale: k_scale must be one positive number"):
        load_model(load_config(tmp_path / "model"), tmp_path / "model", torch.float32, torch.device("cpu"))
