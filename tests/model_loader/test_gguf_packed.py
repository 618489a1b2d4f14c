"""GGUF files whose linear weights run packed (llama, qwen2, qwen3 files in Q8_0, Q4_0/1, Q5_0/1, Q2_K to
Q6_K) give what transformers gives on the same file, up to the activations' rounding; a mixture-of-experts
file's packed experts multiply as their blocks dequantised (transformers cannot read those files).

The packed path quantises every linear layer's input per row and block of 32 columns to int8 (as llama.cpp
does), so it is compared twice, through the engine (chunked prefill, prefix-cache hits):

* with transformers running the same rounding (each ``nn.Linear`` input rounded as the kernel rounds it): the
  same greedy tokens, the median logprob within a quarter of its distance to plain transformers (most agree
  to float32 summation order, about 1e-6), all within 0.1: an activation whose float32 value differs in the last
  bit between the two implementations can land on the other side of a rounding boundary (a step of max|x| / 127
  for its block), which moves that step and, through the KV cache, the rest of that sequence (measured: up to
  0.064, on one prompt in three, or on two, depending on the CPU's float32 GEMM in transformers);
* with plain transformers (float activations): the same greedy tokens on these prompts, logprobs within 0.15
  (the rounding alone moves transformers' own logprobs by up to 0.09 on these random-weight models).

The Q4_K_M-like files hold Q4_K with Q6_K for ``attn_v``/``ffn_down`` of some layers and the output head, so a
fused qkv layer there has segments of two formats; on the tiny checkpoint (64 columns, no 256-column
super-block) the same mix falls back to Q5_0 / Q8_0 as llama.cpp's does.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.engine_greedy import MAX_TOKENS, PROMPTS, assert_matches_hf
from tests.hf_reference import hf_greedy, hf_model
from tests.model_loader.packed_reference import engine_results, round_like_the_kernel

pytest.importorskip("gguf")
pytest.importorskip("accelerate")


@contextmanager
def rounded_activations(path: Path) -> Iterator[None]:
    """transformers' model of ``path`` (as :func:`hf_greedy` loads it) with every linear input rounded as the
    group-int8 kernel rounds it."""
    model = hf_model(str(path), None, torch.float32)
    hooks = [m.register_forward_pre_hook(round_like_the_kernel) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _check_against_transformers(path: Path, caplog: pytest.LogCaptureFixture, **engine_args: str) -> None:
    results = engine_results(path, caplog, **engine_args)
    plain = [hf_greedy(path, p, MAX_TOKENS) for p in PROMPTS]
    with rounded_activations(path):
        rounded = [hf_greedy(path, p, MAX_TOKENS) for p in PROMPTS]
    to_rounded, to_plain = [], []
    for (tokens, logprobs), (ref_tokens, ref_logprobs), (plain_tokens, plain_logprobs) in zip(
            results, rounded * 2, plain * 2):
        assert tokens == ref_tokens == plain_tokens
        to_rounded += [abs(a - b) for a, b in zip(logprobs, ref_logprobs)]
        to_plain += [abs(a - b) for a, b in zip(logprobs, plain_logprobs)]
    assert max(to_rounded) < 0.1 and max(to_plain) < 0.15
    # the boundary cases of the docstring move whole sequences, so the median, not each logprob, is the check
    assert statistics.median(to_rounded) < 0.25 * statistics.median(to_plain)


@pytest.mark.parametrize("family,file_type", [("qwen2", "Q8_0"), ("llama", "Q4_1"), ("qwen2", "Q5_0"),
                                              ("llama", "Q4_K_M")])
def test_packed_file_matches_transformers_up_to_activation_rounding(gguf_file, gguf_tokenizer, caplog, family,
                                                                     file_type):
    _check_against_transformers(gguf_file(family, file_type), caplog, **gguf_tokenizer(family))


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q8_0", "Q3_K"])
def test_k_quant_file_matches_transformers_up_to_activation_rounding(wide_gguf_file, caplog, file_type):
    _check_against_transformers(wide_gguf_file(file_type), caplog)


def test_q2_k_file_gives_transformers_greedy_tokens(wide_gguf_file, caplog):
    """Q2_K is compared with plain transformers only: on this random-weight model with 2-bit weights one prompt
    is so near a tie under the activations' rounding that transformers' own rounded run changes its greedy
    tokens between float32 and float64 (logprobs by 0.19), so the rounded reference is not a stable oracle
    there; the blocks' decoding and the kernel's 4-bit / 16-column groups are tested exactly elsewhere."""
    path = wide_gguf_file("Q2_K")
    results = engine_results(path, caplog)
    for (tokens, logprobs), prompt in zip(results, PROMPTS * 2):
        plain_tokens, plain_logprobs = hf_greedy(path, prompt, MAX_TOKENS)
        assert tokens == plain_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, plain_logprobs)) < 0.15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q8_0", "Q3_K"])
def test_on_cuda_packed_files_match_plain_transformers(wide_gguf_file, caplog, file_type):
    """On CUDA the packed weights run through the weight-only Triton kernel with float activations (no int8
    rounding), so in float32 they give plain transformers' greedy tokens and logprobs within 1e-3."""
    path = wide_gguf_file(file_type)
    results = engine_results(path, caplog, device="cuda", dtype="float32")
    assert_matches_hf(results, path, 1e-3)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_packed_experts_multiply_as_their_blocks_dequantised(gguf_file, family):
    """A mixture-of-experts file's stacked experts stay packed, each expert its own rows of blocks: an expert's
    gate/up and down projections give the activations (rounded as the kernel rounds them) times the file's
    blocks dequantised by the ``gguf`` package."""
    import gguf
    import numpy as np

    from llmserve.quantization.gguf import GGUFLinearMethod
    from tests.model_helpers import load_tiny

    path = gguf_file(family, "Q8_0")
    experts = load_tiny(path).model.layers[0].mlp.experts
    method = experts.quant_method.linear_method
    assert isinstance(method, GGUFLinearMethod)
    stacks = {t.name.split(".")[2]: gguf.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors
              if t.name.startswith("blk.0.") and "_exps." in t.name}
    generator = torch.Generator().manual_seed(0)
    for e, (w13, w2) in enumerate(zip(experts.w13_experts, experts.w2_experts)):
        for module, weight in ((w13, np.concatenate([stacks["ffn_gate_exps"][e], stacks["ffn_up_exps"][e]])),
                               (w2, stacks["ffn_down_exps"][e])):
            x = torch.randn(3, weight.shape[1], generator=generator)
            expected = round_like_the_kernel(None, (x,))[0] @ torch.from_numpy(weight).T
            torch.testing.assert_close(method.apply(module, x), expected, rtol=1e-5, atol=1e-5)
