"""A GGUF file's config where llama.cpp writes less than transformers needs: Gemma 2 and 3, Command-R,
Cohere2 and Falcon (files written from the generated checkpoints the way llama.cpp's converter lays them
out; ``llmserve.testing.gguf_files``).

* An F32 file gives the checkpoint's own output (greedy tokens equal, logprobs within 1e-4 of transformers
  on the safetensors folder): what transformers' GGUF config mapping drops is read from the metadata
  (Gemma 2's soft-caps, Gemma 3's linear rope scaling of its global layers), and Command-R's and Cohere2's
  configs, which transformers' GGUF support does not read at all, are built from it (logit scale,
  LayerNorm epsilon, q/k norms where the file holds them). Gemma's norms stored as ``1 + w`` and
  Falcon's q|k|v rows are undone.
* What llama.cpp hard-codes or infers instead of writing is restored by its rules: Gemma's attention scale
  from the model's size, Gemma 3's 5 local : 1 global layers and its local layers' rope base (10k),
  Cohere2's 3 sliding : 1 full layers (rope on the sliding ones only), Cohere's tied embeddings, and
  Falcon's layout from the tensors the file holds (``attn_norm_2``: the new decoder architecture with two
  norms, as Falcon-40B; several KV heads and one norm: Falcon-11B; one KV head and one norm, untied:
  Falcon-7B).
* A checkpoint these rules do not describe cannot be written: a Gemma whose attention scale is not the one
  llama.cpp infers, a Gemma 3 with another local rope base, Falcon-RW (ALiBi, sequential, multi-head).

The writer follows llama.cpp's converter (``convert_hf_to_gguf.py``) and loader (``llama-model.cpp``),
checked against the converter's source for the keys each family writes: Gemma 2 writes both soft-caps and
the window but no ``rope.freq_base`` (both sides default to 10000); Gemma 3 writes
``final_logit_softcapping`` only when the checkpoint has one (llmserve reads the key when present) and the
global layers' rope base; Cohere2 writes ``rope.dimension_count`` as ``rotary_pct`` x head size (llmserve
refuses anything but whole heads). One deliberate difference: the Falcon converter writes 4 x hidden as the
MLP width (every released Falcon's), the writer the checkpoint's own (the tiny Falcons' MLP is narrower), so
that the file is one llama.cpp would load.
"""

from __future__ import annotations

import json
import shutil

import pytest

from llmserve.model_loader.gguf_config import gemma_query_pre_attn_scalar
from llmserve.testing.gguf_files import write_gguf
from tests.engine_greedy import assert_matches_hf, engine_greedy

pytest.importorskip("gguf")


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "cohere", "cohere2", "falcon", "falcon_mqa"])
def test_f32_file_runs_as_the_checkpoint_it_came_from(gguf_file, gguf_source, gguf_tokenizer, family):
    path = gguf_file(family, "F32")
    assert_matches_hf(engine_greedy(path, **gguf_tokenizer(family)), gguf_source(family), 1e-4)


def test_gemma_attention_scale_is_inferred_as_llama_cpp_does(checkpoint_dir, tmp_path):
    """GGUF has no key for ``query_pre_attn_scalar``: llama.cpp uses hidden / heads for the 27B models (known
    by their layer count) and the head size otherwise, so a checkpoint that differs cannot be written."""
    released = {("gemma2", 26, 2304, 8, 256): 256, ("gemma2", 42, 3584, 16, 256): 256,
                ("gemma2", 46, 4608, 32, 128): 144, ("gemma3", 34, 2560, 8, 256): 256,
                ("gemma3", 62, 5376, 32, 128): 168}
    assert {shape: gemma_query_pre_attn_scalar(*shape) for shape in released} == released
    with pytest.raises(ValueError, match="query_pre_attn_scalar 8 is not the 16 llama.cpp infers"):
        write_gguf(checkpoint_dir("gemma2"), tmp_path / "undescribable.gguf", "gemma2")


def test_gemma3_local_rope_base_is_llama_cpps(gguf_source, tmp_path):
    """llama.cpp rotates Gemma 3's local layers with base 10k whatever the checkpoint says."""
    copy = shutil.copytree(gguf_source("gemma3"), tmp_path / "gemma3")
    config = json.loads((copy / "config.json").read_text())
    config["rope_local_base_freq"] = 20000.0
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="local rope base 20000.0 is not the 10000"):
        write_gguf(copy, tmp_path / "undescribable.gguf", "gemma3")


def test_falcon_rw_layout_cannot_be_written(checkpoint_dir, tmp_path):
    """llama.cpp's falcon has no key for ALiBi or a sequential block, and its converter splits QKV as one KV
    head outside the new decoder architecture: Falcon-RW cannot be described."""
    with pytest.raises(ValueError, match="a GGUF file cannot describe this Falcon"):
        write_gguf(checkpoint_dir("falcon_rw"), tmp_path / "undescribable.gguf", "falcon")


def test_falcon_with_kv_groups_and_one_norm(checkpoint_dir, tmp_path):
    """Falcon-11B's layout (the new decoder architecture with one norm, ``num_ln_in_parallel_attn`` 1): no
    ``attn_norm_2`` in the file, but several KV heads, so the QKV rows are still grouped per KV head."""
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(checkpoint_dir("falcon"), tmp_path / "falcon_one_norm")
    tensors = load_file(copy / "model.safetensors")
    for name in [n for n in tensors if ".ln_attn." in n or ".ln_mlp." in n]:
        tensor = tensors.pop(name)
        if ".ln_mlp." in name:
            tensors[name.replace(".ln_mlp.", ".input_layernorm.")] = tensor
    save_file(tensors, copy / "model.safetensors")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_ln_in_parallel_attn": 1}))
    path = write_gguf(copy, tmp_path / "falcon_one_norm.gguf", "falcon")
    assert_matches_hf(engine_greedy(path), copy, 1e-4)
