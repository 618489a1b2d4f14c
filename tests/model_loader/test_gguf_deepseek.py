"""DeepSeek-V2/V3 GGUF files (llama.cpp's ``deepseek2``, written from the generated checkpoints the way its
converter lays them out: ``llmserve.testing.gguf_files``) load and run.

* An F32 file gives the checkpoint's own output (greedy tokens equal, logprobs within 1e-4 of transformers on
  the safetensors folder), for V2-Lite (queries from ``attn_q``, softmax routing, two shared experts), V2 (low-rank
  queries, softmax routing limited to the best 2 of 4 groups, a group ranked by its best expert as DeepSeek-V2
  ranks it, not by its best two as llama.cpp does; routed weights scaled) and V3 (sigmoid routing with its
  correction bias ``exp_probs_b``, top-2 within the best 2 of 4 groups, renormalised, YaRN with
  ``mscale_all_dim``): the config is built from the
  ``deepseek2.*`` keys, the stacked experts, shared experts and dense leading layers load under DeepSeek's names,
  and ``kv_b_proj`` is joined back from the ``attn_k_b`` / ``attn_v_b`` halves the converter writes (older
  files' whole ``attn_kv_b`` loads too). The tokenizer is the file's own.
* Quantised files (Q8_0; Q4_K_M, which on these narrow tensors falls back to Q5_0 / Q8_0 as llama.cpp's does;
  tensors whose rows do not split into blocks in F16, as the converter falls back): each tensor loads as the
  ``gguf`` package dequantises it, routers and norms F32.
* llama.cpp's ``deepseek-v3`` pre-tokenizer, which transformers does not know, splits text as llama.cpp does.
* Refused, naming the file and why: a gating function llmserve does not have; and the writer refuses checkpoints
  a file cannot describe (plain greedy routing over groups, which the file's group counts would limit; V3
  without ``scoring_func: sigmoid``, which the converter would write as softmax-gated). The tiny V3 is written
  from a copy made describable (``conftest.DESCRIBABLE``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest

from llmserve.entrypoints.llm import LLM
from llmserve.model_loader import gguf_config, gguf_loader
from llmserve.model_loader.gguf_config import load_gguf_config
from llmserve.sampling_params import SamplingParams
from llmserve.testing.gguf_files import write_gguf
from tests.engine_greedy import assert_matches_hf, engine_greedy
from tests.model_loader.packed_reference import assert_packed_file_matches_rounded_transformers, packed_modules
from tests.model_loader.test_gguf import _tiny_gguf

gguf = pytest.importorskip("gguf")

FAMILIES = ["deepseek_v2_lite", "deepseek_v2", "deepseek_v3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_file_runs_as_the_checkpoint_it_came_from(gguf_file, gguf_source, caplog, family):
    path = gguf_file(family, "F32")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight", "blk.1.ffn_gate_exps.weight",
            "blk.1.ffn_up_shexp.weight", "blk.0.ffn_up.weight"} <= names
    assert ("blk.1.exp_probs_b.bias" in names) == (family == "deepseek_v3")
    with caplog.at_level(logging.INFO, logger="llmserve.model_loader.gguf_loader"):
        results = engine_greedy(path)
    assert not [r for r in caplog.records if "no counterpart" in r.getMessage()]   # every tensor of the file loads
    assert_matches_hf(results, gguf_source(family), 1e-4)


@pytest.mark.parametrize("file_type,types", [("Q8_0", {"Q8_0", "F16", "F32"}),
                                             ("Q4_K_M", {"Q5_0", "Q8_0", "F16", "F32"})])
def test_quantized_file_loads_each_tensor_as_gguf_dequantises_it(gguf_file, gguf_source, file_type, types):
    """Each checkpoint tensor loads as the ``gguf`` package dequantises its tensor in the file (found by llama.cpp's
    own name map): an expert as its row of the stack, ``kv_b_proj`` per head as ``attn_k_b`` transposed then
    ``attn_v_b``. Tensors whose rows do not split into blocks (``attn_k_b``'s 16 columns, ``attn_q_b``'s 24) are
    F16, as the converter falls back; norms, routers and the correction bias F32. The file then runs."""
    from llmserve.model_loader.loader import iterate_weights

    path = gguf_file("deepseek_v3", file_type)
    file = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert {t.tensor_type.name for t in file.values()} == types
    assert file["blk.1.attn_k_b.weight"].tensor_type.name == "F16"
    config = load_gguf_config(path)
    loaded = dict(gguf_loader.iterate_gguf_weights(gguf_loader.GGUFTensors(path, config)))
    assert loaded.keys() == {name for name, _ in iterate_weights(gguf_source("deepseek_v3"))}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, config.num_hidden_layers)

    def dequantised(name: str) -> np.ndarray:
        return gguf.dequantize(file[name].data, file[name].tensor_type)

    for name, tensor in loaded.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        expert = re.match(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.(\w+)_proj\.weight$", name)
        if expert:
            expected = dequantised(f"blk.{layer}.ffn_{expert[2]}_exps.weight")[int(expert[1])]
        elif name.endswith("kv_b_proj.weight"):
            expected = np.concatenate([dequantised(f"blk.{layer}.attn_k_b.weight").transpose(0, 2, 1),
                                       dequantised(f"blk.{layer}.attn_v_b.weight")], axis=1)
        else:
            stem, suffix = name.replace("_correction_bias", "_correction.bias").rsplit(".", 1)
            expected = dequantised(f"{names.get_name(stem)}.{suffix}")
        assert np.array_equal(tensor.numpy(), expected.reshape(tensor.shape)), name
    llm = LLM(str(path), kv_cache_memory_bytes="8MiB", max_model_len=256)
    output = llm.generate([{"prompt_token_ids": [1, 5, 9, 20]}], SamplingParams(max_tokens=4, temperature=0))
    assert len(output[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("family,file_type", [("deepseek_v3", "Q4_K_M"), ("deepseek_v2", "Q8_0"),
                                              ("deepseek_v2_lite", "Q8_0")])
def test_quantized_file_runs_packed_as_transformers_with_rounded_activations(gguf_file, gguf_source, caplog,
                                                                           family, file_type):
    """The linear layers whose tensors are all in packed types (latent attention's ``q_a`` / ``kv_a`` / ``o``
    projections, dense and stacked experts, the LM head) stay packed, each input rounded to int8 per 32 columns;
    transformers running the file's weights (dequantised by the ``gguf`` package) with those layers' inputs
    rounded the same way gives the same greedy tokens and logprobs (``packed_reference``; the 7e-3 measured
    there: two tokens of one V2-Lite prompt, whose LM head input crossed a rounding boundary). ``kv_b_proj`` and
    the F16 fallbacks run in float."""
    path = gguf_file(family, file_type)
    packed = packed_modules(path)
    assert any(".self_attn.kv_a_proj_with_mqa" in n for n in packed) and any(n.endswith("mlp.experts") for n in packed)
    assert not any("kv_b_proj" in n for n in packed)
    assert_packed_file_matches_rounded_transformers(path, gguf_source(family), packed, caplog)


def test_a_file_with_the_whole_kv_b_projection_loads_as_one_split(gguf_file, tmp_path):
    """Files from converters older than the k_b / v_b split hold ``attn_kv_b`` whole: the same weights load."""
    split = gguf_file("deepseek_v3", "F32")
    tensors = {t.name: t.data for t in gguf.GGUFReader(str(split)).tensors}
    whole = {}
    for name, data in tensors.items():
        if ".attn_k_b." in name:   # [heads, rank, nope] and [heads, v, rank] -> per head nope + v rows of rank
            v_b = tensors[name.replace("attn_k_b", "attn_v_b")]
            whole[name.replace("attn_k_b", "attn_kv_b")] = (
                np.concatenate([data.transpose(0, 2, 1), v_b], axis=1).reshape(-1, data.shape[1]))
        elif ".attn_v_b." not in name:
            whole[name] = data
    old = _tiny_gguf(tmp_path / "whole-kv-b.gguf", whole, "deepseek2")
    config = load_gguf_config(split)
    loaded = dict(gguf_loader.iterate_gguf_weights(gguf_loader.GGUFTensors(split, config)))
    from_old = dict(gguf_loader.iterate_gguf_weights(gguf_loader.GGUFTensors(old, config)))
    kv_b = [n for n in loaded if n.endswith("kv_b_proj.weight")]
    assert len(kv_b) == config.num_hidden_layers
    assert all((from_old[n] == loaded[n]).all() for n in kv_b)


def test_deepseek_v3_pre_tokenizer_splits_as_llama_cpp():
    """llama.cpp's ``deepseek-v3`` splits: digits in runs of at most three, CJK runs on their own, a punctuation
    mark with the Latin word after it, other punctuation with the newlines after it (then the bytes as byte-level
    BPE spells them: ``Ġ`` a space, ``Ċ`` a newline)."""
    from llmserve.model_loader.gguf_deepseek import pre_tokenizer

    text = "Hi 1234567 日本語です.net!!\n\nok"
    pieces = [piece for piece, _ in pre_tokenizer("deepseek-v3").pre_tokenize_str(text)]
    assert pieces == ["Hi", "Ġ", "123", "456", "7", "Ġ", "æĹ¥æľ¬èªŀãģ§ãģĻ", ".net", "!!ĊĊ", "ok"]
    assert pre_tokenizer("qwen2") is None   # transformers' own


def test_a_softmax_file_with_group_limits_runs_deepseek_v2s_routing_and_says_so(gguf_file, caplog):
    """DeepSeek-V2 and V2.5 files: softmax gating and fewer groups used than there are. They run as the checkpoint
    was trained (``group_limited_greedy``: a group ranked by its best expert; the F32 test above checks the
    tokens), and the log names llama.cpp's different ranking (the best two)."""
    gguf_config._read_config.cache_clear()   # the config of a file is read once; read it again here
    with caplog.at_level(logging.WARNING, logger="llmserve.model_loader.gguf_deepseek"):
        config = load_gguf_config(gguf_file("deepseek_v2", "F32"))
    assert (config.model_type, config.topk_method, config.n_group, config.topk_group) == \
        ("deepseek_v2", "group_limited_greedy", 4, 2)
    assert "deepseek_v2-F32.gguf: softmax-gated experts in 4 groups, 2 used: running DeepSeek-V2's routing" \
        in caplog.text
    assert "ranks a group by its best two experts" in caplog.text
    assert load_gguf_config(gguf_file("deepseek_v2_lite", "F32")).topk_method == "greedy"


