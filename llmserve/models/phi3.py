"""Phi-3 (``Phi3ForCausalLM``, also Phi-4-mini): the Llama blocks with Phi-3's checkpoint layout and options, as
transformers' ``modeling_phi3`` computes them.

- checkpoints store q/k/v fused in ``self_attn.qkv_proj`` and gate/up fused in ``mlp.gate_up_proj`` (gate
  first): the shared fused linears take them whole and split them into their shards (so tensor parallelism
  takes each rank's heads and rows as for Llama);
- ``sliding_window`` (2047 in Phi-3-mini-4k) on every layer;
- LongRoPE (``rope_scaling`` type ``longrope``, or ``su`` / ``yarn`` in older configs: the 128k-context
  checkpoints and Phi-4-mini): short factors up to ``original_max_position_embeddings``, long ones past it,
  decided per sequence as transformers decides it for one sequence (:mod:`llmserve.layers.longrope`);
- partial rotary (``partial_rotary_factor``, 0.75 in Phi-4-mini): only each head's first
  ``int(head_dim * partial_rotary_factor)`` dims rotate;
- no biases; untied LM head (tied in Phi-4-mini).
"""

from __future__ import annotations

from typing import Any

from llmserve.layers.rotary import rope_parameters
from llmserve.models.llama import LlamaBlockSpec, LlamaForCausalLM, UnsupportedModelConfigError, hidden_act_of


def partial_rotary_factor(config: Any) -> float:
    """The share of each head's dims that rotate (``rope_parameters`` first, as transformers 5 keeps it)."""
    _, rope = rope_parameters(config)
    value = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return 1.0 if value is None else float(value)


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return LlamaBlockSpec(activation=hidden_act_of(config), rotary_fraction=partial_rotary_factor(config))

    @classmethod
    def check_config(cls, config: Any) -> None:
        fraction = partial_rotary_factor(config)
        if not 0.0 < fraction <= 1.0:
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: partial_rotary_factor must be in (0, 1], got {fraction}")
