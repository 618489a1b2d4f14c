"""Gemma 3 (text): Gemma 2's blocks with per-head q/k norms (``1 + w`` RMSNorm over head_dim, before rotary),
no soft-capping in released checkpoints (the config's caps still apply when set), and two kinds of layers:

- local layers (``sliding_attention``) attend to their last ``sliding_window`` positions with rotary base
  ``rope_local_base_freq``;
- global layers (``full_attention``, every 6th in released checkpoints: ``sliding_window_pattern`` 6) attend
  to everything with base ``rope_theta`` and the config's rope scaling (linear, factor 8, in 4B and up).

transformers reads both from older configs into ``layer_types`` and a per-layer-type ``rope_parameters``,
which the shared blocks consume (:func:`~llmserve.models.llama.sliding_window_of`,
:func:`~llmserve.layers.rotary.rope_parameters`).

``Gemma3ForConditionalGeneration`` checkpoints (the 4B and larger, with a vision tower) serve text only:
the loader reads their ``text_config`` (:func:`~llmserve.models.registry.text_model_config`) and the
language model's tensors; the vision tower and projector are skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llmserve.models.gemma2 import Gemma2ForCausalLM
from llmserve.models.llama import LlamaBlockSpec


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return dataclasses.replace(super().block_spec(config), qk_norm=True)


# Where multimodal Gemma checkpoints keep their language model, written before transformers 5 and by it.
LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                           ("language_model.lm_head.", "lm_head."))


def language_model_tensor(name: str, tensor: torch.Tensor, skipped_prefixes: tuple[str, ...]
                          ) -> tuple[str, torch.Tensor] | None:
    """A multimodal checkpoint's tensor named as the text-only model names it; None for the other towers'."""
    if name.startswith(skipped_prefixes):
        return None
    for old, new in LANGUAGE_MODEL_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):], tensor
    return name, tensor


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The language model of a multimodal Gemma 3 checkpoint (text in, text out)."""

    skipped_prefixes = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                        "model.multi_modal_projector.")

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        return language_model_tensor(name, tensor, self.skipped_prefixes)
