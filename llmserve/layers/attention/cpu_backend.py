"""The CPU fast path: the PyTorch backend with decodes through the compiled paged-decode kernel.

Rows with several query tokens (prompts, prefill chunks, speculative verification) stay on
``scaled_dot_product_attention`` (compute-bound, and oneDNN's kernel is good); decode rows, which are
bound by reading each sequence's KV blocks, go through ``llmserve_paged_decode_attention``
(``layers/csrc/cpu_attention.c``): it reads the blocks in place through the block table, once per KV head
for the whole query group, with no gathered copy and no padding, so sequences of any mix of lengths share
one call. The kernel takes the layer's sliding window, soft-cap and ALiBi slopes as arguments, so one
decode batch serves every layer of the step. It reads int8 and float8 caches too, converting each row in
registers as it reads it, with the layer's K and V scales folded into the scores and the output, and a
bfloat16 model's bfloat16 cache the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.layers.attention.alibi import alibi_slopes_tensor
from llmserve.layers.attention.backend import AttentionSpec, BatchLayout
from llmserve.layers.attention.torch_backend import TorchAttentionBackend
from llmserve.layers.attention.torch_kv_cache import KVCacheView
from llmserve.layers.cpu_kernels import CPUKernels


@dataclass
class DecodeBatch:
    seq_lens: torch.Tensor       # int32 [num_decodes]: context + the new token
    width: int                   # blocks of the longest decode
    # int32 [num_decodes, width], rows padded with 0: None in the length-derived piece every KV-cache group
    # shares, set in each group's.
    block_tables: torch.Tensor | None = None


class CPUAttentionBackend(TorchAttentionBackend):
    name = "cpu"
    decodes_depend_on_window = False   # the kernel skips the keys before each row's window itself

    def __init__(self, kernels: CPUKernels, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dtype)
        self.kernels = kernels

    def _decode_shape(self, layout: BatchLayout, device: torch.device, window: int | None) -> DecodeBatch:
        seq_lens = np.asarray(layout.context_lens[:layout.num_decodes], dtype=np.int32) + 1
        return DecodeBatch(torch.from_numpy(seq_lens), int(-(-seq_lens.max() // layout.block_size)))

    def _decode_tables(self, shape: DecodeBatch, layout: BatchLayout, device: torch.device) -> DecodeBatch:
        # columns past a sequence's blocks are 0
        tables = np.ascontiguousarray(layout.block_tables[:layout.num_decodes, :shape.width])
        return dataclasses.replace(shape, block_tables=torch.from_numpy(tables))

    def _attend_decodes(self, query: torch.Tensor, cache: KVCacheView, decodes: DecodeBatch, spec: AttentionSpec,
                        window: int | None, out: torch.Tensor) -> None:
        scales = (1.0, 1.0) if cache.format is None else (float(cache.k_scale), float(cache.v_scale))
        self.kernels.paged_decode_attention(query, cache.key_cache, cache.value_cache, decodes.block_tables,
                                            decodes.seq_lens, spec.scale, out, sliding_window=window,
                                            soft_cap=spec.logits_soft_cap,
                                            alibi_slopes=alibi_slopes_tensor(spec, query.device), kv_scales=scales)
