"""Gemma 4 GGUF files (llama.cpp's ``gemma4``, written from the generated checkpoints the way its converter lays
them out: ``llmserve.testing.gguf_files``) load and run.

* An F32 file gives the checkpoint's own output (greedy tokens equal, logprobs within 1e-4 of transformers on the
  safetensors folder), for the dense model and the one with experts beside each MLP: the config is built from the
  ``gemma4.*`` keys (layer kinds, both head sizes, the full layers' own KV-head count with ``attention_k_eq_v``
  inferred from their missing ``attn_v``, KV-sharing layers with double-wide MLPs, per-layer inputs, each kind's
  rope, proportional rotary from ``rope_freqs``, the soft-cap, the experts), and every tensor of the file loads
  under Gemma 4's names, the experts as their stacks and the router's scales from ``ffn_gate_inp.scale`` and
  ``ffn_down_exps.scale``.
* A quantised file loads each tensor as the ``gguf`` package dequantises it.
* The tokenizer is the file's, read as transformers reads a ``gemma4`` vocabulary.
* The writer refuses a checkpoint llama.cpp would run differently: the tiny checkpoints' KV-sharing layers read a
  full then a sliding layer, where llama.cpp reads a sliding then a full one; they are written from copies in which
  one layer more shares (``conftest.DESCRIBABLE``).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from llmserve.model_loader import gguf_loader
from llmserve.model_loader.gguf_config import load_gguf_config
from llmserve.testing.gguf_files import finish_file, write_gguf
from tests.engine_greedy import assert_matches_hf, engine_greedy
from tests.model_loader.packed_reference import assert_packed_file_matches_rounded_transformers, packed_modules

gguf = pytest.importorskip("gguf")

FAMILIES = ["gemma4", "gemma4_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_file_runs_as_the_checkpoint_it_came_from(gguf_file, gguf_source, caplog, family):
    path = gguf_file(family, "F32")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"rope_freqs.weight", "per_layer_token_embd.weight", "blk.0.layer_output_scale.weight",
            "blk.0.inp_gate.weight", "blk.0.attn_v.weight"} <= names
    assert "blk.2.attn_v.weight" not in names and "blk.3.attn_k.weight" not in names   # k_eq_v; shared K/V
    assert ({"blk.0.ffn_gate_up_exps.weight", "blk.0.ffn_gate_inp.scale", "blk.0.ffn_down_exps.scale"} <= names) == \
        (family == "gemma4_moe")
    config = load_gguf_config(path)
    sliding, full = config.per_layer_config[0], config.per_layer_config[2]
    assert (config.layer_types, config.num_kv_shared_layers, sliding.head_dim, full.head_dim,
            sliding.num_key_value_heads, full.num_key_value_heads, config.attention_k_eq_v, config.use_double_wide_mlp,
            config.hidden_size_per_layer_input, config.final_logit_softcapping) == \
        (["sliding_attention", "sliding_attention", "full_attention"] * 2, 3, 16, 24, 2, 1, True, True, 8, 15.0)
    assert config.rope_parameters["full_attention"] == {"rope_type": "proportional", "rope_theta": 1000000.0,
                                                        "partial_rotary_factor": 0.25}
    with caplog.at_level(logging.INFO, logger="llmserve.model_loader.gguf_loader"):
        results = engine_greedy(path)
    assert not [r for r in caplog.records if "no counterpart" in r.getMessage()]   # every tensor of the file loads
    assert_matches_hf(results, gguf_source(family), 1e-4)


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M"])
def test_quantized_file_loads_each_tensor_as_gguf_dequantises_it(gguf_file, gguf_source, file_type):
    """Every checkpoint tensor, the expert stacks whole, loads as the ``gguf`` package dequantises the file's
    tensor; norms, scales and the router F32. The file then runs."""
    from llmserve.entrypoints.llm import LLM
    from llmserve.model_loader.loader import iterate_weights
    from llmserve.sampling_params import SamplingParams

    path = gguf_file("gemma4_moe", file_type)
    file = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    kept_f32 = ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp.scale", "blk.0.attn_q_norm.weight",
                "blk.0.layer_output_scale.weight")
    assert {file[n].tensor_type.name for n in kept_f32} == {"F32"}
    assert file["blk.0.ffn_gate_up_exps.weight"].tensor_type.name != "F32"
    config = load_gguf_config(path)
    tensors = gguf_loader.GGUFTensors(path, config)
    loaded = dict(gguf_loader.iterate_gguf_weights(tensors))
    assert loaded.keys() == {name for name, _ in iterate_weights(gguf_source("gemma4_moe"))}
    by_name = {hf: gguf_name for gguf_name, hf in tensors.names.items()}
    for name, tensor in loaded.items():
        source = file[by_name[name]]
        expected = gguf.dequantize(source.data, source.tensor_type)
        assert np.array_equal(tensor.numpy(), expected.reshape(tensor.shape)), name
    llm = LLM(str(path), kv_cache_memory_bytes="8MiB", max_model_len=256)
    output = llm.generate([{"prompt_token_ids": [1, 5, 9, 20]}], SamplingParams(max_tokens=4, temperature=0))
    assert len(output[0].outputs[0].token_ids) == 4


def test_the_tokenizer_is_the_files_read_as_a_gemma4_vocabulary(gguf_file, gguf_source):
    """The checkpoint's vocabulary, with Gemma's conventions as transformers reads a ``gemma4`` file: no space
    prefix before the first word and no BOS added (Gemma 4's chat template writes ``<bos>``)."""
    from transformers import AutoTokenizer

    tokenizer = gguf_loader.load_gguf_tokenizer(gguf_file("gemma4", "F32"))
    source = AutoTokenizer.from_pretrained(gguf_source("gemma4"))
    assert tokenizer.convert_ids_to_tokens(list(range(source.vocab_size))) == \
        source.convert_ids_to_tokens(list(range(source.vocab_size)))

    def pieces(text: str) -> list[int]:
        return [source.convert_tokens_to_ids(t.value) for t in source.backend_tokenizer.model.tokenize(text)]

    assert tokenizer("Hello world")["input_ids"] == pieces("Hello") + pieces("\u2581world")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")


def test_checkpoints_llama_cpp_would_run_differently_cannot_be_written(checkpoint_dir, tmp_path):
    """llama.cpp's KV-sharing layers read the last two layers holding a cache, a sliding then a full one."""
    with pytest.raises(ValueError, match=r"KV-sharing layers read layers 2 \(sliding\) and 3 \(full\): a GGUF file "
                                         r"cannot describe layer types"):
        write_gguf(checkpoint_dir("gemma4"), tmp_path / "gemma4.gguf", "gemma4")


def test_files_with_layouts_gemma4_does_not_have_are_refused_naming_the_file(gguf_file, tmp_path):
    """Per-layer MLP widths other than double-wide sharing layers, a ``rope_freqs`` that is not proportional
    rotary (ones, then pairs left unrotated, one per pair of the full layers' heads), partial rotary on the
    sliding layers: errors naming the file."""
    path = gguf_file("gemma4", "F32")
    reader = gguf.GGUFReader(str(path))
    for name, keys, tensor, error in (
            ("widths.gguf", {"gemma4.feed_forward_length": [128, 64, 128, 256, 256, 256]}, None,
             r"widths.gguf: gemma4 MLP widths per layer \[128, 64, 128, 256, 256, 256\]"),
            ("rope.gguf", {}, np.array([1.0, 0.5, 1.0] + [1e30] * 9, dtype=np.float32),
             "rope.gguf: gemma4 rope_freqs is not proportional rotary"),
            ("short-rope.gguf", {}, np.array([1.0] * 3 + [1e30] * 5, dtype=np.float32),
             "short-rope.gguf: gemma4 rope_freqs is not proportional rotary"),
            ("partial-sliding.gguf", {"gemma4.rope.dimension_count_swa": 8}, None,
             r"partial-sliding.gguf: gemma4 rope with scaling None or 8 of 16 sliding dimensions rotated")):
        copy = _rewritten(reader, tmp_path / name, keys,
                          None if tensor is None else lambda arrays, t=tensor: {**arrays, "rope_freqs.weight": t})
        with pytest.raises(ValueError, match=error):
            load_gguf_config(copy)


def test_a_file_whose_sharing_layers_llama_cpp_reads_elsewhere_loads_as_transformers_runs_it(gguf_file, tmp_path,
                                                                                           caplog):
    """Two sharing layers after [sliding, sliding, full, sliding]: transformers reads layer 3 for the sliding one
    and 2 for the full one, llama.cpp layers 2 and 3; the config is transformers' and the log says so."""
    reader = gguf.GGUFReader(str(gguf_file("gemma4", "F32")))
    copy = _rewritten(reader, tmp_path / "two-shared.gguf", {"gemma4.attention.shared_kv_layers": 2,
                                                             "gemma4.feed_forward_length": [128] * 4 + [256] * 2})
    with caplog.at_level(logging.WARNING, logger="llmserve.model_loader.gguf_gemma4"):
        assert load_gguf_config(copy).num_kv_shared_layers == 2
    assert "two-shared.gguf: its KV-sharing layers read the last earlier layer of their kind" in caplog.text
    assert "llama.cpp reads layers 2 (sliding) and 3 (full)" in caplog.text


def _rewritten(reader, out, keys, tensors=None):
    """A copy of an F32 file with some keys' values replaced, and its tensors as ``tensors`` makes them (name ->
    array, from the file's)."""
    writer = gguf.GGUFWriter(str(out), "gemma4")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = keys.get(name, field.contents())
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, kind, sub_type=sub)
    arrays = {t.name: np.asarray(t.data) for t in reader.tensors}
    for name, data in (arrays if tensors is None else tensors(arrays)).items():
        writer.add_tensor(name, data)
    finish_file(writer)
    return out


