"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.linear import default_weight_loader, pack_weight_for_cpu, packed_linear


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects hidden states to float32 logits; ``tie_to`` reuses the embedding matrix."""

    packed_weight: torch.Tensor | None = None

    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tie_to is not None
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader

    def pack_for_cpu(self) -> None:
        """Use a oneDNN-packed copy; a tied weight stays too, since the embedding still reads it."""
        self.packed_weight = pack_weight_for_cpu(self.weight)
        if not self.tied:
            self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return packed_linear(hidden_states, self.packed_weight, None).float()
        return F.linear(hidden_states, self.weight).float()
