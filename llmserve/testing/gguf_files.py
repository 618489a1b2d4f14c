"""Write GGUF files from the generated checkpoints, the way llama.cpp's converter and quantizer lay them out.

No GGUF file can be downloaded here, so the GGUF loader is tested on files made from the project's own
checkpoints: llama.cpp's tensor names (through the ``gguf`` package's name map), its Q/K row permutation
for the ``llama`` architecture, Gemma's norms stored as their scale ``1 + w``, its metadata keys for the
config and the tokenizer (``gpt2`` byte-level BPE with merges, as for Qwen2; ``llama`` for the
sentencepiece-style BPE over ``"▁"`` words, with scores and merges, as its converter writes a Hugging Face
Llama tokenizer), and its rule that 1-D tensors and norms (biases, Cohere's 2-D q/k
norms) stay F32 while the other weights take the file's type. Quantized types are those the ``gguf``
package can write (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16), F16 / F32, and the k-quants Q2_K to Q6_K
(:mod:`~llmserve.testing.gguf_kquants`), alone or as llama.cpp's ``Q4_K_M`` / ``Q5_K_M`` mixes. A checkpoint
the file cannot describe (a setting llama.cpp hard-codes or infers rather than writes, and would infer
differently) is refused rather than written wrong.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmserve.model_loader.loader import iterate_weights
from llmserve.testing.gguf_deepseek_files import add_deepseek_keys, latent_up_halves
from llmserve.testing.gguf_gemma4_files import add_gemma4_keys, gemma4_tensor_name, rope_freqs
from llmserve.testing.gguf_kquants import MIXES, mix_tensor_type, quantize_tensor


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp's converter writes one of our families."""

    name: str                  # llama.cpp's architecture
    layer_norm: bool = False   # LayerNorm epsilon (else RMSNorm's)
    rope_base: bool = True     # writes rope.freq_base
    norm_shift: float = 0.0    # added to norm weights (Gemma's ``1 + w`` RMSNorm stored as its scale)


GGUF_ARCHITECTURES = {
    "llama": GGUFArchitecture("llama"), "llama3": GGUFArchitecture("llama"), "mistral": GGUFArchitecture("llama"),
    "qwen2": GGUFArchitecture("qwen2"), "qwen3": GGUFArchitecture("qwen3"), "phi3": GGUFArchitecture("phi3"),
    "phi4_mini": GGUFArchitecture("phi3"), "gpt2": GGUFArchitecture("gpt2", layer_norm=True, rope_base=False),
    "bloom": GGUFArchitecture("bloom", layer_norm=True, rope_base=False),
    "gemma2": GGUFArchitecture("gemma2", rope_base=False, norm_shift=1.0),
    "gemma3": GGUFArchitecture("gemma3", norm_shift=1.0),
    "cohere": GGUFArchitecture("command-r", layer_norm=True), "cohere2": GGUFArchitecture("cohere2", layer_norm=True),
    "falcon": GGUFArchitecture("falcon", layer_norm=True, rope_base=False),
    "falcon_mqa": GGUFArchitecture("falcon", layer_norm=True, rope_base=False),
    "mixtral": GGUFArchitecture("llama"), "qwen2_moe": GGUFArchitecture("qwen2moe"),
    "qwen3_moe": GGUFArchitecture("qwen3moe"), "deepseek_v2_lite": GGUFArchitecture("deepseek2"),
    "deepseek_v2": GGUFArchitecture("deepseek2"), "deepseek_v3": GGUFArchitecture("deepseek2"),
    "gemma4": GGUFArchitecture("gemma4"), "gemma4_moe": GGUFArchitecture("gemma4"),
}
# llama.cpp's Mixtral (a llama with experts) and Qwen3-MoE renormalise the top-k routing weights, Qwen2-MoE does not
_RENORMALISES = {"llama": True, "qwen2moe": False, "qwen3moe": True}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_KIND = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_GPT2_CONV1D = (".attn.c_attn", ".attn.c_proj", ".mlp.c_fc", ".mlp.c_proj")   # stored [in, out] by transformers