def test_a_file_with_fused_qkv_runs_as_the_unfused_one(gguf_file, tmp_path):
    """llama.cpp's ``--fuse-qkv`` writes ``attn_qkv`` for every layer holding q, k and v, a sharing layer whose
    checkpoint kept its (unused) K/V too: the fused layers load as their three projections, a sharing layer's
    as its query rows."""
    path = gguf_file("gemma4", "F32")
    generator = np.random.default_rng(0)

    def fused(arrays: dict) -> dict:
        arrays = dict(arrays)
        for layer in (0, 1, 3):   # two sliding layers, and the first sharing one with K/V of its own
            q = arrays.pop(f"blk.{layer}.attn_q.weight")
            k = arrays.pop(f"blk.{layer}.attn_k.weight", generator.standard_normal((32, 48), dtype=np.float32))
            v = arrays.pop(f"blk.{layer}.attn_v.weight", generator.standard_normal((32, 48), dtype=np.float32))
            arrays[f"blk.{layer}.attn_qkv.weight"] = np.concatenate([q, k, v])
        return arrays

    copy = _rewritten(gguf.GGUFReader(str(path)), tmp_path / "fused.gguf", {}, fused)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(engine_greedy(copy), engine_greedy(path)):
        assert tokens == ref_tokens and np.allclose(logprobs, ref_logprobs, atol=1e-5)


