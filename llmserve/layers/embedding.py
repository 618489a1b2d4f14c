"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.cpu_kernels import block_weight
from llmserve.layers.linear import apply_linear, blocked_layout_available, default_weight_loader


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

    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tie_to is not None
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader

    def use_blocked_layout(self) -> None:
        """Store the weight blocked for the CPU kernels, unless the embedding shares (and reads) it."""
        if not self.tied and blocked_layout_available(self.weight):
            self.weight.data = block_weight(self.weight.data)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return apply_linear(hidden_states, self.weight, None).float()