def _find(config: dict, *names: str) -> Any:
    """The first of ``names`` the config has (families name the same hyperparameter differently)."""
    return next((config[name] for name in names if config.get(name) is not None), None)


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's rows from rotate-half to interleaved pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _converted(arch: GGUFArchitecture, stem: str, data: np.ndarray, config: dict) -> np.ndarray:
    """A tensor as the converter writes it: Gemma's norms as their scale ``1 + w``, Llama's Q/K rows
    interleaved, GPT-2's Conv1D weights transposed, BLOOM's per-head and Falcon's per-KV-group [q k v] rows
    regrouped as all q, all k, all v."""
    if stem.endswith("norm") and arch.norm_shift:
        return data + np.float32(arch.norm_shift)
    if arch.name == "llama" and stem.endswith(("q_proj", "k_proj")):
        heads = config["num_attention_heads"] if stem.endswith("q_proj") else config["num_key_value_heads"]
        return _permute(data, heads)
    if arch.name == "gpt2" and stem.endswith(_GPT2_CONV1D) and data.ndim == 2:
        return np.ascontiguousarray(data.T)
    if arch.name == "falcon" and stem.endswith("query_key_value"):   # per KV group [q.. k v] -> all q, all k, all v
        rest = data.shape[1:]
        grouped = data.reshape(_falcon_kv_heads(config), -1, config["hidden_size"] // config["num_attention_heads"],
                               *rest)
        return np.concatenate([grouped[:, :-2].reshape(-1, *rest), grouped[:, -2].reshape(-1, *rest),
                               grouped[:, -1].reshape(-1, *rest)])
    if arch.name == "bloom" and stem.endswith("query_key_value"):
        heads = config["n_head"]
        return np.ascontiguousarray(data.reshape(heads, 3, -1, *data.shape[1:]).swapaxes(0, 1).reshape(data.shape))
    return data


def _add_hyperparameters(writer: Any, arch: GGUFArchitecture, config: dict) -> None:
    if arch.name == "falcon":
        _add_falcon_keys(writer, config)
        return
    if arch.name == "gemma4":
        add_gemma4_keys(writer, config)
        return
    hidden = _find(config, "hidden_size", "n_embd")
    heads = _find(config, "num_attention_heads", "n_head")
    context = _find(config, "max_position_embeddings", "n_positions")
    if context is not None:
        writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(_find(config, "num_hidden_layers", "n_layer"))
    writer.add_feed_forward_length(_find(config, "intermediate_size", "n_inner") or 4 * hidden)
    writer.add_head_count(heads)
    # deepseek2: 1, as llama.cpp runs multi-head latent attention as multi-query attention over the latent
    writer.add_head_count_kv(1 if arch.name == "deepseek2" else _find(config, "num_key_value_heads") or heads)
    if arch.layer_norm:
        writer.add_layer_norm_eps(_find(config, "layer_norm_epsilon", "layer_norm_eps"))
    else:
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if arch.rope_base:
        writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    head_dim = config.get("head_dim") or hidden // heads
    if config.get("head_dim") and arch.name != "phi3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.name == "phi3":   # as the converter: the rotated dimensions, and 0 for "no sliding window"
        writer.add_rope_dimension_count(int(config.get("partial_rotary_factor", 1.0) * hidden) // heads)
        writer.add_sliding_window(config.get("sliding_window") or 0)
        writer.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
    if arch.name in ("gemma2", "gemma3"):
        _add_gemma_keys(writer, arch, config)
    if arch.name in ("command-r", "cohere2"):
        _add_cohere_keys(writer, arch, config)
    if _find(config, "num_local_experts", "num_experts"):
        _add_expert_keys(writer, arch, config)
    if arch.name == "deepseek2":
        add_deepseek_keys(writer, config)


def _add_expert_keys(writer: Any, arch: GGUFArchitecture, config: dict) -> None:
    """A mixture of experts as the converter writes it; refused where llama.cpp would run it differently: a
    dense layer among the sparse ones (its MoE architectures have experts in every layer), or routing weights
    renormalised where llama.cpp does not (or the other way round)."""
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"llama.cpp's {arch.name} has experts in every layer; this checkpoint has dense layers")
    if config.get("norm_topk_prob", True) != _RENORMALISES[arch.name]:
        raise ValueError(f"llama.cpp's {arch.name} {'always' if _RENORMALISES[arch.name] else 'never'} renormalises "
                         f"the routing weights; this checkpoint's norm_topk_prob is {config.get('norm_topk_prob')}")
    writer.add_expert_count(_find(config, "num_local_experts", "num_experts"))
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _falcon_kv_heads(config: dict) -> int:
    """The converter's KV head count: ``num_kv_heads`` (the new architecture), else one (multi-query)."""
    return config["num_kv_heads"] if config.get("new_decoder_architecture") else 1


