"""Checkpoint-quantised layers shard over tensor-parallel ranks as float ones do (vLLM's placement): a
column-parallel layer keeps its rows of each fused projection (QKV by its per-rank heads), a row-parallel one
its input columns, in packed units for packed tensors and in groups for per-group scales; GPTQ keeps every
group's scales and zeros and each rank its slice of ``g_idx``; an expert is split over its intermediate
dimension (tensor parallelism) or held whole (expert parallelism).

* Simulated ranks (threads): weight-only formats (and FP8 with a static input scale) compute the same weights at
  two or four ranks as at one, only the partial sums' order differs: log-probabilities within 1e-4. W8A8 and
  dynamic FP8 quantise each rank's slice of a row-parallel input per token (as vLLM does), so at two ranks they
  are held to their PyTorch reference arithmetic (kernels off) within 1e-3, as their one-rank tests are.
* Worker processes: at TP=2, expert parallelism and TP=2 x PP=2 the engine's greedy tokens equal transformers'
  on the dequantised twin, logprobs within 1e-3.
* A split that cuts a group is refused at start-up with the numbers.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.quantization import packed
from llmserve.quantization.checkpoint_params import CheckpointFormatError
from tests.engine_greedy import assert_matches_hf, engine_greedy
from tests.model_helpers import PROMPT, load_tiny, prefill_logits, tensor_parallel_logits
from tests.parallel_sim import as_rank, shape_only_group

LONG_PROMPT = PROMPT + list(range(100, 140))


@pytest.mark.parametrize("fmt,family,options,ranks,expert_parallel", [
    ("gptq", "llama", {}, 2, False),                                # groups of 32: o_proj's 32 columns per rank
    ("gptq", "qwen2", {"desc_act": True, "sym": False}, 2, False),  # act-order g_idx sliced; q/k/v biases
    ("gptq", "llama", {"bits": 8, "group_size": -1, "v2": True}, 2, False),
    ("gptq", "llama", {"group_size": -1}, 4, False),                # 2 KV heads on 4 ranks: each on two
    ("awq", "llama", {}, 2, False),
    ("ct-w4a16", "llama", {}, 2, False),
    ("ct-fp8-static", "llama", {}, 2, False),                       # per-tensor scales kept whole
    ("gptq", "mixtral", {"desc_act": True}, 2, False),              # every expert split over its intermediate
    ("ct-w4a16", "mixtral", {}, 2, False),
    ("awq", "mixtral", {}, 2, True),                                # whole experts per rank
])
def test_weight_only_formats_compute_the_same_across_ranks(quantized, fmt, family, options, ranks, expert_parallel):
    path, _ = quantized(fmt, family, **options)
    one_rank = prefill_logits(load_tiny(path), LONG_PROMPT).log_softmax(-1)
    for logits in tensor_parallel_logits(path, ranks, LONG_PROMPT, expert_parallel=expert_parallel):
        torch.testing.assert_close(logits.log_softmax(-1), one_rank, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt,family", [("ct-w8a8", "llama"), ("ct-fp8-dynamic", "llama"), ("ct-w8a8", "mixtral")])
def test_activation_quantised_formats_match_their_reference_arithmetic_at_two_ranks(quantized, monkeypatch, fmt,
                                                                                    family):
    path, _ = quantized(fmt, family)
    ours = tensor_parallel_logits(path, 2, LONG_PROMPT)
    monkeypatch.setattr(packed, "kernels_for", lambda t: None)
    reference = tensor_parallel_logits(path, 2, LONG_PROMPT)
    for logits, expected in zip(ours, reference):
        torch.testing.assert_close(logits.log_softmax(-1), expected.log_softmax(-1), atol=1e-3, rtol=0)


def test_an_act_order_rank_keeps_its_g_idx_slice_and_pads_its_partial_groups(quantized):
    """o_proj's 64 inputs in act-order groups of 32: rank 1's 32 columns belong to both groups, so each group
    becomes whole chunks of 32 columns, the padding reading a zero input (index 32)."""
    path, _ = quantized("gptq", "qwen2", desc_act=True, sym=False)
    with as_rank(tp=shape_only_group(1, 2)):
        o_proj = load_tiny(path).model.layers[0].self_attn.o_proj
    assert o_proj.wq_x_in == 32 and o_proj.wq_in == 64 and o_proj.wq_group == 32
    assert sorted(o_proj.wq_perm[o_proj.wq_perm < 32].tolist()) == list(range(32))
    assert int((o_proj.wq_perm == 32).sum()) == 32
    assert o_proj.wq_scales.shape == (64, 2)


@pytest.mark.parametrize("fmt,family,options,message", [
    ("gptq", "llama", {"group_size": 64}, r"model.layers.0.self_attn.o_proj: its 64 inputs split over 2 "
                                          r"tensor-parallel ranks leave 32 per rank, not a multiple of the GPTQ "
                                          r"group size \(64\)"),
    ("ct-w4a16", "llama", {"group_size": 64}, r"o_proj: .* leave 32 per rank, not a multiple of the "
                                              r"compressed-tensors group size \(64\)"),
    ("gptq", "qwen3_moe", {}, r"experts.0.down_proj: its 32 inputs split over 2 tensor-parallel ranks leave 16 "
                              r"per rank, not a multiple of the GPTQ group size \(32\)"),
])
def test_a_split_that_cuts_a_group_is_refused(quantized, fmt, family, options, message):
    path, _ = quantized(fmt, family, **options)
    with as_rank(tp=shape_only_group(0, 2)), pytest.raises(CheckpointFormatError, match=message):
        load_tiny(path)


@pytest.mark.parametrize("fmt,family,options,engine_args", [
    ("gptq", "llama", {"desc_act": True, "sym": False}, {"tensor_parallel_size": 2}),
    ("gptq", "mixtral", {"desc_act": True}, {"tensor_parallel_size": 2}),
    ("awq", "mixtral", {}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}),
    ("ct-w4a16", "llama", {}, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
], ids=["gptq-act-order-tp2", "gptq-mixtral-tp2", "awq-mixtral-ep2", "w4a16-tp2pp2"])
def test_engine_across_ranks_matches_transformers_on_the_dequantised_checkpoint(quantized, fmt, family, options,
                                                                                engine_args):
    path, reference = quantized(fmt, family, **options)
    assert_matches_hf(engine_greedy(path, **engine_args), reference, 1e-3)


@pytest.mark.parametrize("fmt,tensor,stored_as,message", [
    ("gptq", "model.layers.0.self_attn.q_proj.qweight", torch.float32, "stored as torch.float32; .* as torch.int32"),
    ("ct-w8a8", "model.layers.0.self_attn.q_proj.weight", torch.float32, "stored as torch.float32; .* as torch.int8"),
    ("ct-fp8-dynamic", "model.layers.0.mlp.down_proj.weight", torch.bfloat16,
     "stored as torch.bfloat16; .* as torch.float8_e4m3fn"),
    ("gptq", "model.layers.0.self_attn.o_proj.scales", torch.int32, "stored as torch.int32; .* as a float type"),
    ("ct-fp8-static", "model.layers.0.self_attn.o_proj.input_scale", torch.int64,
     "stored as torch.int64; .* as a float type"),
])
def test_a_tensor_in_another_dtype_than_its_formats_is_refused_not_cast(quantized, tmp_path, fmt, tensor, stored_as,
                                                                        message):
    """A dequantised float tensor where codes belong would otherwise be cast into (meaningless) codes."""
    path, _ = quantized(fmt)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors[tensor] = tensors[tensor].to(stored_as)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load_tiny(copy)


def test_g_idx_may_come_in_any_integer_type(quantized, tmp_path):
    path, _ = quantized("gptq", desc_act=True)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    tensors = load_file(copy / "model.safetensors")
    for name in [k for k in tensors if k.endswith(".g_idx")]:
        tensors[name] = tensors[name].to(torch.int64)
    save_file(tensors, copy / "model.safetensors")
    ours, theirs = load_tiny(copy), load_tiny(path)
    torch.testing.assert_close(prefill_logits(ours, PROMPT), prefill_logits(theirs, PROMPT), rtol=0, atol=0)
