"""Token bitmasks on the logits' device: the sampler's side of structured outputs.

A bitmask row is int32 [ceil(vocab/32)]: bit ``t % 32`` of word ``t // 32`` is 1 when token ``t`` is
allowed (the layout of llguidance and xgrammar). Pure torch, no grammar library, on any device: the
sampler imports this module whether or not structured outputs are installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The bit pattern of float32 -inf (0xFF800000) as an int32.
_NEG_INF_BITS = -8388608


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def allocate_token_bitmask(
    num_rows: int, vocab_size: int, *, fill: int = -1, pin_memory: bool = False
) -> torch.Tensor:
    """A CPU bitmask [num_rows, ceil(vocab/32)], every token allowed (``fill=-1``) or none (``fill=0``).

    ``pin_memory`` makes its copy to a GPU asynchronous.
    """
    return torch.full((num_rows, bitmask_width(vocab_size)), fill, dtype=torch.int32, pin_memory=pin_memory)


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | torch.Tensor | None = None
) -> None:
    """Set ``logits[r, t]`` to -inf wherever bit t of ``bitmask[r]`` is 0, for each r in ``rows`` (every
    row when None); other rows and allowed tokens keep their values. In place, one vectorised pass.

    ``logits`` [N, V] (finite, any float dtype, any device); ``bitmask`` int32 [>= N, >= ceil(V/32)] on
    the CPU or the logits' device (bits past V are ignored).

    The disallowed positions become an additive bias of 0 or -inf built with integer operations:
    on CPU that is several times faster than unpacking to a bool mask for ``masked_fill_``, and on a
    GPU it is a few elementwise kernels.
    """
    num_rows, vocab = logits.shape
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2:
        raise ValueError(f"bitmask must be a 2-D int32 tensor, got {bitmask.dtype} {tuple(bitmask.shape)}")
    if bitmask.shape[0] < num_rows or bitmask.shape[1] < bitmask_width(vocab):
        raise ValueError(f"bitmask {tuple(bitmask.shape)} does not cover logits {tuple(logits.shape)}")
    if rows is not None and len(rows) == 0:
        return
    device = logits.device
    # Whole rows are contiguous, so a pinned bitmask reaches a GPU asynchronously; trim the columns there.
    words = bitmask[:num_rows].to(device, non_blocking=True)[:, : bitmask_width(vocab)]
    index = None
    if rows is not None:
        index = torch.as_tensor(rows, dtype=torch.long).to(device, non_blocking=True)
        words = words.index_select(0, index)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    bias = words.unsqueeze(-1) >> shifts                               # [R, W, 32]: token's bit lowest
    # In place: on CPU a fresh buffer per operation costs more than the operation (page faults).
    bias.bitwise_and_(1).sub_(1).bitwise_and_(_NEG_INF_BITS)           # 0 if allowed, else -inf's bits
    bias = bias.view(torch.float32).view(words.shape[0], -1)[:, :vocab].to(logits.dtype)
    if index is None:
        logits.add_(bias)
    else:
        logits.index_add_(0, index, bias)