def _add_falcon_keys(writer: Any, config: dict) -> None:
    """Falcon's keys as the converter writes them: a context of 2048 (not in config.json), no rope base (10k
    in llama.cpp), ``jploski``'s QKV layout. It writes 4 x hidden as the MLP width, every released Falcon's;
    the tiny checkpoints' narrower MLP is written as it is, so that the file stays one llama.cpp loads. No key
    says ALiBi or a sequential block, and the converter's QKV split assumes one KV head outside the new
    architecture: Falcon-RW's layout (ALiBi, multi-head, sequential) cannot be written."""
    if config.get("alibi") or not (config.get("new_decoder_architecture") or config.get("multi_query", True)):
        raise ValueError("llama.cpp's falcon has no ALiBi and, outside the new decoder architecture, one KV head: "
                         "a GGUF file cannot describe this Falcon")
    writer.add_context_length(2048)
    writer.add_tensor_data_layout("jploski")
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["ffn_hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(_falcon_kv_heads(config))
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])


def _add_cohere_keys(writer: Any, arch: GGUFArchitecture, config: dict) -> None:
    """Command-R's logit scale (no rope scaling); Cohere2's window (llama.cpp hard-codes 3 sliding layers
    then a full one), vocabulary size and rotated dimensions."""
    import gguf

    writer.add_logit_scale(config["logit_scale"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    if arch.name == "cohere2":
        pattern = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(config["num_hidden_layers"])]
        if config.get("layer_types", pattern) != pattern:
            raise ValueError("llama.cpp's cohere2 slides 3 layers of every 4: a GGUF file cannot describe "
                             f"layer_types {config['layer_types']}")
        writer.add_sliding_window(config["sliding_window"])
        writer.add_vocab_size(config["vocab_size"])
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        writer.add_rope_dimension_count(int(config.get("rotary_pct", 1.0) * head_dim))


def _add_gemma_keys(writer: Any, arch: GGUFArchitecture, config: dict) -> None:
    """Gemma's window, Gemma 2's soft-caps (Gemma 3's converter writes none) and Gemma 3's linear rope
    scaling (its global layers'; the local layers' base is fixed at 10k in llama.cpp). The file has no key
    for the attention scale: llama.cpp infers it from the model's size, so a checkpoint whose
    ``query_pre_attn_scalar`` differs from that cannot be written."""
    import gguf

    from llmserve.model_loader.gguf_config import gemma_query_pre_attn_scalar

    inferred = gemma_query_pre_attn_scalar(arch.name, config["num_hidden_layers"], config["hidden_size"],
                                           config["num_attention_heads"], config["head_dim"])
    if config["query_pre_attn_scalar"] != inferred:
        raise ValueError(f"query_pre_attn_scalar {config['query_pre_attn_scalar']} is not the {inferred} llama.cpp "
                         f"infers for this {arch.name} model: a GGUF file cannot describe it")
    writer.add_sliding_window(config["sliding_window"])
    if arch.name == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        return
    if config.get("attn_logit_softcapping") is not None or config.get("final_logit_softcapping") is not None:
        raise ValueError("llama.cpp's converter writes no soft-cap for gemma3: a GGUF file cannot describe them")
    local_base = config.get("rope_local_base_freq") or config["rope_parameters"]["sliding_attention"]["rope_theta"]
    if local_base != 10000.0:
        raise ValueError(f"local rope base {local_base} is not the 10000 llama.cpp uses for gemma3: a GGUF file "
                         f"cannot describe it")
    scaling = config.get("rope_scaling") or config["rope_parameters"]["full_attention"]
    if scaling.get("rope_type", "default") != "default":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def _add_longrope_factors(writer: Any, config: dict) -> None:
    """LongRoPE (Phi-3 128k, Phi-4-mini) as the converter writes it: its factors as two F32 tensors and the
    attention factor it implies."""
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if scaling.get("rope_type") != "longrope":
        return
    scale = config["max_position_embeddings"] / config["original_max_position_embeddings"]
    original = config["original_max_position_embeddings"]
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    for kind in ("long", "short"):
        writer.add_tensor(f"rope_factors_{kind}.weight", np.asarray(scaling[f"{kind}_factor"], dtype=np.float32))


def write_gguf(checkpoint: Path, out: Path, family: str, file_type: str = "F32", with_tokenizer: bool = True) -> Path:
    """``checkpoint`` (a generated checkpoint folder of ``family``) as one GGUF file at ``out``, its 2-D
    weights in ``file_type``; ``with_tokenizer`` False leaves the tokenizer out (a file such as some tools write,
    served with ``--tokenizer``)."""
    import gguf

    arch = GGUF_ARCHITECTURES[family]
    arch_id = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.name)
    config = json.loads((checkpoint / "config.json").read_text())
    mix = MIXES.get(file_type)
    qtype = gguf.GGMLQuantizationType[mix[0] if mix else file_type]
    writer = gguf.GGUFWriter(str(out), arch.name)
    writer.add_name(checkpoint.name)
    _add_hyperparameters(writer, arch, config)
    writer.add_file_type(mix[1] if mix else qtype.value if file_type not in ("F32", "F16")
                         else {"F32": 0, "F16": 1}[file_type])
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    model = _tokenizer_model(tokenizer) if with_tokenizer else None
    if model == "llama" and arch.name == "gemma4":   # the converter's own model name for Gemma 4's vocabulary
        model = "gemma4"
    if model is not None:
        _add_tokenizer(writer, model, tokenizer, config, checkpoint)
    else:   # no tokenizer in the file (serve it with --tokenizer <checkpoint folder>)
        writer.add_vocab_size(config["vocab_size"])
        if config.get("pad_token_id") is not None:
            writer.add_pad_token_id(config["pad_token_id"])
    _add_longrope_factors(writer, config)
    layers = _find(config, "num_hidden_layers", "n_layer")
    names = gguf.get_tensor_name_map(arch_id, layers)
    if arch.name == "gemma4":
        writer.add_tensor("rope_freqs.weight", rope_freqs(config))
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, tensor in iterate_weights(checkpoint):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")   # as the converter renames it
        expert = _EXPERT.match(name)
        if expert:   # stacked per layer and projection below, as the converter does
            experts.setdefault((int(expert[1]), _EXPERT_KIND[expert[3]]), {})[int(expert[2])] = tensor.float().numpy()
            continue
        stem, suffix = name.rsplit(".", 1)
        data = _converted(arch, stem, tensor.to(torch.float32).numpy(), config)
        if arch.name == "gemma4":
            mapped = gemma4_tensor_name(names, name)
            mapped, suffix = mapped.rsplit(".", 1) if mapped else (None, suffix)
        else:
            mapped = names.get_name(stem) or names.get_name(stem.removeprefix("transformer."))
        if mapped is None:   # as the converter's "Can not map tensor"
            raise ValueError(f"llama.cpp's {arch.name} has no tensor for {name}")
        if mapped.endswith("ffn_gate_inp_shexp"):   # llama.cpp's shared-expert gate is a vector
            data = data.reshape(-1)
        halves = (latent_up_halves(mapped, data, config) if mapped.endswith("attn_kv_b")
                  else [(mapped, data)])
        for gguf_name, part in halves:
            _add_weight(writer, f"{gguf_name}.{suffix}", part, file_type, qtype, layers)
    for (layer, kind), stack in sorted(experts.items()):
        _add_weight(writer, f"blk.{layer}.ffn_{kind}_exps.weight", np.stack([stack[e] for e in sorted(stack)]),
                    file_type, qtype, layers)
    finish_file(writer)
    return out


