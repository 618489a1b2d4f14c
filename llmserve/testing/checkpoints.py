"""Small Hugging Face checkpoints with RANDOM weights, for tests and the demo.

No model can be downloaded in this project's environment, so llmserve makes its
own checkpoints.  They are complete Hugging Face model folders (``config.json``,
``generation_config.json``, ``model.safetensors`` or sharded
``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``,
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) that
``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load without any
missing or unexpected weights.

**The weights are random.  The models know nothing, and everything they
generate is gibberish.**  They exist to exercise the engine (loading, the
tokenizer, attention, the KV cache, batching, sampling) and to be compared
token-for-token with Hugging Face transformers, never to produce meaningful text.

The tokenizers are real BPE tokenizers trained on a bundled corpus
(``corpus/corpus.txt``: CPython standard library docstrings plus a short
multilingual section), see :mod:`llmserve.testing.tokenizer_files`.

Families (:data:`FAMILIES`):

``llama``    ``LlamaForCausalLM``, sentencepiece-style BPE with byte fallback, Llama-2 ``[INST]`` chat template.
``llama3``   ``LlamaForCausalLM`` with Llama-3 rope scaling (``rope_type="llama3"``), rope_theta 500000 and
             tied input/output embeddings (no ``lm_head.weight`` in the file); same tokenizer kind as ``llama``.
``mistral``  ``MistralForCausalLM`` with ``sliding_window: null`` and rope_theta 1e6, Mistral ``[INST]`` template.
``qwen2``    ``Qwen2ForCausalLM``: q/k/v projections with bias, byte-level BPE, ChatML template.
``qwen3``    ``Qwen3ForCausalLM``: per-head ``q_norm``/``k_norm`` RMSNorm, explicit ``head_dim`` (twice
             hidden/heads), no attention bias, byte-level BPE, ChatML template.
``gemma2``   ``Gemma2ForCausalLM``: four ``1 + w`` norms per layer, GeGLU, attention and final-logit
             soft-caps small enough to bite (4 and 15), ``query_pre_attn_scalar`` = hidden/heads != head_dim,
             a 10-token sliding window on layer 0 (even layers), tied embeddings; tiny: hidden 48, 6 heads /
             2 KV heads (GQA ratio 3) of head_dim 16. Sentencepiece-style BPE, Gemma turn template.
``gemma3``   ``Gemma3ForCausalLM``: as gemma2 with q/k norms and no soft-caps; tiny has 6 layers, 5 local
             (window 10, rope base 10k) and 1 global (rope base 1M, linear scaling x8).
``gemma4``   ``Gemma4ForCausalLM`` (text): per-layer inputs, the last 2 of 6 layers sharing K/V (double-wide
             MLPs), 4 local layers (window 10, 6 heads / 2 KV heads of 16) and 2 global (head_dim 24, one KV
             head whose values are its keys, proportional rotary on a quarter of the dims, base 1M), q/k/v
             norms, ``layer_scalar``, final-logit soft-cap 15, tied (see ``checkpoint_layout_gemma4``).
``gemma4_moe`` as gemma4 with the MoE block (``enable_moe_block``): 5 experts of 32 beside every layer's dense MLP,
             top-2 renormalised and scaled per expert, stacked ``experts.gate_up_proj``/``down_proj`` tensors.
``cohere``   ``CohereForCausalLM`` (Command-R): bias-free LayerNorm, parallel residual (one norm per layer),
             interleaved rotary, ``logit_scale`` 0.25, per-head q/k LayerNorm (``use_qk_norm``, as Command R+),
             tied; tiny: hidden 96, 3 layers, 6 heads / 2 KV heads (GQA ratio 3) of 16. Byte-level BPE, ChatML template.
``cohere2``  ``Cohere2ForCausalLM`` (Command R7B / A): as cohere without q/k norms; 4 layers, 3 with a 10-token
             window and rotary, the 4th full attention without positional encoding.
``phi3``     ``Phi3ForCausalLM``: fused ``qkv_proj`` and ``gate_up_proj`` tensors, plain rope (the 4k checkpoints),
             a sliding window on every layer (10 tokens in tiny), untied; tiny: hidden 96,
             6 heads / 2 KV heads (GQA ratio 3) of 16. Sentencepiece-style BPE, Phi-3 ``<|user|>`` template.
``phi3_longrope`` as phi3 with LongRoPE (the 128k checkpoints) switching at ``original_max_position_embeddings``
             32 of 2048, no window.
``phi4_mini`` as phi3_longrope with Phi-4-mini's partial rotary (``partial_rotary_factor`` 0.75) and tied embeddings.
``gpt2``     ``GPT2LMHeadModel``: ``transformer.h.N`` Conv1D weights (``[in, out]``), fused ``c_attn``,
             LayerNorm with bias, learned positions, ``gelu_new``, tied; ``n_inner`` 160 (not 4 x hidden).
             Byte-level BPE with ``<|endoftext|>`` as BOS/EOS, ChatML template.
``bloom``    ``BloomForCausalLM``: ALiBi (6 heads), embedding LayerNorm, per-head fused ``query_key_value``, tied.
``falcon``   ``FalconForCausalLM``, new decoder architecture: 6 heads in 2 KV groups, ``ln_attn``/``ln_mlp``, rotary.
``falcon_mqa`` Falcon multi-query (one KV head), parallel attention + MLP under one norm, rotary, untied.
``falcon_rw``  Falcon-RW: ALiBi, multi-head, sequential attention then MLP, biases. All four: byte-level BPE, ChatML.
``mixtral``  ``MixtralForCausalLM``: Mistral's blocks with a sparse MoE in every layer, 5 experts (``w1``/``w2``/``w3``
             per expert under ``block_sparse_moe``) of 64, top-2 renormalised. Mistral's tokenizer and template.
``qwen2_moe`` ``Qwen2MoeForCausalLM``: q/k/v bias; 3 layers, the middle one dense (``mlp_only_layers``); 7 experts
             of 32, top-1 not renormalised, a shared expert of 96 behind a sigmoid gate. Byte-level BPE, ChatML.
``qwen3_moe`` ``Qwen3MoeForCausalLM``: Qwen3's q/k norms; no shared expert; 9 experts of 32, top-3 renormalised,
             sparse every second layer (``decoder_sparse_step`` 2). Byte-level BPE, ChatML.

Sizes (:data:`SIZES`): ``tiny`` (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 2000; a family may
override it, see ``FamilySpec.size_overrides``) for tests and
``bench``, the ~125M-parameter Llama-shaped benchmark and demo model (hidden 768, 12 layers, 12 heads /
4 KV heads, intermediate 2048, vocab 32000); ``1b`` (Llama-3.2-1B's shape) and ``8b`` (Llama-3-8B's
shape, vocab 128256) for GPU benchmarks (``scripts/gpu_suite.sh``); ``tiny-draft`` and ``bench-draft``, draft
models for speculative decoding with the tokenizer of ``tiny`` and ``bench`` (1 layer of 32; 2 layers of 256).

Weights are drawn from a ``torch.Generator`` seeded from ``(seed, tensor name)``, so the same arguments
always produce byte-identical files, and a given tensor does not depend on sharding.  Tensor names, shapes
and scales per layout are in :mod:`llmserve.testing.checkpoint_layouts`.

``rope_theta``/``rope_scaling`` are written both the way checkpoints from the transformers 4.x era have them
(top-level ``rope_theta`` plus ``rope_scaling``) and the way transformers 5 writes them (``rope_parameters``
holding ``rope_type`` and ``rope_theta``); pass ``config_style="legacy"`` or ``"v5"`` to get only one of them.

Typical use::

    from llmserve.testing.checkpoints import write_checkpoint, demo_model_path
    path = write_checkpoint(tmp_path / "m", family="qwen3")        # tiny, seconds
    demo = demo_model_path()                                       # ~/.cache/llmserve/models/llmserve-demo-llama-125m

or from a shell: ``python -m llmserve.testing.checkpoints OUT_DIR --family llama --size tiny``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from llmserve.config import cache_dir

from .build_cache import build_once, write_json
from .checkpoint_families import DENSE_FAMILIES, SIZES, FamilySpec, SizeSpec
from .checkpoint_families_moe import MOE_FAMILIES
from .checkpoint_layout_deepseek import deepseek_config, deepseek_tensors
from .checkpoint_layout_gemma4 import gemma4_config, gemma4_tensors
from .checkpoint_layout_moe import moe_tensors
from .checkpoint_layouts import (
    OWN_LAYOUTS,
    TensorSpec,
    cohere_config,
    gemma_config,
    llama_tensors,
)
from .checkpoint_weights import write_weights
from .tokenizer_files import (
    SENTENCEPIECE,
    TokenizerInfo,
    build_tokenizer,
    write_tokenizer_files,
)

__all__ = [
    "FAMILIES",
    "SIZES",
    "FamilySpec",
    "SizeSpec",
    "write_checkpoint",
    "demo_model_path",
    "build_once",
    "write_model_files",
    "cache_dir",
    "tensor_specs",
    "TensorSpec",
    "DEMO_MODEL_NAME",
]

FAMILIES = {**DENSE_FAMILIES, **MOE_FAMILIES}
# Bump when the bytes written for given arguments change, so cached demo models get rebuilt.
FORMAT_VERSION = 1

DEMO_MODEL_NAME = "llmserve-demo-llama-125m"


# Layouts with their own tensor names and config keys, Gemma 4's and DeepSeek's included.
LAYOUTS = {**OWN_LAYOUTS, "gemma4": (gemma4_tensors, gemma4_config), "deepseek": (deepseek_tensors, deepseek_config)}

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _get_family(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}") from None


def _get_size(size: str, fam: FamilySpec | None = None) -> SizeSpec:
    """``size`` with ``fam``'s overrides of it applied (the SizeSpec fields among them); BLOOM's MLP is four times
    its hidden size whatever the size says (its config has no MLP width)."""
    try:
        sz = SIZES[size]
    except KeyError:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}") from None
    overrides = dict(fam.size_overrides.get(size, {})) if fam is not None else {}
    fields = {f.name for f in dataclasses.fields(SizeSpec)}
    sz = dataclasses.replace(sz, **{k: v for k, v in overrides.items() if k in fields})
    return dataclasses.replace(sz, intermediate_size=4 * sz.hidden_size) if fam and fam.layout == "bloom" else sz


def _size_config_overrides(fam: FamilySpec, size: str) -> dict[str, Any]:
    """The config.json keys among ``fam``'s overrides of ``size`` (the non-SizeSpec ones)."""
    fields = {f.name for f in dataclasses.fields(SizeSpec)}
    return {k: v for k, v in fam.size_overrides.get(size, {}).items() if k not in fields}


