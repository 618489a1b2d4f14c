"""bfloat16 on CPU end to end: ``--dtype auto`` picks it where the CPU multiplies bfloat16 natively, and the
engine's bfloat16 run (compiled kernels: pair-blocked linear, norms, rotary, decode attention on a bfloat16
KV cache) gives transformers' bfloat16 greedy tokens.

Tolerance: both sides round every layer's outputs to bfloat16 (8 significant bits), but sum in different
orders (float32 tiles here, oneDNN there), so their roundings differ by one bfloat16 step now and then and the
differences travel through the layers. A logprob is a logit minus the log-sum-exp of the logits, both of
magnitude ~10 on the tiny model, where one bfloat16 step (2^-8 relative) is ~0.04; on these prompts the two
differ by up to ~0.07, so 0.15 allows a few such steps. For the same reason two candidates whose logprobs
are within that tolerance are a tie in bfloat16 that either side may break its own way (transformers in
float32 leaves the bfloat16 tokens after a few steps on every prompt here): greedy tokens must be equal up to
such a tie, where HF's token must be our runner-up within the tolerance; the comparison then goes on from HF's
tokens (fed back as the prompt), so every position of every prompt is compared, however early a tie comes (on
CPUs without native bfloat16 the two sides' roundings differ more often and ties come earlier). The same run in
float32 agrees to 1e-3 (tests/engine/test_hf_equivalence.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve import config as config_module
from llmserve.layers.cpu_kernels import CPUKernels
from llmserve.quantization.unquantized import ROW_MAJOR_BF16_MAX_ROWS
from tests.engine.test_hf_equivalence import PROMPTS
from tests.hf_reference import hf_greedy

MAX_TOKENS = 12
BF16_LOGPROB_TOLERANCE = 0.15


def test_auto_dtype_runs_bf16_on_a_cpu_with_native_bf16_and_matches_hf_bf16(llama_dir, monkeypatch, caplog):
    monkeypatch.setattr(config_module, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    with caplog.at_level(logging.INFO, logger="llmserve.engine.input_processor"):
        llm = LLM(str(llama_dir), kv_cache_memory_bytes="32MiB")
    assert llm.engine.dtype == torch.bfloat16 and llm.engine.config.dtype == "bfloat16"
    assert "--dtype auto: bfloat16 on this CPU: the CPU has native bfloat16 (avx512_bf16)" in caplog.text
    _assert_greedy_matches_hf_bf16(llm, llama_dir)


def test_a_tied_lm_head_in_bf16_runs_the_row_major_kernel_and_matches_hf_bf16(checkpoint_dir, monkeypatch):
    """A tied head shares the embedding's row-major weight (llama3 family: ``tie_word_embeddings``), which the
    bfloat16 row-major kernel multiplies in place, not oneDNN, on steps of up to ROW_MAJOR_BF16_MAX_ROWS
    sequences."""
    model_dir = checkpoint_dir("llama3")
    llm = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory_bytes="32MiB", max_num_seqs=ROW_MAJOR_BF16_MAX_ROWS)
    model = llm.engine.runner.model
    head_weight = model.lm_head.weight
    assert head_weight is model.model.embed_tokens.weight and head_weight.dim() == 2
    weights_run = []
    row_major_linear = CPUKernels.linear_bf16

    def recording(self, x, weight, bias):
        weights_run.append(weight.data_ptr())
        return row_major_linear(self, x, weight, bias)

    monkeypatch.setattr(CPUKernels, "linear_bf16", recording)
    _assert_greedy_matches_hf_bf16(llm, model_dir)
    assert head_weight.data_ptr() in weights_run


def _assert_greedy_matches_hf_bf16(llm: LLM, model_dir: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    compared = 0
    for out in llm.generate(PROMPTS, params):
        ref_tokens, ref_logprobs = hf_greedy(model_dir, out.prompt_token_ids, MAX_TOKENS, dtype=torch.bfloat16)
        position, completion = 0, out.outputs[0]
        while position < MAX_TOKENS:
            for token, top in zip(completion.token_ids, completion.logprobs):
                ref_token, ref_logprob = ref_tokens[position], ref_logprobs[position]
                assert ref_token in top, f"prompt {out.prompt!r}: HF's {ref_token} is not in our top two"
                assert top[ref_token].logprob == pytest.approx(ref_logprob, abs=BF16_LOGPROB_TOLERANCE)
                compared += 1
                position += 1
                if token != ref_token:   # a bfloat16 tie, broken the other way: go on from HF's tokens
                    assert top[ref_token].logprob == pytest.approx(top[token].logprob, abs=BF16_LOGPROB_TOLERANCE)
                    forced = {"prompt_token_ids": out.prompt_token_ids + ref_tokens[:position]}
                    rest = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS - position, ignore_eos=True, logprobs=2)
                    completion = llm.generate([forced], rest)[0].outputs[0]
                    break
            else:
                break   # the completion ran out (the assertion below fails if it was short)
    assert compared == len(PROMPTS) * MAX_TOKENS


def test_auto_dtype_stays_float32_without_native_bf16(llama_dir, monkeypatch, caplog):
    monkeypatch.setattr(config_module, "cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    with caplog.at_level(logging.INFO, logger="llmserve.engine.input_processor"):
        llm = LLM(str(llama_dir), kv_cache_memory_bytes="8MiB")
    assert llm.engine.dtype == torch.float32 and llm.engine.config.dtype == "float32"
    assert "--dtype auto: float32 on this CPU: the CPU has no native bfloat16" in caplog.text