def finish_file(writer: Any) -> None:
    """Write a ``GGUFWriter``'s header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_weight(writer: Any, gguf_name: str, data: np.ndarray, file_type: str, qtype: Any, layers: int) -> None:
    """One tensor in the file's type: vectors, norms and routers (which llama.cpp's quantize leaves alone) in
    F32; a stack of experts quantised row by row as a 2-D weight is; F16 where the rows do not split into the
    type's blocks (as the converter falls back)."""
    import gguf

    tensor_type = mix_tensor_type(file_type, gguf_name, layers, data.shape[-1])
    if (data.ndim == 1 or gguf_name.split(".")[-2].endswith(("_norm", "ffn_gate_inp"))
            or qtype == gguf.GGMLQuantizationType.F32):
        writer.add_tensor(gguf_name, data)
    elif (qtype == gguf.GGMLQuantizationType.F16
          or data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tensor_type]][0]):
        writer.add_tensor(gguf_name, data.astype(np.float16))
    else:
        blocks = quantize_tensor(data.reshape(-1, data.shape[-1]), tensor_type)
        writer.add_tensor(gguf_name, blocks.reshape(*data.shape[:-1], blocks.shape[-1]),
                          raw_dtype=gguf.GGMLQuantizationType[tensor_type])


def _tokenizer_model(tokenizer: dict) -> str | None:
    """llama.cpp's tokenizer model for ``tokenizer.json``: ``gpt2`` for a byte-level BPE (a ByteLevel
    pre-tokenizer, alone or in a sequence), ``llama`` for a sentencepiece-style BPE over Metaspace's ``"▁"``
    words; None for anything else (the file then carries no tokenizer)."""
    if tokenizer["model"]["type"] != "BPE":
        return None
    pre = tokenizer.get("pre_tokenizer") or {}
    kinds = {p.get("type") for p in (pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre])}
    return "gpt2" if "ByteLevel" in kinds else "llama" if "Metaspace" in kinds else None


