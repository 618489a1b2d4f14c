"""Multi-head latent attention (DeepSeek-V2/V3): the KV cache holds one compressed entry per token.

DeepSeek projects each token to a latent ``c`` (``kv_lora_rank`` dims, normalised) and one rotated key part
``k_pe`` (``qk_rope_head_dim`` dims) shared by every head; per-head keys and values are ``W_UK c`` and
``W_UV c`` (the two halves of ``kv_b_proj``). Attention can run on the latent itself ("absorbed weights"):

    score_h = q_nope_h . (W_UK_h c) + q_pe_h . k_pe = (W_UK_h^T q_nope_h) . c + q_pe_h . k_pe
    out_h   = sum_j p_hj W_UV_h c_j = W_UV_h (sum_j p_hj c_j)

so with ``q_h = [W_UK_h^T q_nope_h, q_pe_h]`` and one shared key ``[c, k_pe]`` per token it is multi-query
attention (one KV head of ``kv_lora_rank + qk_rope_head_dim`` dims), whose value is the leading
``kv_lora_rank`` dims of that same key. :class:`MLAAttention` stores ``[c, k_pe]`` once per token
(:attr:`~llmserve.layers.attention.layer.Attention.values_in_key_cache`: the value cache *is* the key cache)
and hands it to the ordinary paged backends as key and value; each head's output latent ``sum_j p_hj c_j`` is
the first ``kv_lora_rank`` dims of the result (the rope dims' share is discarded; the PyTorch backend stores and
gathers the shared cache once). Decodes, prefill chunks over cached context and fresh prompts all take this path,
so every backend feature (chunked prefill, prefix caching, preemption, the compiled CPU decode kernel, a quantised
cache: one scale, the key's, for the latent) serves MLA unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from llmserve.layers.attention.backend import AttentionBackend
from llmserve.layers.attention.layer import Attention
from llmserve.layers.linear import check_shape, copy_checked


class MLAAttention(Attention):
    values_in_key_cache = True

    def __init__(self, num_heads: int, kv_lora_rank: int, rope_dim: int, scale: float, *,
                 kv_cache_dtype: torch.dtype | str | None = None) -> None:
        """``num_heads``: this rank's query heads; ``scale``: the softmax scale of the full-size heads
        (``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, times YaRN's mscale squared), which the absorbed
        scores equal."""
        super().__init__(num_heads, 1, kv_lora_rank + rope_dim, scale, kv_cache_dtype=kv_cache_dtype)
        self.kv_lora_rank = kv_lora_rank

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, latent={self.kv_lora_rank}, rope={self.head_dim - self.kv_lora_rank}"

    def bind_cache(self, backend: AttentionBackend, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        if backend.name == "triton" and key_cache.numel():
            raise NotImplementedError(
                "multi-head latent attention (DeepSeek-V2/V3) is not implemented in the Triton attention backend; "
                "run it with LLMSERVE_ATTENTION_BACKEND=torch")
        super().bind_cache(backend, key_cache, value_cache)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, metadata: object) -> torch.Tensor:
        """``q`` [T, H, kv_lora_rank + rope] (absorbed queries), ``kv`` [T, kv_lora_rank + rope] (each token's
        latent and rotated ``k_pe``) -> each head's output latent [T, H, kv_lora_rank]."""
        assert self.backend is not None, "KV cache not allocated: call ModelRunner.allocate_kv_cache first"
        kv = kv.view(kv.shape[0], 1, self.head_dim)
        if self.calibrate_kv_scales:
            self.calibrate(kv, kv)
        out = self.backend.forward(q, kv, kv, self.key_cache, self.value_cache, metadata, self.spec, self.kv_scales)
        return out[..., :self.kv_lora_rank]


class LatentUpProjection(nn.Module):
    """``kv_b_proj``: the checkpoint's ``[heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]`` weight, this
    rank's heads of it. Absorbed attention never applies it as a linear layer: it reads the per-head factors
    :attr:`w_uk` and :attr:`w_uv` (views of the one weight)."""

    def __init__(self, kv_lora_rank: int, num_heads: int, nope_dim: int, v_dim: int, tp_rank: int,
                 tp_size: int) -> None:
        """``num_heads``: this rank's."""
        super().__init__()
        self.num_heads, self.nope_dim, self.v_dim = num_heads, nope_dim, v_dim
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(num_heads * (nope_dim + v_dim), kv_lora_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        check_shape(loaded, (rows * self.tp_size, param.shape[1]), "kv_b_proj.weight")
        copy_checked(param, loaded.narrow(0, self.tp_rank * rows, rows), "kv_b_proj.weight")

    def _per_head(self) -> torch.Tensor:
        return self.weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)

    @property
    def w_uk(self) -> torch.Tensor:
        """[H, qk_nope_head_dim, kv_lora_rank]: a head's no-rope key is ``w_uk[h] @ c``."""
        return self._per_head()[:, :self.nope_dim]

    @property
    def w_uv(self) -> torch.Tensor:
        """[H, v_head_dim, kv_lora_rank]: a head's value is ``w_uv[h] @ c``."""
        return self._per_head()[:, self.nope_dim:]

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """[T, H, qk_nope_head_dim] -> [T, H, kv_lora_rank]: ``W_UK_h^T q_nope_h``, to score against the latent."""
        return torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)

    def expand_output(self, latent: torch.Tensor) -> torch.Tensor:
        """[T, H, kv_lora_rank] -> [T, H * v_head_dim]: each head's output latent through ``W_UV_h``."""
        out = torch.bmm(latent.transpose(0, 1), self.w_uv.transpose(1, 2))   # [H, T, v]
        return out.transpose(0, 1).reshape(latent.shape[0], -1)
