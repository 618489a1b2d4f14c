"""KV-cache bytes per token of multi-head latent attention against per-head K and V of the same heads.

``python -m llmserve.benchmarks.kv_cache`` builds DeepSeek-V2-Lite, DeepSeek-V2 and DeepSeek-V3 (their released
shapes, on PyTorch's meta device: no weights, no memory) as llmserve builds them, and reads what each attention
layer declares it caches per token (:meth:`~llmserve.layers.attention.layer.Attention.kv_cache_elements_per_token`,
what the engine sizes its cache with). The comparison is the same heads caching K (``qk_nope_head_dim +
qk_rope_head_dim``) and V (``v_head_dim``) per head, as an engine without MLA (or transformers' expanded
attention) would. ``--model DIR`` reports a checkpoint's config instead; ``--dtype`` sets the cache's element size.
``--kv-cache-dtype fp8|fp8_e5m2|int8`` adds the tokens per GiB of the quantised cache (one byte per entry) and
its capacity gain over ``--dtype``, as the engine logs it at start-up; with ``--model``, any family (one without
MLA reports its own per-head cache in both columns).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from llmserve.models.registry import resolve_model_class
from llmserve.quantization.kv_cache import KV_CACHE_DTYPES, check_kv_cache_dtype, kv_cache_format

# The released checkpoints' attention shapes (their config.json values); everything else is transformers'
# default for the model type (the MoE sizes do not change the cache).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "DeepSeek-V2-Lite": ("deepseek_v2", {"hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
                                         "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                                         "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
                                         "num_experts_per_tok": 6, "first_k_dense_replace": 1}),
    "DeepSeek-V2": ("deepseek_v2", {"hidden_size": 5120, "num_hidden_layers": 60, "num_attention_heads": 128,
                                    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                                    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 160,
                                    "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                                    "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}),
    "DeepSeek-V3": ("deepseek_v3", {}),   # transformers' DeepseekV3Config defaults are DeepSeek-V3's shape
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def shape_config(model_type: str, overrides: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **overrides)
    config.architectures = ["DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
    return config


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> tuple[int, int]:
    """``(as built, per-head K and V)`` bytes one token takes in the KV cache of every layer together; a model
    without MLA caches per-head K and V already (both the same)."""
    with torch.device("meta"):
        model = resolve_model_class(config)(config)
    size = torch.tensor([], dtype=dtype).element_size()
    built = sum(a.kv_cache_elements_per_token() for a in model.attention_layers()) * size
    if getattr(config, "kv_lora_rank", None) is None:
        return built, built
    per_head = (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * config.num_attention_heads
    return built, config.num_hidden_layers * per_head * size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a checkpoint directory (default: the released DeepSeek shapes)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="also report a quantised cache's capacity against --dtype's")
    args = parser.parse_args(argv)
    quantised = kv_cache_format(check_kv_cache_dtype(args.kv_cache_dtype))
    if args.model:
        from llmserve.model_loader.loader import load_config

        configs = {args.model: load_config(Path(args.model))}
    else:
        configs = {name: shape_config(*shape) for name, shape in SHAPES.items()}
    extra = "" if quantised is None else f" {quantised.name} tokens per GiB (as built) | gain |"
    print("| model | layers | heads | bytes/token as built (MLA where it has it) | per-head K+V bytes/token | ratio | "
          f"tokens per GiB (as built / K+V) |{extra}\n|---|---|---|---|---|---|---|{'' if quantised is None else '---|---|'}")
    for name, config in configs.items():
        mla, per_head = kv_bytes_per_token(config, DTYPES[args.dtype])
        row = (f"| {name} | {config.num_hidden_layers} | {config.num_attention_heads} | {mla:,} | {per_head:,} | "
               f"{per_head / mla:.1f}x | {2**30 // mla:,} / {2**30 // per_head:,} |")
        if quantised is not None:
            small, _ = kv_bytes_per_token(config, quantised.dtype)
            row += f" {2**30 // small:,} | {mla / small:.1f}x |"
        print(row)


if __name__ == "__main__":
    main()