def _token_type(token: str, special: dict[str, int], unk: str | None) -> int:
    """llama.cpp's token types: 2 unknown, 3 control (added special tokens), 6 a byte-fallback byte, 1 normal."""
    if token == unk:
        return 2
    if token in special:
        return 3
    return 6 if re.fullmatch(r"<0x[0-9A-F]{2}>", token) else 1


def _add_tokenizer(writer, model: str, tokenizer: dict, config: dict,  # noqa: ANN001 - GGUFWriter
                   checkpoint: Path) -> None:
    """The tokenizer as llama.cpp's converter writes one from ``tokenizer.json``: tokens in id order, their types,
    the merges, the special ids and the chat template; for the ``llama`` model (a sentencepiece-style BPE, as
    its Hugging Face vocabulary path writes it) also scores falling with the id, and whether BOS is added (the
    post-processor's template starts with it); for ``gemma4`` (the same vocabulary as Gemma 4's converter writes
    it) scores of -1000, BOS added, no space prefix and no pre-tokenizer."""
    vocab = dict(tokenizer["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab.update(special)
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model(model)
    if model != "gemma4":   # Gemma 4's converter writes no pre-tokenizer (llama.cpp splits on newlines)
        writer.add_tokenizer_pre("qwen2" if model == "gpt2" else "default")
    writer.add_token_list(tokens)
    if model in ("llama", "gemma4"):
        gemma4 = model == "gemma4"
        writer.add_token_scores([-1000.0] * len(tokens) if gemma4 else [-float(i) for i in range(len(tokens))])
        unk = tokenizer["model"].get("unk_token")
        # Gemma 4's converter types the unknown token as the added special token it is (control)
        writer.add_token_types([_token_type(token, special, None if gemma4 else unk) for token in tokens])
        if unk is not None:
            writer.add_unk_token_id(vocab[unk])
    else:
        writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    eos = config["eos_token_id"]
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if config.get("bos_token_id") is not None:
        writer.add_bos_token_id(config["bos_token_id"])
    template = (tokenizer.get("post_processor") or {}).get("single") or [{}]
    writer.add_add_bos_token(model == "gemma4" or (model == "llama" and "SpecialToken" in template[0]))
    if model == "gemma4":
        writer.add_add_space_prefix(False)
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])
