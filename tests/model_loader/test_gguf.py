"""GGUF files (written from the generated checkpoints the way llama.cpp lays them out) load and run.

* An F32 GGUF of a checkpoint gives the checkpoint's own output (greedy tokens equal, logprobs within 1e-4
  of transformers on the safetensors folder), for Llama, Qwen2, Qwen3, GPT-2, BLOOM, Phi-3, Phi-4-mini,
  Gemma 2 and 3, Command-R, Cohere2, Falcon (new decoder architecture: grouped KV heads, two norms) and
  Falcon-7B's layout (multi-query, one norm, untied): names, the Llama Q/K row permutation, GPT-2's
  transposed Conv1D weights, BLOOM's and Falcon's regrouped QKV rows, Gemma's norms stored as ``1 + w``
  and tied embeddings are undone exactly, and what transformers' GGUF config mapping drops (Qwen3's head
  size, GPT-2's context and MLP width, Phi-3's sliding window, partial rotary and LongRoPE factors, Gemma
  2's soft-caps, Gemma 3's linear rope scaling of its global layers) is read from the file's metadata.
  Command-R's and Cohere2's configs, which transformers' GGUF support does not read at all, are built
  from it (logit scale, LayerNorm epsilon, q/k norms where the file holds them).
* What llama.cpp hard-codes or infers instead of writing is restored by its rules: Gemma's attention scale
  from the model's size, Gemma 3's 5 local : 1 global layers and its local layers' rope base (10k),
  Cohere2's 3 sliding : 1 full layers (rope on the sliding ones only), tied Cohere embeddings, Falcon's
  layout from the tensors the file holds (``attn_norm_2``, biases, ``output``); a checkpoint these rules
  do not describe (Falcon-RW: ALiBi, sequential) cannot be written.
* Quantized files (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16) give what transformers gives on the same file
  (it dequantises through the same ``gguf`` package): greedy tokens equal, logprobs within 1e-3, through
  the engine with chunked prefill and prefix caching.
* The tokenizer and the chat template come from the file's metadata (byte-level BPE): the same token ids
  as the checkpoint's own tokenizer; ``--tokenizer`` overrides it (the sentencepiece families' files carry
  none).
* A file holding a tensor type llmserve does not run is refused before loading, naming the type; a
  ``.gguf`` path that does not exist is "not found"; ``repo:QUANT`` picks the repo's one file of that
  quantisation, and an absent or ambiguous one is an error naming what the repo has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmserve.entrypoints.llm import LLM
from llmserve.model_loader import gguf_loader
from llmserve.model_loader.gguf_config import gemma_query_pre_attn_scalar
from llmserve.model_loader.loader import ModelNotFoundError, resolve_model_path
from llmserve.sampling_params import SamplingParams
from llmserve.testing.checkpoints import FAMILIES
from llmserve.testing.tokenizer_files import BYTELEVEL
from llmserve.testing.gguf_files import write_gguf
from tests.engine_greedy import assert_matches_hf, engine_greedy

pytest.importorskip("gguf")
pytest.importorskip("accelerate")   # transformers' GGUF loading (the oracle) needs it


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


# What llama.cpp infers rather than writes, set in a copy of the checkpoint so that a file can describe it:
# below 27B, Gemma's attention scale is its head size (the tiny checkpoints use hidden / heads, as the 27B).
DESCRIBABLE = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3": {"query_pre_attn_scalar": 16}}


def _source(checkpoint_dir, gguf_dir: Path, family: str) -> Path:
    """The checkpoint a GGUF file of ``family`` is written from (and compared with)."""
    if family not in DESCRIBABLE:
        return checkpoint_dir(family)
    copy = gguf_dir / f"{family}-checkpoint"
    if not copy.exists():
        shutil.copytree(checkpoint_dir(family), copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, **DESCRIBABLE[family]}))
    return copy


def _gguf(checkpoint_dir, gguf_dir: Path, family: str, file_type: str) -> Path:
    out = gguf_dir / f"{family}-{file_type}.gguf"
    return out if out.exists() else write_gguf(_source(checkpoint_dir, gguf_dir, family), out, family, file_type)


def _tokenizer(checkpoint_dir, family: str) -> dict[str, str]:
    """The sentencepiece families' files carry no tokenizer: theirs comes from the checkpoint folder."""
    return {} if FAMILIES[family].tokenizer_kind == BYTELEVEL else {"tokenizer": str(checkpoint_dir(family))}


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "gpt2", "bloom", "phi3", "phi4_mini", "gemma2",
                                    "gemma3", "cohere", "cohere2", "falcon", "falcon_mqa"])
