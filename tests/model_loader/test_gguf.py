"""GGUF files (written from the generated checkpoints the way llama.cpp lays them out) load and run.

* An F32 GGUF of a checkpoint gives the checkpoint's own output (greedy tokens equal, logprobs within 1e-4
  of transformers on the safetensors folder), for Llama, Qwen2, Qwen3, GPT-2, BLOOM, Phi-3 and Phi-4-mini:
  names, the Llama Q/K row permutation, GPT-2's transposed Conv1D weights, BLOOM's regrouped QKV rows and
  tied embeddings are undone exactly, and what transformers' GGUF config mapping drops (Qwen3's head
  size, GPT-2's context and MLP width, Phi-3's sliding window, partial rotary and LongRoPE factors) is
  read from the file's metadata (Gemma, Command-R and Falcon: ``test_gguf_config.py``).
* Files whose weights load dequantised (F16, BF16; quantized BLOOM with packing off, as a file of an
  architecture that does not run packed loads) give what transformers gives on the same file (it dequantises
  through the same ``gguf`` package): greedy tokens equal, logprobs within 1e-3, through the engine with chunked
  prefill and prefix caching. Quantized files of the packed architectures run packed: ``test_gguf_packed.py``,
  ``test_gguf_packed_families.py``, ``test_gguf_packed_gpt2_bloom_falcon.py``.
* The tokenizer and the chat template come from the file's metadata (byte-level BPE as llama.cpp's ``gpt2``
  model; sentencepiece-style BPE as its ``llama`` model, with scores and merges), also where transformers cannot
  read the file's config (Command-R): the same token ids as the checkpoint's own tokenizer; ``--tokenizer``
  overrides it, and a file that carries none, loaded without ``--tokenizer``, says to pass it.
* The metadata (the whole vocabulary: seconds to parse on a real model) is read once per file for the
  config and once for the tokenizer, however many parts of the engine ask; each gets its own copy, and a
  rewritten file is read again.
* A file holding a tensor type llmserve does not run is refused before loading, naming the type; a
  ``.gguf`` path that does not exist is "not found"; ``repo:QUANT`` picks the repo's one file of that
  quantisation (from the cache when offline or when the Hub cannot be reached), and an absent or ambiguous
  one is an error naming what the repo has; a truncated file, one part of a split file and a mixture-of-experts
  file of an architecture whose experts are not mapped (GPT-OSS) are refused naming the file and the reason.
* Mixture-of-experts files (Mixtral, which llama.cpp writes as a ``llama`` with experts; Qwen2-MoE; Qwen3-MoE):
  the experts stacked per layer and projection load as the checkpoint's experts, and an F32 file runs as the
  checkpoint it came from (DeepSeek-V2/V3: ``test_gguf_deepseek.py``; Gemma 4: ``test_gguf_gemma4.py``).
"""

from __future__ import annotations

from pathlib import Path

import os
import shutil

import pytest

from llmserve.entrypoints.llm import LLM
from llmserve.model_loader import gguf_loader
from llmserve.model_loader.gguf_config import load_gguf_config
from llmserve.model_loader.loader import ModelNotFoundError, resolve_model_path
from llmserve.quantization import gguf as gguf_quantization
from llmserve.sampling_params import SamplingParams
from tests.engine_greedy import assert_matches_hf, engine_greedy

pytest.importorskip("gguf")
pytest.importorskip("accelerate")   # transformers' GGUF loading (the oracle) needs it


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "gpt2", "bloom", "phi3", "phi4_mini"])
def test_f32_file_runs_as_the_checkpoint_it_came_from(checkpoint_dir, gguf_file, gguf_tokenizer, family):
    path = gguf_file(family, "F32")
    assert_matches_hf(engine_greedy(path, **gguf_tokenizer(family)), checkpoint_dir(family), 1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_mixture_of_experts_file_runs_as_the_checkpoint_it_came_from(gguf_file, gguf_source, gguf_tokenizer, family):
    """Experts stacked per layer and projection (Mixtral written as a llama with experts): unstacked into the
    checkpoint's experts, with the config's experts, their width, the shared expert and the renormalisation."""
    path = gguf_file(family, "F32")
    assert_matches_hf(engine_greedy(path, **gguf_tokenizer(family)), gguf_source(family), 1e-4)


@pytest.mark.parametrize("family,file_type", [("qwen2", "F16"), ("llama", "BF16"), ("bloom", "Q8_0"),
                                              ("bloom", "Q4_0")])
def test_quantized_file_matches_transformers_on_the_same_file(gguf_file, gguf_tokenizer, monkeypatch, family,
                                                              file_type):
    monkeypatch.setattr(gguf_quantization, "PACKED_ARCHITECTURES", ())   # BLOOM's layers dequantised
    path = gguf_file(family, file_type)
    assert_matches_hf(engine_greedy(path, **gguf_tokenizer(family)), path, 1e-3)


# Command-R, DeepSeek-V3: a config transformers cannot read; Llama, Llama 3: sentencepiece-style, llama.cpp's "llama"
# tokenizer
@pytest.mark.parametrize("family", ["qwen2", "cohere", "deepseek_v3", "llama", "llama3"])
def test_tokenizer_and_chat_template_come_from_the_metadata(checkpoint_dir, gguf_file, family):
    from transformers import AutoTokenizer

    path = gguf_file(family, "Q8_0")
    llm = LLM(str(path), kv_cache_memory_bytes="8MiB", max_model_len=256)
    ours, original = llm.get_tokenizer(), AutoTokenizer.from_pretrained(checkpoint_dir(family))
    text = "Où est le café ? 日本 🚀 <|im_start|>user\nHi<|im_end|>"
    assert ours.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "Hi there"}]
    assert llm.chat(messages, SamplingParams(max_tokens=1))[0].prompt_token_ids == original.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True)["input_ids"]


