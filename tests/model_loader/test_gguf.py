"""GGUF files (written from the generated checkpoints the way llama.cpp lays them out) load and run.

* An F32 GGUF of a checkpoint gives the checkpoint's own output (greedy tokens equal, logprobs within 1e-4
  of transformers on the safetensors folder), for Llama, Qwen2, Qwen3, GPT-2, BLOOM, Phi-3 and Phi-4-mini:
  names, the Llama Q/K row permutation, GPT-2's transposed Conv1D weights, BLOOM's regrouped QKV rows and
  tied embeddings are undone exactly, and what transformers' GGUF config mapping drops (Qwen3's head
  size, GPT-2's context and MLP width, Phi-3's sliding window, partial rotary and LongRoPE factors) is
  read from the file's metadata (Gemma, Command-R and Falcon: ``test_gguf_config.py``).
* Files whose weights load dequantised (F16, BF16; quantized BLOOM, whose layers do not run packed) give
  what transformers gives on the same file (it dequantises through the same ``gguf`` package): greedy tokens
  equal, logprobs within 1e-3, through the engine with chunked prefill and prefix caching. Quantized Llama /
  Qwen files run packed: ``test_gguf_packed.py``.
* The tokenizer and the chat template come from the file's metadata (byte-level BPE as llama.cpp's ``gpt2``
  model; sentencepiece-style BPE as its ``llama`` model, with scores and merges), also where transformers cannot
  read the file's config (Command-R): the same token ids as the checkpoint's own tokenizer; ``--tokenizer``
  overrides it, and a file that carries none, loaded without ``--tokenizer``, says to pass it.
* The metadata (the whole vocabulary: seconds to parse on a real model) is read once per file for the
  config and once for the tokenizer, however many parts of the engine ask; each gets its own copy, and a
  rewritten file is read again.
* A file holding a tensor type llmserve does not run is refused before loading, naming the type; a
  ``.gguf`` path that does not exist is "not found"; ``repo:QUANT`` picks the repo's one file of that
  quantisation, and an absent or ambiguous one is an error naming what the repo has.
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
from llmserve.sampling_params import SamplingParams
from tests.engine_greedy import assert_matches_hf, engine_greedy

pytest.importorskip("gguf")
pytest.importorskip("accelerate")   # transformers' GGUF loading (the oracle) needs it


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "gpt2", "bloom", "phi3", "phi4_mini"])
def test_f32_file_runs_as_the_checkpoint_it_came_from(checkpoint_dir, gguf_file, gguf_tokenizer, family):
    path = gguf_file(family, "F32")
    assert_matches_hf(engine_greedy(path, **gguf_tokenizer(family)), checkpoint_dir(family), 1e-4)


@pytest.mark.parametrize("family,file_type", [("qwen2", "F16"), ("llama", "BF16"), ("bloom", "Q8_0"),
                                              ("bloom", "Q4_0")])
def test_quantized_file_matches_transformers_on_the_same_file(gguf_file, gguf_tokenizer, family, file_type):
    path = gguf_file(family, file_type)
    assert_matches_hf(engine_greedy(path, **gguf_tokenizer(family)), path, 1e-3)


# Command-R: a config transformers cannot read; Llama, Llama 3: sentencepiece-style, llama.cpp's "llama" tokenizer
@pytest.mark.parametrize("family", ["qwen2", "cohere", "llama", "llama3"])
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