@pytest.mark.parametrize("family,file_type", [("gemma4", "Q8_0"), ("gemma4_moe", "Q4_K_M")])
def test_quantized_file_runs_packed_as_transformers_with_rounded_activations(gguf_file, gguf_source, caplog,
                                                                           family, file_type):
    """The linear layers whose tensors are all in packed types stay packed (here the 96-, 128- and 256-column
    ``o_proj`` and ``down_proj``: the 48-column ones, the experts' included, do not split into blocks and are F16,
    as the converter falls back, so they load dequantised). The engine gives what transformers gives on the file's
    weights with those layers' inputs rounded as the kernel rounds them (``packed_reference``)."""
    path = gguf_file(family, file_type)
    packed = packed_modules(path)
    assert {"model.layers.0.self_attn.o_proj", "model.layers.3.mlp.down_proj"} <= packed
    assert not any("experts" in name for name in packed)
    assert_packed_file_matches_rounded_transformers(path, gguf_source(family), packed, caplog)


@pytest.mark.parametrize("family,file_type", [("gemma4", "Q8_0"), ("gemma4_moe", "Q8_0"), ("gemma4_moe", "Q4_K_M")])
def test_wide_file_packs_every_projection_and_expert(wide_gguf_file, caplog, family, file_type):
    """Wide enough for blocks (hidden 256; two layers, sliding then full, no sharing): every projection packs, the
    sliding layer's fused q/k/v and the full layer's, whose value rows are its key rows loaded twice
    (``attention_k_eq_v``: the file has no ``attn_v`` there), and with the MoE block each expert, its gate and up
    rows split from the fused stack; the output equals transformers' with those inputs rounded
    (``packed_reference``)."""
    path = wide_gguf_file(file_type, family)
    assert "blk.1.attn_v.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    packed = packed_modules(path)
    assert {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"} <= packed
    assert ({"model.layers.0.experts", "model.layers.1.experts"} <= packed) == (family == "gemma4_moe")
    assert_packed_file_matches_rounded_transformers(path, path.parent / f"{family}-wide-checkpoint", packed, caplog)
    assert "Quantisation: gguf" in caplog.text