def test_f32_file_runs_as_the_checkpoint_it_came_from(checkpoint_dir, gguf_dir, family):
    path = _gguf(checkpoint_dir, gguf_dir, family, "F32")
    assert_matches_hf(engine_greedy(path, **_tokenizer(checkpoint_dir, family)),
                      _source(checkpoint_dir, gguf_dir, family), 1e-4)


def test_gemma_attention_scale_is_inferred_as_llama_cpp_does(checkpoint_dir, gguf_dir):
    """GGUF has no key for ``query_pre_attn_scalar``: llama.cpp uses hidden / heads for the 27B models (known
    by their layer count) and the head size otherwise, so a checkpoint that differs cannot be written."""
    released = {("gemma2", 26, 2304, 8, 256): 256, ("gemma2", 42, 3584, 16, 256): 256,
                ("gemma2", 46, 4608, 32, 128): 144, ("gemma3", 34, 2560, 8, 256): 256,
                ("gemma3", 62, 5376, 32, 128): 168}
    assert {shape: gemma_query_pre_attn_scalar(*shape) for shape in released} == released
    with pytest.raises(ValueError, match="query_pre_attn_scalar 8 is not the 16 llama.cpp infers"):
        write_gguf(checkpoint_dir("gemma2"), gguf_dir / "undescribable.gguf", "gemma2")


def test_falcon_rw_layout_cannot_be_written(checkpoint_dir, gguf_dir):
    """llama.cpp's falcon has no key for ALiBi or a sequential block, and its converter splits QKV as one KV
    head outside the new decoder architecture: Falcon-RW cannot be described."""
    with pytest.raises(ValueError, match="a GGUF file cannot describe this Falcon"):
        write_gguf(checkpoint_dir("falcon_rw"), gguf_dir / "undescribable.gguf", "falcon")


def test_gemma3_local_rope_base_is_llama_cpps(checkpoint_dir, gguf_dir, tmp_path):
    """llama.cpp rotates Gemma 3's local layers with base 10k whatever the checkpoint says."""
    copy = shutil.copytree(_source(checkpoint_dir, gguf_dir, "gemma3"), tmp_path / "gemma3")
    config = json.loads((copy / "config.json").read_text())
    config["rope_local_base_freq"] = 20000.0
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="local rope base 20000.0 is not the 10000"):
        write_gguf(copy, tmp_path / "undescribable.gguf", "gemma3")


@pytest.mark.parametrize("family,file_type", [("qwen2", "Q8_0"), ("qwen2", "Q4_0"), ("qwen2", "Q5_1"),
                                              ("llama", "Q4_1"), ("llama", "Q5_0"), ("qwen2", "F16"),
                                              ("llama", "BF16"), ("bloom", "Q8_0")])
def test_quantized_file_matches_transformers_on_the_same_file(checkpoint_dir, gguf_dir, family, file_type):
    path = _gguf(checkpoint_dir, gguf_dir, family, file_type)
    assert_matches_hf(engine_greedy(path, **_tokenizer(checkpoint_dir, family)), path, 1e-3)


@pytest.mark.parametrize("family", ["qwen2", "cohere"])   # Command-R: a config transformers cannot read
def test_tokenizer_and_chat_template_come_from_the_metadata(checkpoint_dir, gguf_dir, family):
    from transformers import AutoTokenizer

    path = _gguf(checkpoint_dir, gguf_dir, family, "Q8_0")
    llm = LLM(str(path), kv_cache_memory_bytes="8MiB", max_model_len=256)
    ours, original = llm.get_tokenizer(), AutoTokenizer.from_pretrained(checkpoint_dir(family))
    text = "Où est le café ? 日本 🚀 <|im_start|>user\nHi<|im_end|>"
    assert ours.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "Hi there"}]
    assert llm.chat(messages, SamplingParams(max_tokens=1))[0].prompt_token_ids == original.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True)["input_ids"]


def test_a_type_llmserve_does_not_run_is_named(checkpoint_dir, gguf_dir):
    path = _gguf(checkpoint_dir, gguf_dir, "qwen2", "MXFP4")
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