def _head_dim(fam: FamilySpec, sz: SizeSpec) -> int:
    return sz.head_dim or fam.head_dim_factor * sz.hidden_size // sz.num_attention_heads


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def tensor_specs(family: str = "llama", size: str = "tiny") -> list[TensorSpec]:
    """The tensors of a checkpoint, in the order transformers' ``state_dict()`` lists them."""
    fam = _get_family(family)
    sz = _get_size(size, fam)
    if fam.layout in LAYOUTS:
        return LAYOUTS[fam.layout][0](fam, sz)
    if fam.layout == "moe":
        return moe_tensors(fam, sz, _head_dim(fam, sz), {**fam.extra_config, **_size_config_overrides(fam, size)})
    return llama_tensors(fam, sz, _head_dim(fam, sz))


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _special_ids(fam: FamilySpec, tok: TokenizerInfo) -> tuple[int, int]:
    """``(bos, eos)`` ids of the family's tokenizer (GPT-2: ``<|endoftext|>`` for both)."""
    if tok.kind == SENTENCEPIECE:
        return tok.special_ids["<s>"], tok.special_ids["</s>"]
    eot = tok.special_ids["<|endoftext|>"]
    return eot, (eot if fam.layout == "gpt2" else tok.special_ids["<|im_end|>"])


