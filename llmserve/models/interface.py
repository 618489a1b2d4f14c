"""What the model runner may rely on from any model, and how pipeline stages hand over their state.

The runner calls only :class:`CausalLMModel`'s four methods, so model files stay free of scheduling,
caching and communication: a pipeline stage returns :class:`IntermediateTensors`, and sending them to
the next stage is the runner's job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from llmserve.layers.attention.layer import Attention


@dataclass
class IntermediateTensors:
    """The residual stream between pipeline stages: the last layer's output and the running residual."""

    hidden: torch.Tensor
    residual: torch.Tensor


@runtime_checkable
class CausalLMModel(Protocol):
    """A decoder-only language model, as one pipeline stage and one tensor-parallel rank builds it."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: object,
                intermediate_tensors: IntermediateTensors | None = None,
                rotary_lengths: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        """The first stage reads ``input_ids``, later ones ``intermediate_tensors``; the last stage
        returns final hidden states [T, hidden], the others :class:`IntermediateTensors`.

        ``rotary_lengths`` [T]: per token, ``max(its sequence's prompt length, position + 1)``, the length of
        the pass transformers computes that token in, which decides a length-dependent rotary (LongRoPE's
        factor set); None: the tokens are one sequence in one pass."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the full vocabulary (last stage only)."""
        ...

    def attention_layers(self) -> list[Attention]:
        """This stage's attention layers, in order (the runner binds one KV cache to each)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load this rank's part of the checkpoint; tensors of other stages are skipped."""
        ...


def layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Decoder layers ``[start, end)`` that pipeline stage ``pp_rank`` of ``pp_size`` runs.

    An even split; when it does not divide, the earliest stages take one extra layer each (the last
    stage already carries the final norm and the LM head).
    """
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside a pipeline of {pp_size} stages")
    if num_layers < pp_size:
        raise ValueError(f"cannot split {num_layers} decoder layers over {pp_size} pipeline stages: "
                         f"every stage needs at least one layer")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)
