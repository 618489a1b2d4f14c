"""Phi-3 (llama.cpp's ``phi3``: Phi-3, Phi-3.5, Phi-4-mini), Command-R (``command-r``; R7B's ``cohere2``), Gemma 2
and Gemma 3 GGUF files run their linear layers packed, as llama / qwen2 files do
(:mod:`tests.model_loader.test_gguf_packed`).

transformers' GGUF support does not read every one of these files as the checkpoint it came from (Phi-3's pad
token falls outside the generated vocabulary; it has no ``command-r`` map), so for all of them the oracle is
transformers' model of the source checkpoint holding the file's weights as the ``gguf`` package dequantises them,
with the inputs of the layers llmserve keeps packed rounded as the group-int8 kernel rounds them
(:func:`assert_packed_file_matches_rounded_transformers`): greedy tokens equal, the median logprob distance below
1e-5. Phi-3's file holds the fused ``attn_qkv`` and ``ffn_up`` (gate and up rows) that its layers take whole;
Command-R's layers run attention and the MLP from the same LayerNorm output and carry per-head q/k LayerNorms
(R7B's add sliding-window layers); Gemma's soft-capped, sliding-window layers take the packed projections under
the llama names. The tiny Phi-3 and Command-R checkpoints (96 columns) take the 32-column formats (Q8_0; Phi-3's
also Q5_0, whose 5-bit codes run as the kernel's 6-bit ones); the wider ones (256 columns) Q4_K_M's k-quant
super-blocks (the tiny Gemma checkpoints, 48 columns, take no block format).
"""

from __future__ import annotations

import pytest

from tests.model_loader.packed_reference import assert_packed_file_matches_rounded_transformers, packed_modules

pytest.importorskip("gguf")

# llmserve's fused layers of the first decoder layer (a layer left dequantised would escape the oracle's rounding)
EVERY_PROJECTION = {f"model.layers.0.{m}" for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                    "mlp.down_proj")}


@pytest.mark.parametrize("family,file_type", [("phi3", "Q8_0"), ("phi3", "Q5_0"), ("phi4_mini", "Q5_0"),
                                              ("cohere", "Q8_0"), ("cohere2", "Q8_0")])
def test_packed_file_matches_rounded_transformers(gguf_file, gguf_source, caplog, family, file_type):
    path = gguf_file(family, file_type)
    packed = packed_modules(path)
    assert EVERY_PROJECTION <= packed
    assert_packed_file_matches_rounded_transformers(path, gguf_source(family), packed, caplog)


@pytest.mark.parametrize("family", ["phi3", "cohere", "cohere2", "gemma2", "gemma3"])
@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q8_0"])
def test_k_quant_file_matches_rounded_transformers(wide_gguf_file, gguf_dir, caplog, family, file_type):
    path = wide_gguf_file(file_type, family)
    packed = packed_modules(path)
    assert EVERY_PROJECTION <= packed
    assert_packed_file_matches_rounded_transformers(path, gguf_dir / f"{family}-wide-checkpoint", packed, caplog)
