"""Cache tensors shared by layers of different shapes: one byte buffer per tensor, one padded page per block.

The i-th layer of every KV-cache group uses cache tensor i (:mod:`llmserve.worker.kv_cache_groups`), and those
layers need not agree on KV heads, head size or cache dtype (Gemma 4's full layers have their own head size and
KV-head count; a draft model's layers are narrower than its target's). As vLLM's hybrid allocator does, every
block of a tensor gets one page as large as its largest member's (rounded up to the widest element, so each
dtype's view stays aligned), and each member views the buffer with its own shape and dtype:
``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous within a block, with blocks a page apart. A
block id holds one group's K/V, so the bytes past a smaller member's page are padding: a block costs the padded
pages, which is what sizes the pool. Where every member has the same page the views are
plainly contiguous, as a layer's own cache would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmserve.layers.attention.layer import Attention


def page_bytes(attn: Attention, block_size: int, dtype: torch.dtype, in_model_dtype: bool = False) -> int:
    """Bytes one block of ``attn``'s key cache (and as many of its value cache) takes, for a model in ``dtype``;
    ``in_model_dtype``: were its cache in the model's dtype (the baseline of a quantised cache's gain)."""
    cache_dtype = dtype if in_model_dtype else attn.kv_cache_dtype(dtype)
    return block_size * attn.num_kv_heads * attn.head_dim * cache_dtype.itemsize


@dataclass(frozen=True)
class SharedPage:
    """The page of one cache tensor shared by ``members`` (the i-th layer of every KV-cache group)."""

    members: list[Attention]
    page: int           # bytes of a block in the key buffer, as many in the value buffer
    has_values: bool    # whether some member keeps values apart from its keys (not latent attention)

    @classmethod
    def of(cls, members: list[Attention], block_size: int, dtype: torch.dtype,
           in_model_dtype: bool = False) -> SharedPage:
        widest = dtype.itemsize if in_model_dtype else max(a.kv_cache_dtype(dtype).itemsize for a in members)
        page = max(page_bytes(a, block_size, dtype, in_model_dtype) for a in members)
        return cls(members, -(-page // widest) * widest, not all(a.values_in_key_cache for a in members))

    @property
    def block_bytes(self) -> int:
        """Bytes a block takes in this tensor: the padded key page and, if any, the value page."""
        return self.page * (2 if self.has_values else 1)

    def allocate(self, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
        """Zeroed byte buffers ``[num_blocks, page]``: the keys', then the values' (if any member needs them)."""
        return [torch.zeros(num_blocks, self.page, dtype=torch.uint8, device=device)
                for _ in range(2 if self.has_values else 1)]


def layer_view(buffer: torch.Tensor, attn: Attention, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``attn``'s cache ``[num_blocks, block_size, num_kv_heads, head_dim]`` in its cache dtype (for a model in
    ``dtype``) over the byte buffer ``[num_blocks, page]``: each block's first ``page_bytes`` bytes, in place."""
    entries = block_size * attn.num_kv_heads * attn.head_dim
    return buffer.view(attn.kv_cache_dtype(dtype))[:, :entries].unflatten(
        1, (block_size, attn.num_kv_heads, attn.head_dim))