def _model_config(fam: FamilySpec, sz: SizeSpec, tok: TokenizerInfo, dtype: torch.dtype, config_style: str,
                  size_config: Mapping[str, Any] | None = None) -> dict:
    bos_id, eos_id = _special_ids(fam, tok)
    common = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "tie_word_embeddings": fam.tie_word_embeddings,
        "dtype": _DTYPE_NAMES[dtype],
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if fam.layout in LAYOUTS:
        own = LAYOUTS[fam.layout][1](fam, sz, bos_id, eos_id)
        config = {**common, **own, **fam.extra_config, **(size_config or {})}
        return dict(sorted(config.items()))
    rope_scaling = None
    if fam.llama3_rope_scaling:
        rope_scaling = {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": sz.max_position_embeddings // 8,
            "rope_type": "llama3",
        }
    if fam.rope_scaling is not None:
        rope_scaling = {k: list(v) if isinstance(v, tuple) else v for k, v in fam.rope_scaling.items()}
    config: dict[str, Any] = {
        **common,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "head_dim": _head_dim(fam, sz),
        "hidden_act": "silu",
        "hidden_size": sz.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": sz.intermediate_size,
        "max_position_embeddings": sz.max_position_embeddings,
        "num_attention_heads": sz.num_attention_heads,
        "num_hidden_layers": sz.num_hidden_layers,
        "num_key_value_heads": sz.num_key_value_heads,
        "rms_norm_eps": fam.rms_norm_eps,
        "use_cache": True,
        "vocab_size": sz.vocab_size,
    }
    if fam.layout == "gemma":
        config["hidden_act"] = "gelu_pytorch_tanh"
        config.update(gemma_config(fam, sz, config_style))
    if fam.layout == "cohere":
        del config["rms_norm_eps"]
        config.update(cohere_config(fam, sz))
    if fam.layout == "phi3":
        config["original_max_position_embeddings"] = sz.max_position_embeddings
        config["pad_token_id"] = eos_id   # transformers' default (32000) is outside the tiny vocabulary
    if config_style in ("both", "legacy"):
        config.setdefault("rope_theta", fam.rope_theta)
        config.setdefault("rope_scaling", rope_scaling)
    if config_style in ("both", "v5"):
        config.setdefault("rope_parameters", {**(rope_scaling or {"rope_type": "default"}), "rope_theta": fam.rope_theta})
    if fam.model_type in ("qwen2", "qwen3", "qwen2_moe"):
        config["max_window_layers"] = sz.num_hidden_layers
    config.update(fam.extra_config)
    config.update(size_config or {})
    return dict(sorted(config.items()))


