"""A GGUF file's model config: transformers' GGUF config mapping (or, for the architectures it does not
read, Command-R, Cohere2, DeepSeek-V2/V3 and Gemma 4, a config built from the metadata), plus what the mapping drops and
llama.cpp's converter does write, plus what llama.cpp decides without a key: by its own hard-coded rules
(Gemma's attention scale, the local/global layer patterns) or from the tensors the file holds (Falcon's
layout, q/k norms, a separate output head).

Without these a Qwen3 (head size 128, not hidden / heads), a GPT-2 with its own context or MLP width, a Phi-3
with a sliding window or partial rotary, a Gemma with its soft-caps and attention scale, or a Falcon-40B
would load with the wrong shapes or attend wrongly; a config class's default padding id can also lie
outside the file's vocabulary.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmserve.model_loader.gguf_deepseek import deepseek_config
from llmserve.model_loader.gguf_gemma4 import gemma4_config
from llmserve.model_loader.gguf_experts import moe_config

# llama.cpp's layer counts of the Gemma sizes whose attention scale is hidden / heads rather than the head
# size (Gemma 2 27B: 46 layers, Gemma 3 27B: 62 layers); llama-model.cpp infers the scale from the size.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gemma_query_pre_attn_scalar(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """Gemma's ``query_pre_attn_scalar`` as llama.cpp infers it (GGUF has no key for it): hidden / heads
    for the 27B models, recognised by their layer count, and the head size for every other size."""
    return hidden // heads if _GEMMA_27B_LAYERS.get(arch) == layers else head_dim


def load_gguf_config(path: Path) -> Any:
    """The config from the file's metadata; GGUF names no class, so the architecture is the causal-LM class
    transformers maps the model type to (as its own GGUF loading does). Each caller gets its own copy of the
    config read once per file (the engine and the worker both ask for it; every read of a GGUF's metadata
    parses its whole vocabulary)."""
    from llmserve.model_loader.gguf_loader import file_identity

    return copy.deepcopy(_read_config(*file_identity(path))[0])


def transformers_reads_config(path: Path) -> bool:
    """Whether transformers' GGUF support builds this file's config (its ``AutoTokenizer`` needs it)."""
    from llmserve.model_loader.gguf_loader import file_identity

    return _read_config(*file_identity(path))[1] not in _OWN_CONFIGS


@functools.lru_cache(maxsize=4)
def _read_config(path: str, mtime_ns: int, size: int) -> tuple[Any, str]:
    """``(config, architecture)`` of the file as it is now (the key's modification time and size)."""
    from llmserve.model_loader.gguf_loader import import_gguf

    import_gguf()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    meta = _Metadata(Path(path))
    if meta.arch in _OWN_CONFIGS:
        config = AutoConfig.for_model(**_OWN_CONFIGS[meta.arch](meta))
    else:
        config = AutoConfig.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
        _restore_dropped_hyperparameters(config, meta)
        config = moe_config(config, meta)
    if not getattr(config, "architectures", None) and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.pad_token_id = meta.field("tokenizer.ggml.padding_token_id")   # not the config class's default
    return config, meta.arch


class _Metadata:
    """The file's metadata keys and tensor names, read once."""

    def __init__(self, path: Path) -> None:
        from transformers.modeling_gguf_pytorch_utils import read_field

        from llmserve.model_loader.gguf_loader import open_gguf

        self.path = path
        self.reader = open_gguf(path)
        self._read = read_field
        self.arch = self.field("general.architecture")

    def field(self, key: str) -> Any:
        """The key's value; None when the file lacks it."""
        values = self._read(self.reader, key)
        return values[0] if values else None

    def arch_field(self, key: str) -> Any:
        """An architecture's own key: ``attention.key_length`` is ``{arch}.attention.key_length``."""
        return self.field(f"{self.arch}.{key}")

    def arch_values(self, key: str) -> list[Any]:
        """An architecture's own key written as one value or an array (one per layer): all its values."""
        return self._read(self.reader, f"{self.arch}.{key}")

    def tensors(self, prefix: str) -> list[Any]:
        return [t for t in self.reader.tensors if t.name.startswith(prefix)]


def _restore_dropped_hyperparameters(config: Any, meta: _Metadata) -> None:
    key_length = meta.arch_field("attention.key_length")
    if key_length and hasattr(config, "head_dim"):
        config.head_dim = int(key_length)
    restore = _RESTORERS.get(meta.arch)
    if restore is not None:
        restore(config, meta)


def _gpt2(config: Any, meta: _Metadata) -> None:
    config.n_positions = int(meta.field("gpt2.context_length") or config.n_positions)
    config.n_inner = int(meta.field("gpt2.feed_forward_length") or 4 * config.n_embd)


def _bloom(config: Any, meta: _Metadata) -> None:
    """BLOOM ties its head to the embedding, but llama.cpp's converter writes the head as ``output.weight`` (a copy
    of the embedding, quantised as a head: Q6_K in a Q4_K_M file), which llama.cpp multiplies: so do we."""
    config.tie_word_embeddings = not meta.tensors("output.weight")


def _phi3(config: Any, meta: _Metadata) -> None:
    config.sliding_window = int(meta.field("phi3.attention.sliding_window") or 0) or None   # 0: none (Phi-4)
    head_dim = config.hidden_size // config.num_attention_heads
    rotated = meta.field("phi3.rope.dimension_count")
    if rotated and rotated != head_dim:
        config.partial_rotary_factor = rotated / head_dim
    factors = {t.name: t for t in meta.tensors("rope_factors_")}
    if factors:   # LongRoPE: the converter stores its factors as tensors
        config.original_max_position_embeddings = int(meta.field("phi3.rope.scaling.original_context_length"))
        config.rope_parameters = {"rope_type": "longrope", "rope_theta": _rope_theta(config),
                                  **{f"{kind}_factor": [float(x) for x in factors[f"rope_factors_{kind}.weight"].data]
                                     for kind in ("short", "long")}}


def _gemma2(config: Any, meta: _Metadata) -> None:
    """The soft-caps (absent keys: llama.cpp's defaults, which are also the config class's) and the attention
    scale llama.cpp infers."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = meta.arch_field(key)
        if value is not None:
            setattr(config, key, float(value))
    config.query_pre_attn_scalar = gemma_query_pre_attn_scalar(
        meta.arch, config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.head_dim)


# llama.cpp's Gemma 3: with a window, 5 local layers then 1 global; local layers rotate with base 10k,
# unscaled (llama-model.cpp hard-codes both; the file holds the global layers' base and scaling only).
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_COHERE2_PATTERN = 4   # llama.cpp's cohere2: 3 sliding layers, then a full one
_LLAMA_CPP_ROPE_BASE = 10000.0   # llama.cpp's base where the file has no rope.freq_base


def _gemma3(config: Any, meta: _Metadata) -> None:
    """Gemma 2's settings plus the local/global layer pattern and each kind's rope."""
    _gemma2(config, meta)
    window = int(meta.arch_field("attention.sliding_window") or 0)
    config.sliding_window = window or None
    config.layer_types = ["sliding_attention" if window and (i + 1) % _GEMMA3_PATTERN else "full_attention"
                          for i in range(config.num_hidden_layers)]
    scaling_type = meta.arch_field("rope.scaling.type") or "none"
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"gemma3 GGUF with rope scaling {scaling_type!r}: llama.cpp's converter writes only linear")
    full = {"rope_type": "default", "rope_theta": _rope_base(meta)}
    if scaling_type == "linear":
        full.update(rope_type="linear", factor=float(meta.arch_field("rope.scaling.factor")))
    config.rope_parameters = {"full_attention": full,
                              "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_ROPE_BASE}}


def _falcon(config: Any, meta: _Metadata) -> None:
    """Falcon's layout, which the metadata does not name, from the tensors present as llama.cpp reads it:
    ``attn_norm_2`` (the attention's own norm) or several KV heads mean the new decoder architecture; the
    attention and MLP are always parallel, with rotary positions (llama.cpp's falcon has no ALiBi); biases
    where the file holds them. Also what the config mapping misreads: the KV heads, MLP width, epsilon and
    whether the output head is the embedding."""
    kv_heads = int(meta.arch_field("attention.head_count_kv") or 1)
    two_norms = bool(meta.tensors("blk.0.attn_norm_2."))
    config.new_decoder_architecture = two_norms or kv_heads > 1
    config.num_ln_in_parallel_attn = 2 if two_norms else 1
    config.multi_query, config.num_kv_heads = kv_heads == 1, kv_heads
    config.parallel_attn, config.alibi = True, False
    config.bias = bool(meta.tensors("blk.0.attn_qkv.bias"))
    config.ffn_hidden_size = int(meta.arch_field("feed_forward_length"))
    config.layer_norm_epsilon = float(meta.arch_field("attention.layer_norm_epsilon"))
    config.tie_word_embeddings = not meta.tensors("output.weight")
    config.rope_parameters = {"rope_type": "default", "rope_theta": _rope_base(meta)}


def _cohere(meta: _Metadata) -> dict[str, Any]:
    """Command-R and Cohere2, which transformers' GGUF support does not read: every setting from the
    metadata, and what llama.cpp decides without a key as it does (tied embeddings, since its command-r and
    cohere2 have no output tensor; q/k norms where the file holds them; Cohere2's 3 sliding layers of 4)."""
    layers = int(meta.arch_field("block_count"))
    hidden, heads = int(meta.arch_field("embedding_length")), int(meta.arch_field("attention.head_count"))
    config = {"model_type": "cohere" if meta.arch == "command-r" else "cohere2",
              "vocab_size": int(meta.tensors("token_embd.")[0].shape[1]), "hidden_size": hidden,
              "intermediate_size": int(meta.arch_field("feed_forward_length")), "num_hidden_layers": layers,
              "num_attention_heads": heads,
              "num_key_value_heads": int(meta.arch_field("attention.head_count_kv") or heads),
              "max_position_embeddings": int(meta.arch_field("context_length")),
              "layer_norm_eps": float(meta.arch_field("attention.layer_norm_epsilon")),
              "logit_scale": float(meta.arch_field("logit_scale")), "tie_word_embeddings": True,
              "rope_parameters": {"rope_type": "default", "rope_theta": _rope_base(meta)},
              "bos_token_id": meta.field("tokenizer.ggml.bos_token_id"),
              "eos_token_id": meta.field("tokenizer.ggml.eos_token_id")}
    if meta.arch == "command-r":
        return {**config, "use_qk_norm": bool(meta.tensors("blk.0.attn_q_norm."))}
    rotated = meta.arch_field("rope.dimension_count")
    if rotated is not None and rotated != hidden // heads:
        raise ValueError(f"cohere2 GGUF rotating {rotated} of {hidden // heads} dimensions: llmserve's Cohere2 "
                         f"rotates whole heads")
    return {**config, "sliding_window": int(meta.arch_field("attention.sliding_window")),
            "layer_types": ["sliding_attention" if (i + 1) % _COHERE2_PATTERN else "full_attention"
                            for i in range(layers)]}


def _rope_base(meta: _Metadata) -> float:
    return float(meta.arch_field("rope.freq_base") or _LLAMA_CPP_ROPE_BASE)


def _rope_theta(config: Any) -> float:
    from llmserve.layers.rotary import rope_parameters

    return rope_parameters(config)[0]


# Architectures whose config transformers' GGUF support does not build: their own config dict.
_OWN_CONFIGS: dict[str, Callable[[_Metadata], dict[str, Any]]] = {"command-r": _cohere, "cohere2": _cohere,
                                                                   "deepseek2": deepseek_config,
                                                                   "gemma4": gemma4_config}
_RESTORERS: dict[str, Callable[[Any, _Metadata], None]] = {"gpt2": _gpt2, "bloom": _bloom, "phi3": _phi3,
                                                           "gemma2": _gemma2, "gemma3": _gemma3, "falcon": _falcon}
