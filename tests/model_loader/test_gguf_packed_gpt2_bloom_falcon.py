"""GPT-2, BLOOM and Falcon GGUF files (llama.cpp's ``gpt2``, ``bloom`` and ``falcon``) run their linear layers packed,
as llama files do (:mod:`tests.model_loader.test_gguf_packed`).

Their checkpoints name the layers otherwise (``transformer.h.N.self_attention.query_key_value``: the model's
``model.layers.N.self_attn.qkv_proj``). BLOOM and Falcon fuse q/k/v per head group, which the file stores as all q
rows, then k, then v: the packed rows take the dequantised path's reorderings exactly, transformers' (or
llmserve's Falcon) processor putting them in the checkpoint's per-group order and the model restacking them as
``[q; k; v]``. GPT-2's checkpoint stores ``Conv1D`` weights ``[in, out]``, which transformers' processor makes of
the file's ``[out, in]`` and the model transposes back: its packed rows stay in the file's order.

Two checks per file:

* every packed layer multiplies as the same layer loaded dequantised from the file, on an input rounded as the
  group-int8 kernel rounds it (float32 summation order apart): the rows, their order and the fused segments are
  the file's;
* through the engine, transformers' model of the source checkpoint holding the file's weights (the inputs of the
  packed layers rounded as the kernel rounds them) gives the same greedy tokens and every logprob within 0.05. An
  input whose float32 value differs in its last bit between the two implementations can land on the other side
  of a rounding boundary (a step of max|x| / 127 in its block) and move the rest of that sequence: on these
  LayerNorm / GELU models one prompt in three or more, by up to 0.037 (measured), so the median is not held to
  summation order as it is for the llama-shaped families.

Falcon is both of its rotary layouts: the new decoder architecture (Falcon-40B/180B: two KV groups, two parallel
norms) and multi-query (Falcon-7B). BLOOM's MLP is always four times its hidden size, so its wide checkpoint is
256 x 1024.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmserve.quantization import gguf as gguf_quantization
from llmserve.quantization.gguf import GGUFLinearMethod
from tests.model_helpers import load_tiny
from tests.model_loader.packed_reference import (assert_packed_file_matches_rounded_transformers, packed_modules,
                                                 round_like_the_kernel)

pytest.importorskip("gguf")

FAMILIES = ["gpt2", "bloom", "falcon", "falcon_mqa"]
EVERY_PROJECTION = {f"model.layers.0.{m}" for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.up_proj",
                                                    "mlp.down_proj")}


def _assert_layers_multiply_as_dequantised(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packed = load_tiny(path)
    monkeypatch.setattr(gguf_quantization, "PACKED_ARCHITECTURES", ())
    dense = load_tiny(path)
    generator = torch.Generator().manual_seed(0)
    checked = set()
    for name, layer in packed.named_modules():
        if not isinstance(getattr(layer, "quant_method", None), GGUFLinearMethod):
            continue
        twin = dense.get_submodule(name)
        x = torch.randn(5, layer.gguf_in, generator=generator)
        rounded = round_like_the_kernel(None, (x,))[0]
        expected = twin.quant_method.apply(twin, rounded, getattr(twin, "bias", None))   # (the LM head has none)
        actual = layer.quant_method.apply(layer, x, getattr(layer, "bias", None))
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        checked.add(name)
    assert EVERY_PROJECTION <= checked


def _assert_engine_matches_rounded_transformers(path: Path, source: Path, caplog: pytest.LogCaptureFixture) -> None:
    packed = packed_modules(path)
    assert EVERY_PROJECTION <= packed
    assert_packed_file_matches_rounded_transformers(path, source, packed, caplog, median_within=None)


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_file_runs_packed(gguf_file, gguf_source, caplog, monkeypatch, family):
    path = gguf_file(family, "Q8_0")
    _assert_engine_matches_rounded_transformers(path, gguf_source(family), caplog)
    _assert_layers_multiply_as_dequantised(path, monkeypatch)


@pytest.mark.parametrize("family", FAMILIES)
def test_k_quant_file_runs_packed(wide_gguf_file, gguf_dir, caplog, monkeypatch, family):
    """Q4_K_M as llama.cpp mixes it for these files: the fused qkv in Q5_K, ``ffn_down`` in Q6_K in some layers and
    Q4_K in others, Falcon-7B's untied output head in Q6_K."""
    path = wide_gguf_file("Q4_K_M", family)
    _assert_engine_matches_rounded_transformers(path, gguf_dir / f"{family}-wide-checkpoint", caplog)
    _assert_layers_multiply_as_dequantised(path, monkeypatch)


