"""Write GGUF files from the generated checkpoints, the way llama.cpp's converter and quantizer lay them out.

No GGUF file can be downloaded here, so the GGUF loader is tested on files made from the project's own
checkpoints: llama.cpp's tensor names (through the ``gguf`` package's name map), its Q/K row permutation
for the ``llama`` architecture, its metadata keys for the config and the tokenizer (``gpt2`` byte-level
BPE with merges, as for Qwen2; the sentencepiece-style families' files carry no tokenizer), and its rule that 1-D tensors (norms, biases) stay F32 while 2-D weights
take the file's type. Quantized types are those the ``gguf`` package can write (Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, BF16) plus F16 / F32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llmserve.model_loader.loader import iterate_weights

# our family -> llama.cpp architecture name
GGUF_ARCHITECTURES = {"llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2"}


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's rows from rotate-half to interleaved pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(checkpoint: Path, out: Path, family: str, file_type: str = "F32") -> Path:
    """``checkpoint`` (a generated checkpoint folder of ``family``) as one GGUF file at ``out``, its 2-D
    weights in ``file_type``."""
    import gguf

    arch_name = GGUF_ARCHITECTURES[family]
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    config = json.loads((checkpoint / "config.json").read_text())
    qtype = gguf.GGMLQuantizationType[file_type]
    writer = gguf.GGUFWriter(str(out), arch_name)
    writer.add_name(checkpoint.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(qtype.value if file_type not in ("F32", "F16") else {"F32": 0, "F16": 1}[file_type])
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    if tokenizer["model"]["type"] == "BPE" and tokenizer["pre_tokenizer"] is not None:
        _add_tokenizer(writer, tokenizer, config, checkpoint)
    else:   # sentencepiece-style: no tokenizer in the file (serve it with --tokenizer <checkpoint folder>)
        writer.add_vocab_size(config["vocab_size"])
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name, tensor in iterate_weights(checkpoint):
        stem, suffix = name.rsplit(".", 1)
        data = tensor.to(torch.float32).numpy()
        if arch_name == "llama" and stem.endswith(("q_proj", "k_proj")):
            data = _permute(data, heads if stem.endswith("q_proj") else kv_heads)
        gguf_name = f"{names.get_name(stem)}.{suffix}"
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer, tokenizer: dict, config: dict, checkpoint: Path) -> None:  # noqa: ANN001 - GGUFWriter
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model: tokens in id order, their types
    (control for added special tokens), the merges, the special ids and the chat template."""
    vocab = dict(tokenizer["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab.update(special)
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    eos = config["eos_token_id"]
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if config.get("bos_token_id") is not None:
        writer.add_bos_token_id(config["bos_token_id"])
    writer.add_add_bos_token(False)
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])