def test_an_unknown_gating_function_is_refused_naming_the_file(tmp_path):
    stack = {"blk.1.ffn_gate_exps.weight": [[[0.0] * 4] * 4] * 2}
    gating = _tiny_gguf(tmp_path / "gating.gguf", stack, "deepseek2", deepseek2__expert_gating_func=3)
    with pytest.raises(ValueError, match="gating.gguf: deepseek2 expert gating function 3"):
        load_gguf_config(gating)


def test_checkpoints_a_file_cannot_describe_cannot_be_written(checkpoint_dir, tmp_path):
    """The converter writes a gating function only from ``scoring_func`` (llama.cpp: softmax without one) and the
    groups from ``n_group``, which limit the choice whatever ``topk_method`` says."""
    greedy = tmp_path / "greedy-v2"
    shutil.copytree(checkpoint_dir("deepseek_v2"), greedy)
    config = json.loads((greedy / "config.json").read_text())
    (greedy / "config.json").write_text(json.dumps({**config, "topk_method": "greedy"}))
    with pytest.raises(ValueError, match="cannot describe this checkpoint's greedy over 4 groups"):
        write_gguf(greedy, tmp_path / "v2.gguf", "deepseek_v2")
    with pytest.raises(ValueError, match="by sigmoid only with scoring_func sigmoid; this deepseek_v3 checkpoint's "
                                         "scoring_func is None"):
        write_gguf(checkpoint_dir("deepseek_v3"), tmp_path / "v3.gguf", "deepseek_v3")
