"""DeepSeek-V2/V3 GGUF files (llama.cpp's ``deepseek2``), which transformers' GGUF support does not read.

* The config comes from the ``deepseek2.*`` keys: multi-head latent attention's ranks and head sizes, the
  experts, their routing and YaRN. Where the file is silent, llama.cpp's runtime decides
  (``llama_model_deepseek2::load_arch_hparams``): no gating function is softmax (older V2 files), no group
  count is no group limit, no ``expert_weights_norm`` is no renormalising, and a scale of 0 or 1 is no scaling.
  Sigmoid gating is DeepSeek-V3's router (``noaux_tc``, with ``exp_probs_b`` as its correction bias); softmax
  is V2's, and a softmax file whose groups limit the choice (the released DeepSeek-V2 and V2.5) runs V2's
  ``group_limited_greedy``: a group ranked by its best expert, as the checkpoint was trained and as transformers
  and vLLM run it. llama.cpp ranks groups by their best two experts whatever the gating, so its tokens may
  differ from such a file's here; the start-up log says so.
* The tensors keep DeepSeek's checkpoint names. Newer converters split ``kv_b_proj`` into ``attn_k_b`` (its key
  rows, transposed per head, for llama.cpp's absorbed attention) and ``attn_v_b``; older files hold it whole as
  ``attn_kv_b``. Both load (:class:`LatentUpProjections` joins the halves). The converter does not permute the
  rotary rows: llama.cpp rotates deepseek2's interleaved pairs, as DeepSeek's own code does.
* The tokenizer: llama.cpp's ``deepseek-v3`` pre-tokenizer (digits in threes, CJK runs apart, punctuation with
  the word after it), which transformers' GGUF tokenizer does not know.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from llmserve.model_loader.gguf_names import checkpoint_names

logger = logging.getLogger(__name__)

# llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_*
_SOFTMAX, _SIGMOID = 1, 2
# The converter writes yarn_log_multiplier as 0.1 x mscale_all_dim; llama.cpp divides it back in float32.
_YARN_LOG_MUL_FACTOR = np.float32(0.1)

# A layer's tensors (``blk.N.<key>``) -> DeepSeek's checkpoint name under ``model.layers.N.``.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight", "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight", "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_SPLIT_KV_B = re.compile(r"^blk\.(\d+)\.attn_([kv])_b\.weight$")

# llama.cpp's deepseek-v3 pre-tokenizer (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM): three splits in turn.
_DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
PRE_TOKENIZER_SPLITS = {"deepseek-v3": _DEEPSEEK_V3_SPLITS}


def deepseek_config(meta: Any) -> dict[str, Any]:
    """The Hugging Face config (``deepseek_v3`` for sigmoid gating, else ``deepseek_v2``) of a deepseek2 file
    (``meta``: its metadata, as :mod:`~llmserve.model_loader.gguf_config` reads it)."""
    gating, groups, groups_used = _routing(meta)
    field = meta.arch_field
    layers = int(field("block_count")) - int(field("nextn_predict_layers") or 0)   # MTP blocks follow the trunk
    heads, rope_dim = int(field("attention.head_count")), int(field("rope.dimension_count"))
    # The per-head sizes; files older than the *_mla keys (those with attn_kv_b) hold them in key/value_length.
    qk_dim = int(field("attention.key_length_mla") or field("attention.key_length"))
    experts = field("expert_count")
    sigmoid = gating == _SIGMOID
    return {
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "vocab_size": int(meta.tensors("token_embd.")[0].shape[1]), "hidden_size": int(field("embedding_length")),
        "intermediate_size": int(field("feed_forward_length")), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads,   # the file's 1: llama.cpp runs MLA as MQA
        "max_position_embeddings": int(field("context_length")),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")), "hidden_act": "silu",
        "attention_bias": False, "tie_word_embeddings": not meta.tensors("output.weight"),
        # llama.cpp takes the low-rank query path when the layer has attn_q_a (DeepSeek-V2-Lite has attn_q)
        "q_lora_rank": int(field("attention.q_lora_rank")) if meta.tensors("blk.0.attn_q_a.") else None,
        "kv_lora_rank": int(field("attention.kv_lora_rank")), "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": qk_dim - rope_dim,
        "v_head_dim": int(field("attention.value_length_mla") or field("attention.value_length")),
        "rope_parameters": _rope(meta), "rope_interleave": True,
        "n_routed_experts": int(experts) if experts else None,
        "num_experts_per_tok": int(field("expert_used_count") or 0) or None,
        "moe_intermediate_size": int(field("expert_feed_forward_length") or field("feed_forward_length")),
        "n_shared_experts": int(field("expert_shared_count") or 0), "moe_layer_freq": 1,
        "first_k_dense_replace": int(field("leading_dense_block_count") or 0),
        "topk_method": "noaux_tc" if sigmoid else "group_limited_greedy" if groups_used < groups else "greedy",
        "n_group": groups, "topk_group": groups_used,
        "norm_topk_prob": bool(field("expert_weights_norm")),
        "routed_scaling_factor": float(field("expert_weights_scale") or 1.0),
        "bos_token_id": meta.field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.field("tokenizer.ggml.eos_token_id"),
    }


def _routing(meta: Any) -> tuple[int, int, int]:
    """``(gating function, expert groups, groups used)``, refusing a gating function llmserve does not run."""
    gating = int(meta.arch_field("expert_gating_func") or _SOFTMAX)
    groups = int(meta.arch_field("expert_group_count") or 1)
    groups_used = int(meta.arch_field("expert_group_used_count") or groups)
    if gating not in (_SOFTMAX, _SIGMOID):
        raise ValueError(f"{meta.path.name}: deepseek2 expert gating function {gating}; llmserve runs softmax (1) "
                         f"and sigmoid (2)")
    if gating == _SOFTMAX and groups_used < groups:
        logger.warning("%s: softmax-gated experts in %d groups, %d used: running DeepSeek-V2's routing (a group "
                       "ranked by its best expert, as transformers runs the checkpoint); llama.cpp ranks a group by "
                       "its best two experts, so its tokens may differ", meta.path.name, groups, groups_used)
    return gating, groups, groups_used


def _rope(meta: Any) -> dict[str, Any]:
    """Plain rope, or YaRN as llama.cpp runs deepseek2: ``mscale`` and ``mscale_all_dim`` both the file's
    ``yarn_log_multiplier`` / 0.1 (llama-context.cpp), betas 32 and 1 where absent (its defaults)."""
    base = float(meta.arch_field("rope.freq_base") or 10000.0)
    kind = meta.arch_field("rope.scaling.type") or "none"
    if kind == "none":
        return {"rope_type": "default", "rope_theta": base}
    log_mul = meta.arch_field("rope.scaling.yarn_log_multiplier")
    if kind != "yarn" or log_mul is None:
        raise ValueError(f"{meta.path.name}: deepseek2 rope scaling {kind!r}"
                         f"{'' if kind != 'yarn' else ' without rope.scaling.yarn_log_multiplier'}; llmserve runs "
                         f"DeepSeek's YaRN (the converter writes the multiplier with it)")
    mscale = float(np.float32(log_mul) / _YARN_LOG_MUL_FACTOR)
    return {"rope_type": "yarn", "rope_theta": base, "factor": float(meta.arch_field("rope.scaling.factor")),
            "original_max_position_embeddings": int(meta.arch_field("rope.scaling.original_context_length")),
            "beta_fast": float(meta.arch_field("rope.scaling.yarn_beta_fast") or 32.0),
            "beta_slow": float(meta.arch_field("rope.scaling.yarn_beta_slow") or 1.0),
            "mscale": mscale, "mscale_all_dim": mscale}


def deepseek_names(tensor_names: Iterable[str]) -> dict[str, str]:
    """GGUF tensor name -> checkpoint name, for every tensor but the experts, their router (:mod:`gguf_experts`)
    and the halves of a split ``kv_b_proj`` (:class:`LatentUpProjections`)."""
    return checkpoint_names(tensor_names, _LAYER_NAMES, _GLOBAL_NAMES)


class LatentUpProjections:
    """Each layer's ``kv_b_proj`` from the ``attn_k_b`` (``[heads, kv_lora_rank, qk_nope_head_dim]``) and
    ``attn_v_b`` (``[heads, v_head_dim, kv_lora_rank]``) newer converters write: per head its key rows (``k_b``
    transposed back), then its value rows, as the checkpoint stacks them."""

    def __init__(self) -> None:
        self._halves: dict[str, dict[str, np.ndarray]] = {}

    @staticmethod
    def holds(name: str) -> bool:
        return bool(_SPLIT_KV_B.match(name))

    def join(self, name: str, weights: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """Take one half (dequantised); yield ``(checkpoint name, kv_b_proj)`` once the layer has both."""
        layer, half = _SPLIT_KV_B.match(name).groups()
        halves = self._halves.setdefault(layer, {})
        halves[half] = weights
        if len(halves) == 2:
            del self._halves[layer]
            per_head = np.concatenate([halves["k"].transpose(0, 2, 1), halves["v"]], axis=1)
            yield f"model.layers.{layer}.self_attn.kv_b_proj.weight", per_head.reshape(-1, per_head.shape[-1])


def pre_tokenizer(pre: str | None) -> Any:
    """The pre-tokenizer of llama.cpp's ``tokenizer.ggml.pre`` where transformers does not know it; None for
    any other (transformers' own choice stands)."""
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        return None
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
