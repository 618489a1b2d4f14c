"""What packed GGUF layers are checked against: the group-int8 kernel's rounding of a layer's input, and, for the
files transformers cannot read, transformers' model of the source checkpoint holding the file's weights as the
``gguf`` package dequantises them, with the inputs of the layers llmserve keeps packed rounded that way."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from llmserve.model_loader import gguf_loader
from llmserve.model_loader.gguf_config import load_gguf_config
from llmserve.quantization.group_int8 import quantize_activations
from tests.engine_greedy import MAX_TOKENS, PROMPTS, engine_greedy
from tests.hf_reference import model_greedy


def round_like_the_kernel(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A linear layer's input rounded as the group-int8 kernel rounds it (int8 per row and block of 32 columns);
    a forward pre-hook's signature."""
    x = args[0]
    rows = x.reshape(-1, x.shape[-1]).float()
    q, scale = quantize_activations(rows)
    return ((q.float().view(rows.shape[0], -1, 32) * scale.unsqueeze(-1)).view(x.shape).to(x.dtype),)


def engine_results(path: Path, caplog: pytest.LogCaptureFixture, **engine_args: str) -> list:
    """:func:`engine_greedy` on a file that must run packed (its start-up log says so)."""
    with caplog.at_level(logging.INFO, logger="llmserve.model_loader.loader"):
        results = engine_greedy(path, **engine_args)
    assert any("Quantisation: gguf" in r.getMessage() for r in caplog.records), "the file did not run packed"
    return results


def packed_modules(path: Path) -> set[str]:
    """The checkpoint module names of the layers llmserve runs packed from this file (a fused MoE layer by its
    ``experts`` module; a layer the checkpoint also holds fused, as Phi-3's ``qkv_proj``, by both names)."""
    from llmserve.quantization.gguf import GGUFLinearMethod
    from llmserve.quantization.layer_selection import checkpoint_names
    from tests.model_helpers import load_tiny

    def packed(module: torch.nn.Module) -> bool:
        method = getattr(module, "quant_method", None)
        return isinstance(method, GGUFLinearMethod) or isinstance(getattr(method, "linear_method", None),
                                                                  GGUFLinearMethod)

    return {name for prefix, m in load_tiny(path).named_modules() if packed(m)
            for name in (prefix, *checkpoint_names(prefix))}


def assert_packed_file_matches_rounded_transformers(path: Path, source: Path, packed: set[str],
                                                    caplog: pytest.LogCaptureFixture,
                                                    median_within: float | None = 1e-5) -> None:
    """The engine's greedy tokens equal the oracle's, logprobs to float32 summation order (the median within
    ``median_within``) but for an input that lands on the other side of a rounding boundary in one of the two (a
    step of max|x| / 127 in its block, which moves that token's logprobs: measured up to 7e-3), every one within
    0.05. ``median_within`` None: no median check, for models where such crossings are common."""
    results = engine_results(path, caplog, dtype="float32")
    reference = _transformers_on_file_weights(path, source)
    with _inputs_rounded(reference, packed):
        expected = [model_greedy(reference, prompt, MAX_TOKENS) for prompt in PROMPTS]
    distances = []
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results, expected * 2):
        assert tokens == ref_tokens
        distances += [abs(a - b) for a, b in zip(logprobs, ref_logprobs)]
    assert max(distances) < 0.05
    assert median_within is None or statistics.median(distances) < median_within


def _transformers_on_file_weights(path: Path, source: Path) -> torch.nn.Module:
    """transformers' model of ``source`` holding the file's weights as llmserve dequantises them."""
    from transformers import AutoModelForCausalLM

    floats = dict(gguf_loader.iterate_gguf_weights(gguf_loader.GGUFTensors(path, load_gguf_config(path))))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, experts_implementation="eager")
    state = {}
    for name, tensor in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if name in floats:
            state[name] = floats[name]
        elif stem.endswith("mlp.experts"):   # unstacked by the loader: [experts, gate+up | down, in]
            parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
            state[name] = torch.stack([torch.cat([floats[f"{stem}.{e}.{part}.weight"] for part in parts])
                                       for e in range(tensor.shape[0])])
        elif name == "lm_head.weight":   # tied to the input embeddings (BLOOM's transformer.word_embeddings)
            state[name] = next(floats[n] for n, p in model.named_parameters()
                               if p is model.get_input_embeddings().weight)
        else:
            state[name] = tensor   # a buffer the checkpoint does not hold
    model.load_state_dict(state)
    return model.eval()


@contextmanager
def _inputs_rounded(model: torch.nn.Module, modules: set[str]) -> Iterator[None]:
    """Every linear layer of ``modules`` (by llmserve's or the checkpoint's name) with its input rounded as the
    group-int8 kernel rounds it: a forward pre-hook on each (Falcon's multiplies by its weight without
    ``F.linear``; GPT-2's are ``Conv1D``), and ``F.linear`` on an expert's slice of the stacks."""
    from transformers.pytorch_utils import Conv1D

    from llmserve.models.registry import resolve_model_class

    checkpoint_name = resolve_model_class(model.config).checkpoint_name   # BLOOM's query_key_value: qkv_proj

    def listed(name: str) -> bool:
        return name in modules or checkpoint_name(f"{name}.weight").removesuffix(".weight") in modules

    hooks, weights = [], set()
    for name, module in model.named_modules():
        if listed(name) and isinstance(module, (torch.nn.Linear, Conv1D)):   # GPT-2's projections are Conv1D
            hooks.append(module.register_forward_pre_hook(round_like_the_kernel))
        elif listed(name):   # stacked experts, sliced per expert by transformers' eager loop
            weights.update(stack[e].data_ptr() for stack in (module.gate_up_proj, module.down_proj)
                           for e in range(stack.shape[0]))
    linear = torch.nn.functional.linear

    def rounded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(round_like_the_kernel(None, (x,))[0] if weight.data_ptr() in weights else x, weight, bias)

    torch.nn.functional.linear = rounded
    try:
        yield
    finally:
        torch.nn.functional.linear = linear
        for hook in hooks:
            hook.remove()
