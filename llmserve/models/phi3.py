"""Phi-3 (``Phi3ForCausalLM``): the Llama blocks as they are, with Phi-3's checkpoint layout and options, as
transformers' ``modeling_phi3`` computes them.

- checkpoints store q/k/v fused in ``self_attn.qkv_proj`` and gate/up fused in ``mlp.gate_up_proj`` (gate
  first): the shared fused linears take them whole and split them into their shards (so tensor parallelism
  takes each rank's heads and rows as for Llama);
- ``sliding_window`` (2047 in Phi-3-mini-4k) on every layer;
- no biases, untied LM head.

Refused, rather than run wrongly:

- LongRoPE (``rope_scaling.type`` ``longrope``, and ``su`` / ``yarn``, which transformers reads as longrope;
  the 128k-context checkpoints): transformers rotates with the short factors while the sequence fits in
  ``original_max_position_embeddings`` and with the long ones after, and a sequence that crosses the switch
  keeps the keys it cached with the short ones. Reproducing that per sequence needs the rotation to depend
  on each sequence's length at the step that computed each key, which the paged engine does not track;
- partial rotary (``partial_rotary_factor`` < 1: Phi-4-mini).
"""

from __future__ import annotations

from typing import Any

from llmserve.layers.rotary import rope_parameters
from llmserve.models.llama import LlamaBlockSpec, LlamaForCausalLM, UnsupportedModelConfigError, hidden_act_of


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return LlamaBlockSpec(activation=hidden_act_of(config))

    @classmethod
    def check_config(cls, config: Any) -> None:
        _, rope = rope_parameters(config)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("longrope", "su", "yarn"):
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: LongRoPE (rope_scaling type {rope_type!r}, the long-context Phi-3 checkpoints) is "
                f"not supported yet: its switch from short to long factors at original_max_position_embeddings "
                f"has to be applied per sequence; the Phi-3 checkpoints with plain rope (the 4k ones) load")
        partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
        if partial != 1.0:
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: partial rotary (partial_rotary_factor={partial}) is not supported yet")
