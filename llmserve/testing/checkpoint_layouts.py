"""The tensors of each checkpoint layout (their names, shapes and random init) and the config.json keys that
differ by layout, for :mod:`llmserve.testing.checkpoints`.

Layouts: ``llama`` (Llama, Mistral, Qwen2, Qwen3), ``gemma`` (Gemma 2 and 3: four norms per layer, norm
weights centred on 0 since the model scales by ``1 + w``), ``cohere`` (Command-R: one norm per layer, q/k
norms with a weight per head, logits scaled by ``logit_scale``), ``phi3`` (Llama's tensors with q/k/v fused
in ``qkv_proj`` and gate/up in ``gate_up_proj``), ``gpt2`` (``transformer.h.N``, Conv1D
weights stored ``[in, out]``, fused ``c_attn``, LayerNorm with bias, learned positions), ``bloom``
(``transformer.h.N``, per-head fused ``query_key_value``, an embedding LayerNorm, ALiBi) and ``falcon``
(``transformer.h.N``, ``query_key_value`` grouped per KV head, its layer layout from the family's config).
The last three write their own config keys (:data:`OWN_LAYOUTS`).

Scales are chosen so that a hidden state gives logits with a standard deviation of about 4 across the
vocabulary: greedy decoding then has clear winners and rarely hinges on float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from llmserve.testing.checkpoint_families import FamilySpec, SizeSpec

# Target standard deviation of the logits across the vocabulary.
LOGIT_STD = 4.0
# Standard deviation of each entry of q and k (before rope) for a unit-RMS input.
QK_STD = 1.2


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: Callable[[torch.Generator, tuple[int, ...]], torch.Tensor]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def normal(std: float, mean: float = 0.0):
    def init(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        t.mul_(std)
        if mean:
            t.add_(mean)
        return t

    return init


def stacked(*parts: tuple[int, Callable[[torch.Generator, tuple[int, ...]], torch.Tensor]]):
    """Rows drawn part by part (a fused projection whose parts have their own scales), stacked along dim 0."""

    def init(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([part_init(gen, (rows, *shape[1:])) for rows, part_init in parts])

    return init


# RMSNorm weights: around 1 (not exactly 1, so that an engine ignoring them is caught).
NORM_INIT = normal(0.1, mean=1.0)
# Gemma stores w and scales by 1 + w: around 0.
GEMMA_NORM_INIT = normal(0.1)


def _inv(n: int) -> float:
    return 1.0 / math.sqrt(n)


def llama_tensors(fam: FamilySpec, sz: SizeSpec, head_dim: int) -> list[TensorSpec]:
    """Llama-shaped checkpoints, Gemma's included, in the order transformers' ``state_dict()`` lists them.

    Gemma's tied embedding is multiplied by sqrt(hidden) on the way in, and its branch outputs are normed:
    the post-norms' ``1 + w`` (around ``branch_gain``) sets how much each layer adds to the residual stream.
    """
    gemma, cohere, phi3 = fam.layout == "gemma", fam.layout == "cohere", fam.layout == "phi3"
    h, inter, v = sz.hidden_size, sz.intermediate_size, sz.vocab_size
    q_out, kv_out = sz.num_attention_heads * head_dim, sz.num_key_value_heads * head_dim
    out_std = LOGIT_STD / math.sqrt(h)  # final hidden has RMS ~1 after the norm
    if cohere:
        out_std /= COHERE_LOGIT_SCALE   # the model multiplies its logits by logit_scale
    norm = GEMMA_NORM_INIT if gemma else NORM_INIT
    post_norm = normal(0.1, mean=fam.branch_gain - 1.0)
    branch = 1.0 if gemma else fam.branch_gain

    specs = [TensorSpec("model.embed_tokens.weight", (v, h), normal(out_std if fam.tie_word_embeddings else 1.0))]
    for i in range(sz.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = (("q", q_out, QK_STD * _inv(h)), ("k", kv_out, QK_STD * _inv(h)), ("v", kv_out, _inv(h)))
        if phi3:
            specs.append(TensorSpec(p + "self_attn.qkv_proj.weight", (q_out + 2 * kv_out, h),
                                    stacked(*((rows, normal(std)) for _, rows, std in qkv))))
        else:
            for proj, out_dim, std in qkv:
                specs.append(TensorSpec(p + f"self_attn.{proj}_proj.weight", (out_dim, h), normal(std)))
                if fam.qkv_bias:
                    specs.append(TensorSpec(p + f"self_attn.{proj}_proj.bias", (out_dim,), normal(0.5)))
        specs.append(TensorSpec(p + "self_attn.o_proj.weight", (h, q_out), normal(branch * _inv(q_out))))
        if fam.qk_norm:   # Cohere's: a weight per head and dim
            specs += [
                TensorSpec(p + "self_attn.q_norm.weight",
                           (sz.num_attention_heads, head_dim) if cohere else (head_dim,), norm),
                TensorSpec(p + "self_attn.k_norm.weight",
                           (sz.num_key_value_heads, head_dim) if cohere else (head_dim,), norm),
            ]
        if phi3:
            specs.append(TensorSpec(p + "mlp.gate_up_proj.weight", (2 * inter, h), normal(_inv(h))))
        else:
            specs += [TensorSpec(p + "mlp.gate_proj.weight", (inter, h), normal(_inv(h))),
                      TensorSpec(p + "mlp.up_proj.weight", (inter, h), normal(_inv(h)))]
        specs += [
            TensorSpec(p + "mlp.down_proj.weight", (h, inter), normal(branch * _inv(inter))),
            TensorSpec(p + "input_layernorm.weight", (h,), norm),
        ]
        if not cohere:   # Cohere: attention and MLP share the input norm (parallel residual)
            specs.append(TensorSpec(p + "post_attention_layernorm.weight", (h,), post_norm if gemma else norm))
        if gemma:
            specs += [
                TensorSpec(p + "pre_feedforward_layernorm.weight", (h,), norm),
                TensorSpec(p + "post_feedforward_layernorm.weight", (h,), post_norm),
            ]
    specs.append(TensorSpec("model.norm.weight", (h,), norm))
    if not fam.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, h), normal(out_std)))
    return specs


def gpt2_tensors(fam: FamilySpec, sz: SizeSpec) -> list[TensorSpec]:
    """GPT-2: Conv1D weights ``[in, out]``, q/k/v fused in ``c_attn``; always tied."""
    h, inter, v = sz.hidden_size, sz.intermediate_size, sz.vocab_size
    out_std = LOGIT_STD / math.sqrt(h)
    bias = normal(0.1)
    specs = [TensorSpec("transformer.wte.weight", (v, h), normal(out_std)),
             TensorSpec("transformer.wpe.weight", (sz.max_position_embeddings, h), normal(out_std))]
    for i in range(sz.num_hidden_layers):
        p = f"transformer.h.{i}."
        specs += [
            TensorSpec(p + "ln_1.weight", (h,), NORM_INIT),
            TensorSpec(p + "ln_1.bias", (h,), bias),
            TensorSpec(p + "attn.c_attn.weight", (h, 3 * h), normal(QK_STD * _inv(h))),
            TensorSpec(p + "attn.c_attn.bias", (3 * h,), bias),
            TensorSpec(p + "attn.c_proj.weight", (h, h), normal(fam.branch_gain * _inv(h))),
            TensorSpec(p + "attn.c_proj.bias", (h,), bias),
            TensorSpec(p + "ln_2.weight", (h,), NORM_INIT),
            TensorSpec(p + "ln_2.bias", (h,), bias),
            TensorSpec(p + "mlp.c_fc.weight", (h, inter), normal(_inv(h))),
            TensorSpec(p + "mlp.c_fc.bias", (inter,), bias),
            TensorSpec(p + "mlp.c_proj.weight", (inter, h), normal(fam.branch_gain * _inv(inter))),
            TensorSpec(p + "mlp.c_proj.bias", (h,), bias),
        ]
    specs += [TensorSpec("transformer.ln_f.weight", (h,), NORM_INIT),
              TensorSpec("transformer.ln_f.bias", (h,), bias)]
    return specs


def gpt2_config(fam: FamilySpec, sz: SizeSpec, bos_id: int, eos_id: int) -> dict[str, Any]:
    """GPT-2's own config keys (``n_embd``, ``n_layer``...; transformers maps the usual names onto them)."""
    return {
        "activation_function": "gelu_new",
        "attn_pdrop": 0.0,
        "bos_token_id": bos_id,
        "embd_pdrop": 0.0,
        "eos_token_id": eos_id,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-5,
        "n_ctx": sz.max_position_embeddings,
        "n_embd": sz.hidden_size,
        "n_head": sz.num_attention_heads,
        "n_inner": sz.intermediate_size,
        "n_layer": sz.num_hidden_layers,
        "n_positions": sz.max_position_embeddings,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "use_cache": True,
        "vocab_size": sz.vocab_size,
    }