@pytest.mark.parametrize("family,embedding", [("gpt2", "transformer.wte.weight"),
                                              ("bloom", "transformer.word_embeddings.weight")])
def test_a_file_with_llama_cpps_output_head_packs_it(checkpoint_dir, gguf_dir, caplog, monkeypatch, family,
                                                       embedding):
    """llama.cpp's converter writes GPT-2's and BLOOM's tied head as ``output.weight`` (a copy of the embedding),
    which llama.cpp multiplies: the head loads untied, packed (GPT-2's through transformers' processor, which keeps it
    as ``lm_head.weight`` under a name of its own)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from llmserve.model_loader.gguf_config import load_gguf_config
    from llmserve.testing.gguf_files import write_gguf

    source = shutil.copytree(checkpoint_dir(family), gguf_dir / f"{family}-untied-checkpoint", dirs_exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    tensors = {name: t for f in source.glob("*.safetensors") for name, t in load_file(f).items()}
    tensors["lm_head.weight"] = tensors[embedding].clone()
    for f in source.glob("*.safetensors"):
        f.unlink()
    save_file({name: t.contiguous() for name, t in tensors.items()}, source / "model.safetensors")
    path = write_gguf(source, gguf_dir / f"{family}-untied-Q8_0.gguf", family, "Q8_0")
    assert not load_gguf_config(path).tie_word_embeddings
    assert "lm_head" in packed_modules(path)
    _assert_engine_matches_rounded_transformers(path, source, caplog)
    _assert_layers_multiply_as_dequantised(path, monkeypatch)


class _Processor:
    """A stand-in for :class:`~llmserve.model_loader.gguf_loader.GGUFTensors` whose processor applies ``change``."""

    def __init__(self, change):
        self.change = change

    def process(self, weights, name):
        return name, self.change(weights)


def _full_width(change):
    """``change``, but refusing a tensor narrower than its 32 columns (as BLOOM's processor reshapes by them)."""
    def checked(weights):
        if weights.shape[1] != 32:
            raise ValueError("cannot reshape")
        return change(weights)
    return checked


def test_the_row_order_follows_a_processor_that_reorders_or_transposes_and_refuses_any_other():
    import numpy as np

    from llmserve.model_loader.gguf_loader import NotPackable, _row_order

    def mixed(weights):   # column 0 in one order, the rest in another
        out = weights[[3, 2, 1, 0]].copy()
        out[:, 0] = weights[:, 0]
        return out

    def refuse(weights):
        raise ValueError("the processor's own error")

    widths = []

    def recorded(weights):
        widths.append(weights.shape[1])
        return weights[[1, 0, 3, 2]]

    tensor = type("Tensor", (), {"data": np.zeros((4, 34), np.uint8), "shape": np.array([32, 4]), "name": "t"})
    assert _row_order(_Processor(recorded), tensor).tolist() == [1, 0, 3, 2] and widths == [2]   # not 32 wide
    assert _row_order(_Processor(_full_width(lambda w: w[[2, 0, 3, 1]])), tensor).tolist() == [2, 0, 3, 1]
    assert _row_order(_Processor(lambda w: w.T), tensor).tolist() == [0, 1, 2, 3]   # GPT-2's Conv1D
    for change in (lambda w: w * 0 + np.arange(32), lambda w: w[[0, 0, 1, 2]], lambda w: w[:, ::-1],
                   lambda w: w[[1, 0, 2, 3]].T, _full_width(mixed), _full_width(lambda w: w.reshape(32, 4))):
        with pytest.raises(NotPackable, match="does more than reorder or transpose"):
            _row_order(_Processor(change), tensor)
    with pytest.raises(ValueError, match="the processor's own error"):
        _row_order(_Processor(refuse), tensor)