def test_a_file_without_a_tokenizer_asks_for_one(checkpoint_dir, tmp_path):
    """A file that carries no tokenizer: without --tokenizer the engine says to pass one; with it the file runs."""
    gguf = pytest.importorskip("gguf")
    from llmserve.testing.gguf_files import write_gguf

    path = write_gguf(checkpoint_dir("llama"), tmp_path / "no-tokenizer.gguf", "llama", "Q8_0", with_tokenizer=False)
    assert "tokenizer.ggml.model" not in gguf.GGUFReader(str(path)).fields
    with pytest.raises(ValueError, match="carries no tokenizer .* pass --tokenizer"):
        LLM(str(path), kv_cache_memory_bytes="8MiB", max_model_len=256)
    llm = LLM(str(path), tokenizer=str(checkpoint_dir("llama")), kv_cache_memory_bytes="8MiB", max_model_len=256)
    assert llm.generate("Hello", SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids


def test_config_and_tokenizer_are_read_once_per_file_and_copied_to_each_caller(gguf_file, tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    shutil.copy(gguf_file("qwen2", "Q8_0"), path)
    parses = []
    parse = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **k: parses.append(a) or parse(self, *a, **k))

    first = load_gguf_config(path)
    tokenizer = gguf_loader.load_gguf_tokenizer(path)
    read = len(parses)
    assert read > 0
    second, other = load_gguf_config(path), gguf_loader.load_gguf_tokenizer(path)
    assert len(parses) == read   # from the copies kept
    assert second is not first and second.to_dict() == first.to_dict()
    first.num_hidden_layers += 1
    assert load_gguf_config(path).num_hidden_layers == second.num_hidden_layers
    assert other is not tokenizer and other.backend_tokenizer is not tokenizer.backend_tokenizer   # one per thread
    assert other.encode("Où est le café ? 🚀") == tokenizer.encode("Où est le café ? 🚀")

    os.utime(path, ns=(1, 1))   # the file rewritten: read again
    load_gguf_config(path)
    assert len(parses) > read


def test_a_type_llmserve_does_not_run_is_named(gguf_file):
    path = gguf_file("qwen2", "MXFP4")
    with pytest.raises(ValueError, match="MXFP4"):
        LLM(str(path), kv_cache_memory_bytes="8MiB", max_model_len=256)


def test_paths_and_hub_references(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    assert gguf_loader.hub_gguf_reference("org/model-GGUF:Q4_K_M") == ("org/model-GGUF", "Q4_K_M")
    assert gguf_loader.hub_gguf_reference("org/model") is None

    files = ["model-Q4_K_M.gguf", "model-q8_0.gguf", "model-Q4_K_S.gguf", "README.md", "x-Q6_K-00001-of-00002.gguf",
             "x-Q6_K-00002-of-00002.gguf"]
    fetched = []
    monkeypatch.setattr("huggingface_hub.list_repo_files", lambda repo, revision=None: files)
    monkeypatch.setattr("huggingface_hub.hf_hub_download",
                        lambda repo, name, revision=None, cache_dir=None: fetched.append(name) or f"/cache/{name}")
    assert resolve_model_path("org/model:Q8_0") == Path("/cache/model-q8_0.gguf")
    assert resolve_model_path("org/model:q4_k_m") == Path("/cache/model-Q4_K_M.gguf")
    with pytest.raises(ModelNotFoundError, match="no Q3_K_M GGUF file; it has: model-Q4_K_M.gguf"):
        resolve_model_path("org/model:Q3_K_M")
    with pytest.raises(ModelNotFoundError, match="split or ambiguous"):
        resolve_model_path("org/model:Q6_K")


def _tiny_gguf(path: Path, tensors: dict[str, object], arch: str = "llama", **keys: int) -> Path:
    """A GGUF file of ``arch`` holding just ``tensors`` (name -> float32 array) and integer metadata ``keys``."""
    import gguf
    import numpy as np

    from llmserve.testing.gguf_files import finish_file

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        writer.add_uint32(key.replace("__", "."), value)
    for name, data in tensors.items():
        writer.add_tensor(name, np.asarray(data, dtype=np.float32))
    finish_file(writer)
    return path


def test_files_it_cannot_load_are_refused_naming_them(gguf_file, tmp_path):
    """A truncated file, one part of a split file and a mixture-of-experts file whose experts
    llmserve does not map (GPT-OSS's): an error that says which and why, before any weight is read (not a NumPy
    error from inside the reader, or a list of missing tensors)."""
    whole = gguf_file("qwen2", "F32").read_bytes()
    for name, size in (("tensors-cut.gguf", len(whole) // 2), ("metadata-cut.gguf", 2000)):
        (tmp_path / name).write_bytes(whole[:size])
        with pytest.raises(ValueError, match=rf"{name}: not a readable GGUF file \(truncated or corrupt"):
            load_gguf_config(tmp_path / name)
    split = _tiny_gguf(tmp_path / "model-00001-of-00002.gguf", {"token_embd.weight": [[0.0] * 4] * 8},
                       split__count=2, split__no=0)
    with pytest.raises(ValueError, match="model-00001-of-00002.gguf is one part of a GGUF file split into 2"):
        LLM(str(split), kv_cache_memory_bytes="8MiB", max_model_len=256)
    moe = _tiny_gguf(tmp_path / "moe.gguf", {"blk.1.ffn_gate_exps.weight": [[[0.0] * 4] * 4] * 2}, "gpt-oss")
    with pytest.raises(ValueError, match=r"moe.gguf is a mixture-of-experts gpt-oss model \(.*blk.1.ffn_gate_exps"):
        LLM(str(moe), kv_cache_memory_bytes="8MiB", max_model_len=256)


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_a_hub_reference_resolves_from_the_cache_without_the_hub(gguf_file, tmp_path, monkeypatch, hub):
    """``org/repo:QUANT`` with ``HF_HUB_OFFLINE=1`` (a server started from a cache an init container filled), or
    with the Hub out of reach: the file of that quantisation in the cached snapshot."""
    import huggingface_hub
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(gguf_file("qwen2", "Q8_0"), snapshot / "tiny-Q8_0.gguf")
    shutil.copy(gguf_file("qwen2", "F32"), snapshot / "tiny-F32.gguf")
    if hub == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        def unreachable(repo: str, revision: str | None = None) -> list[str]:
            raise ConnectionError("the Hub cannot be reached")
        download = huggingface_hub.hf_hub_download
        monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download",   # as it falls back to the cache
                            lambda *args, **kwargs: download(*args, **kwargs, local_files_only=True))
    assert resolve_model_path("org/tiny-GGUF:Q8_0", None, str(tmp_path)) == snapshot / "tiny-Q8_0.gguf"
    with pytest.raises(ModelNotFoundError, match="no Q4_K_M GGUF file; it has: tiny-F32.gguf, tiny-Q8_0.gguf"):
        resolve_model_path("org/tiny-GGUF:Q4_K_M", None, str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="org/other-GGUF is not in the Hugging Face cache"):
        resolve_model_path("org/other-GGUF:Q8_0", None, str(tmp_path))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_quantized_experts_load_as_their_blocks_dequantise(gguf_file, gguf_source, family):
    """Each expert of a quantised stack is its own rows of blocks, dequantised (as the file's type gives them)
    where it does not run packed; the router stays F32 as llama.cpp's quantize leaves it; the file runs (packed:
    ``test_gguf_packed.py``). (transformers cannot load these files: its GGUF mapping drops Mixtral's experts and
    the Qwen experts' width.)"""
    import gguf
    import torch

    from llmserve.model_loader.loader import iterate_weights
    from llmserve.testing.gguf_kquants import quantize_tensor

    path = gguf_file(family, "Q8_0")
    loaded = dict(gguf_loader.iterate_gguf_weights(gguf_loader.GGUFTensors(path, load_gguf_config(path))))
    source = dict(iterate_weights(gguf_source(family)))
    experts = [name for name in source if ".experts." in name]
    assert experts and all(name in loaded for name in experts)
    for name in experts:
        blocks = quantize_tensor(source[name].float().numpy(), "Q8_0")
        expected = torch.from_numpy(gguf.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0))
        assert torch.equal(loaded[name], expected), name
    for name in [n for n in source if n.endswith(".gate.weight")]:
        assert torch.equal(loaded[name], source[name].float()), name
    llm = LLM(str(path), kv_cache_memory_bytes="8MiB", max_model_len=256, tokenizer=str(gguf_source(family)))
    output = llm.generate([{"prompt_token_ids": [1, 5, 9, 20]}], SamplingParams(max_tokens=4, temperature=0))
    assert len(output[0].outputs[0].token_ids) == 4