# Command-R's logit_scale in the tiny checkpoints (released: 0.0625 and 0.25); the tied embedding is scaled up
# by its inverse so that the logits keep their LOGIT_STD.
COHERE_LOGIT_SCALE = 0.25


def cohere_config(fam: FamilySpec, sz: SizeSpec) -> dict[str, Any]:
    """Cohere's keys besides the Llama ones (``layer_norm_eps`` instead of ``rms_norm_eps``, ``logit_scale``,
    ``use_qk_norm``; Cohere2's interleaved window: 3 sliding layers, then a full one without rope)."""
    config: dict[str, Any] = {"layer_norm_eps": fam.rms_norm_eps, "logit_scale": COHERE_LOGIT_SCALE}
    if fam.model_type == "cohere":
        config["use_qk_norm"] = fam.qk_norm
    else:
        config["layer_types"] = ["sliding_attention" if (i + 1) % 4 else "full_attention"
                                 for i in range(sz.num_hidden_layers)]
    return config


def gemma_config(fam: FamilySpec, sz: SizeSpec, config_style: str) -> dict[str, Any]:
    """Gemma's keys besides the Llama ones: the attention scale (hidden / heads, as Gemma 2 27B, so it differs
    from head_dim), which layers slide, and Gemma 3's rope per layer type (local base 10k, global 1M with
    linear scaling), the way transformers 4.x and 5 write them."""
    config: dict[str, Any] = {"query_pre_attn_scalar": sz.hidden_size // sz.num_attention_heads,
                              "hidden_activation": "gelu_pytorch_tanh"}
    if fam.model_type != "gemma3_text":
        return config
    pattern = 6
    layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(sz.num_hidden_layers)]
    scaling = {"rope_type": "linear", "factor": 8.0}
    if config_style in ("both", "legacy"):
        config.update(rope_theta=fam.rope_theta, rope_local_base_freq=10000.0, rope_scaling=scaling,
                      sliding_window_pattern=pattern)
    if config_style in ("both", "v5"):
        config.update(layer_types=layer_types, rope_parameters={
            "full_attention": {**scaling, "rope_theta": fam.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    return config


def _transformer_block(p: str, fam: FamilySpec, sz: SizeSpec, qkv_rows: int, head_dim: int,
                       norms: list[str]) -> list[TensorSpec]:
    """A BLOOM/Falcon block's tensors: fused ``query_key_value``, ``dense``, the plain MLP, its LayerNorms;
    biases where the family has them (``bias`` in its config, always for BLOOM)."""
    h, inter = sz.hidden_size, sz.intermediate_size
    bias = fam.layout == "bloom" or bool(fam.extra_config.get("bias", False))
    q_out = sz.num_attention_heads * head_dim
    specs = []
    for name, shape, init in [
        ("self_attention.query_key_value", (qkv_rows, h), normal(QK_STD * _inv(h))),
        ("self_attention.dense", (h, q_out), normal(fam.branch_gain * _inv(q_out))),
        ("mlp.dense_h_to_4h", (inter, h), normal(_inv(h))),
        ("mlp.dense_4h_to_h", (h, inter), normal(fam.branch_gain * _inv(inter))),
    ]:
        specs.append(TensorSpec(f"{p}{name}.weight", shape, init))
        if bias:
            specs.append(TensorSpec(f"{p}{name}.bias", shape[:1], normal(0.1)))
    for norm in norms:
        specs += [TensorSpec(f"{p}{norm}.weight", (h,), NORM_INIT), TensorSpec(f"{p}{norm}.bias", (h,), normal(0.1))]
    return specs


def _with_embeddings_and_head(fam: FamilySpec, sz: SizeSpec, specs: list[TensorSpec]) -> list[TensorSpec]:
    """``transformer.word_embeddings``, the blocks, ``transformer.ln_f`` and, untied, ``lm_head``."""
    h, v = sz.hidden_size, sz.vocab_size
    out_std = LOGIT_STD / math.sqrt(h)
    head = [TensorSpec("lm_head.weight", (v, h), normal(out_std))] if not fam.tie_word_embeddings else []
    return ([TensorSpec("transformer.word_embeddings.weight", (v, h), normal(out_std))] + specs
            + [TensorSpec("transformer.ln_f.weight", (h,), NORM_INIT),
               TensorSpec("transformer.ln_f.bias", (h,), normal(0.1))] + head)


def bloom_tensors(fam: FamilySpec, sz: SizeSpec) -> list[TensorSpec]:
    """BLOOM: an embedding LayerNorm, q/k/v fused per head (``[heads, 3, head_dim]``), MLP of 4 x hidden."""
    h = sz.hidden_size
    head_dim = h // sz.num_attention_heads
    specs = [TensorSpec("transformer.word_embeddings_layernorm.weight", (h,), NORM_INIT),
             TensorSpec("transformer.word_embeddings_layernorm.bias", (h,), normal(0.1))]
    for i in range(sz.num_hidden_layers):
        specs += _transformer_block(f"transformer.h.{i}.", fam, sz, 3 * h, head_dim,
                                    ["input_layernorm", "post_attention_layernorm"])
    return _with_embeddings_and_head(fam, sz, specs)


def bloom_config(fam: FamilySpec, sz: SizeSpec, bos_id: int, eos_id: int) -> dict[str, Any]:
    """BLOOM's keys (``n_head``, ``n_layer``; no positions, so its context length is ``seq_length``)."""
    return {"apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "bos_token_id": bos_id,
            "eos_token_id": eos_id, "hidden_dropout": 0.0, "hidden_size": sz.hidden_size, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-5, "n_head": sz.num_attention_heads, "n_layer": sz.num_hidden_layers,
            "pretraining_tp": 1, "seq_length": sz.max_position_embeddings, "slow_but_exact": False,
            "use_cache": True, "vocab_size": sz.vocab_size}


def falcon_tensors(fam: FamilySpec, sz: SizeSpec) -> list[TensorSpec]:
    """Falcon in the layout its config flags (``fam.extra_config``) pick: the query_key_value rows of the new
    architecture (grouped per KV head), multi-query (one KV head) or multi-head; two parallel norms, one, or
    the sequential pair."""
    flags = fam.extra_config
    new = flags.get("new_decoder_architecture", False)
    head_dim = sz.hidden_size // sz.num_attention_heads
    kv_heads = sz.num_key_value_heads if new else (1 if flags.get("multi_query", True) else sz.num_attention_heads)
    if not (new or flags.get("parallel_attn", True)):
        norms = ["input_layernorm", "post_attention_layernorm"]
    elif new and flags.get("num_ln_in_parallel_attn", 2) == 2:
        norms = ["ln_attn", "ln_mlp"]
    else:
        norms = ["input_layernorm"]
    specs = []
    for i in range(sz.num_hidden_layers):
        specs += _transformer_block(f"transformer.h.{i}.", fam, sz, (sz.num_attention_heads + 2 * kv_heads) * head_dim,
                                    head_dim, norms)
    return _with_embeddings_and_head(fam, sz, specs)


def falcon_config(fam: FamilySpec, sz: SizeSpec, bos_id: int, eos_id: int) -> dict[str, Any]:
    """Falcon's keys; the layout flags (``new_decoder_architecture``, ``multi_query``, ``parallel_attn``,
    ``alibi``, ``bias``...) come from the family's ``extra_config``."""
    return {"activation": "gelu", "attention_dropout": 0.0, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "ffn_hidden_size": sz.intermediate_size, "hidden_dropout": 0.0, "hidden_size": sz.hidden_size,
            "initializer_range": 0.02, "layer_norm_epsilon": 1e-5,
            "max_position_embeddings": sz.max_position_embeddings, "num_attention_heads": sz.num_attention_heads,
            "num_hidden_layers": sz.num_hidden_layers, "num_kv_heads": sz.num_key_value_heads,
            "rope_parameters": {"rope_type": "default", "rope_theta": fam.rope_theta}, "rope_theta": fam.rope_theta, "use_cache": True, "vocab_size": sz.vocab_size}


# Layouts with their own tensor names and config keys: layout -> (tensors, config keys).
OWN_LAYOUTS: dict[str, tuple[Callable[[FamilySpec, SizeSpec], list[TensorSpec]],
                             Callable[[FamilySpec, SizeSpec, int, int], dict[str, Any]]]] = {
    "gpt2": (gpt2_tensors, gpt2_config),
    "bloom": (bloom_tensors, bloom_config),
    "falcon": (falcon_tensors, falcon_config),
}