def _generation_config(fam: FamilySpec, tok: TokenizerInfo) -> dict:
    if tok.kind == SENTENCEPIECE:
        return {"bos_token_id": tok.special_ids["<s>"], "eos_token_id": tok.special_ids["</s>"]}
    eot, im_end = tok.special_ids["<|endoftext|>"], tok.special_ids["<|im_end|>"]
    if fam.layout == "gpt2":
        return {"bos_token_id": eot, "eos_token_id": eot}
    return {"bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot}


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def write_checkpoint(
    path: str | os.PathLike,
    family: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
    *,
    config_style: str = "both",
) -> Path:
    """Write a random-weight Hugging Face checkpoint of ``family``/``size`` into ``path`` and return it.

    ``path`` is created if needed; weight and index files already in it are removed first.  With
    ``max_shard_bytes`` smaller than the weights, they are split like transformers' ``save_pretrained``
    does (``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``).  ``dtype`` is one of
    float32, float16, bfloat16.  ``config_style`` picks how rope settings appear in config.json:
    ``"both"`` (default), ``"legacy"`` (``rope_theta`` + ``rope_scaling``) or ``"v5"``
    (``rope_parameters``).  Same arguments, same bytes.
    """
    fam = _get_family(family)
    sz = _get_size(size, fam)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {list(_DTYPE_NAMES)}")
    if config_style not in ("both", "legacy", "v5"):
        raise ValueError(f"config_style must be 'both', 'legacy' or 'v5', not {config_style!r}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        stale.unlink()

    write_model_files(path, fam, sz, dtype, config_style, _size_config_overrides(fam, size))
    write_weights(path, tensor_specs(family, size), seed, dtype, max_shard_bytes)
    return path


def write_model_files(path: Path, fam: FamilySpec, sz: SizeSpec, dtype: torch.dtype = torch.float32,
                      config_style: str = "both", size_config: Mapping[str, Any] | None = None) -> None:
    """Everything of a checkpoint of ``fam`` shaped ``sz`` but its weights: the tokenizer files, config.json and
    generation_config.json (the trained models reuse it with weights of their own)."""
    _, tok = build_tokenizer(fam.tokenizer_kind, sz.vocab_size)
    write_tokenizer_files(
        path,
        fam.tokenizer_kind,
        sz.vocab_size,
        chat_template=fam.chat_template,
        model_max_length=sz.max_position_embeddings,
        eos_token="<|endoftext|>" if fam.layout == "gpt2" else None,
    )
    write_json(path / "config.json", _model_config(fam, sz, tok, dtype, config_style, size_config))
    write_json(path / "generation_config.json", _generation_config(fam, tok))


def _demo_stamp() -> dict:
    return {"family": "llama", "size": "bench", "seed": 0, "dtype": "float32", "format_version": FORMAT_VERSION}


def demo_model_path() -> Path:
    """The demo model (family llama, size bench, seed 0, float32; ~125M random parameters).

    Lives in ``cache_dir()/models/llmserve-demo-llama-125m`` and is written on first use (a few seconds).
    """
    stamp = _demo_stamp()
    return build_once(cache_dir() / "models" / DEMO_MODEL_NAME, stamp, lambda tmp: write_checkpoint(
        tmp, family=stamp["family"], size=stamp["size"], seed=stamp["seed"], dtype=torch.float32))


def _main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(
        prog="python -m llmserve.testing.checkpoints",
        description="Write a random-weight Hugging Face checkpoint (outputs are gibberish).",
    )
    parser.add_argument("path", nargs="?", help="output folder (default: the cached demo model)")
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPE_NAMES.values()))
    parser.add_argument("--max-shard-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.path is None:
        out = demo_model_path()
    else:
        out = write_checkpoint(
            args.path,
            family=args.family,
            size=args.size,
            seed=args.seed,
            dtype=getattr(torch, args.dtype),
            max_shard_bytes=args.max_shard_bytes,
        )
    print(f"{out} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    _main()
