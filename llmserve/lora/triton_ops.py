"""Triton kernels for the batched LoRA ops on GPU: segmented shrink and expand (Punica's SGMV).

The step's adapter rows, grouped by slot (:class:`~llmserve.lora.punica.LoRABatchMapping`), are laid out
once per step as segments: ``rows`` (token indices, one segment after another), and per segment its
start, length and slot. Each kernel runs the whole batch in one launch, grid ``(segment, row tile,
column tile)``: a program loads its rows through ``rows`` (no gathered copy) and multiplies them by its
slot's tile of the stacked weights (:func:`_rows_times_weight`, shared by both kernels). The shrink writes
``x A^T`` into a float32 buffer ``[tokens, S*R]`` (slot s: ``S * ranks[s]`` columns, projection i's at
``i * ranks[s]``); the expand adds, for each output column, its projection's ``ranks[s]`` columns of the
buffer times that projection's B (:class:`~llmserve.lora.punica.LoRAStack`'s layout: no block-diagonal
zeros; a column tile that straddles two projections multiplies once per projection it covers). Segments
are disjoint, so each output element has one writer. A slot of rank 0 does nothing. Tiles are multiplied
in float32 with IEEE products, whatever the model dtype: the deltas are small next to the base matmul,
and exact float32 lets the tests compare against a float64 reference.

The grid depends only on the number of segments and the longest one, and a program past its segment's end
(or on a slot of rank 0) does nothing, so a CUDA graph can capture the kernels over static buffers with room
for every slot and the captured batch size (:mod:`llmserve.lora.graph_inputs`), each replay writing its
step's segments into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmserve.lora.punica import LoRABatchMapping, LoRAStack

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@triton.jit
def _rows_times_weight(x_ptr, stride_xm, rows, mask_m, w_ptr, stride_wn, offs_n, mask_n, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``x[rows, :K] @ w[offs_n, :K]^T`` as a float32 ``[BLOCK_M, BLOCK_N]`` tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def _segment_rows(rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, ranks_ptr, BLOCK_M: tl.constexpr):
    """This program's segment: its slot, the slot's rank, the program's row tile (indices, mask), and whether
    the tile has work (rows of the segment, a slot of non-zero rank)."""
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    rows = tl.load(rows_ptr + start + offs_m, mask=mask_m, other=0)
    return slot, rank, rows, mask_m, (tl.program_id(1) * BLOCK_M < length) & (rank > 0)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, buf_ptr, rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, ranks_ptr, K,
                   stride_xm, stride_as, stride_ar, stride_bm, NUM_PROJECTIONS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    slot, rank, rows, mask_m, busy = _segment_rows(rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, ranks_ptr,
                                                   BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NUM_PROJECTIONS * rank
    if busy & (tl.program_id(2) * BLOCK_N < NUM_PROJECTIONS * rank):
        acc = _rows_times_weight(x_ptr, stride_xm, rows, mask_m, a_ptr + slot * stride_as, stride_ar, offs_n,
                                 mask_n, K, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.store(buf_ptr + rows[:, None] * stride_bm + offs_n[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _expand_kernel(buf_ptr, b_ptr, out_ptr, rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, ranks_ptr,
                   bounds_ptr, stride_bm, stride_bs, stride_bn, stride_om, NUM_PROJECTIONS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    slot, rank, rows, mask_m, busy = _segment_rows(rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, ranks_ptr,
                                                   BLOCK_M)
    if busy:
        first_n = tl.program_id(2) * BLOCK_N
        offs_n = first_n + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(NUM_PROJECTIONS):
            lo = tl.load(bounds_ptr + i)
            hi = tl.load(bounds_ptr + i + 1)
            if (first_n < hi) & (first_n + BLOCK_N > lo):   # the tile covers some of projection i's columns
                acc += _rows_times_weight(buf_ptr + i * rank, stride_bm, rows, mask_m, b_ptr + slot * stride_bs,
                                          stride_bn, offs_n, (offs_n >= lo) & (offs_n < hi), rank,
                                          BLOCK_M, BLOCK_N, BLOCK_K)
        mask = mask_m[:, None] & (offs_n < tl.load(bounds_ptr + NUM_PROJECTIONS))[None, :]
        out = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        base = tl.load(out, mask=mask, other=0.0)
        tl.store(out, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


@dataclass
class Segments:
    """A step's segments as device tensors: the adapter rows' token indices, and per segment its start in
    them, length and slot; ``max_length`` bounds every length (it sizes the grid)."""

    rows: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    slots: torch.Tensor
    max_length: int

    @classmethod
    def from_mapping(cls, mapping: LoRABatchMapping, device: torch.device) -> Segments:
        """A step's :class:`~llmserve.lora.punica.LoRABatchMapping` (built once per step, shared by every layer)."""
        rows = mapping.rows
        segments = mapping.segments
        return cls(torch.arange(mapping.num_tokens, device=device) if rows is None else rows.to(device),
                   torch.tensor([start for _, start, _ in segments], dtype=torch.long, device=device),
                   torch.tensor([end - start for _, start, end in segments], dtype=torch.long, device=device),
                   torch.tensor([slot for slot, _, _ in segments], dtype=torch.long, device=device),
                   max((end - start for _, start, end in segments), default=0))


def add_lora_segments(out: torch.Tensor, x: torch.Tensor, stack: LoRAStack, ranks: torch.Tensor,
                      bounds: torch.Tensor, segments: Segments) -> None:
    """``out[rows] += x[rows] A[slot]^T B[slot]^T`` (per projection) per segment; ``ranks`` (``stack.ranks``)
    and ``bounds`` (``stack.bounds``) on the device."""
    if segments.max_length == 0:
        return
    lora_a, lora_b = stack.a, stack.b
    assert x.stride(1) == 1 and out.stride(1) == 1 and lora_a.is_contiguous() and lora_b.is_contiguous()
    num_segments, width, projections = len(segments.slots), lora_a.shape[1], stack.num_projections
    buf = torch.empty(x.shape[0], width, dtype=torch.float32, device=x.device)
    m_tiles = triton.cdiv(segments.max_length, BLOCK_M)
    _shrink_kernel[(num_segments, m_tiles, triton.cdiv(width, BLOCK_N))](
        x, lora_a, buf, segments.rows, segments.starts, segments.lengths, segments.slots, ranks, x.shape[1],
        x.stride(0), lora_a.stride(0), lora_a.stride(1), buf.stride(0), NUM_PROJECTIONS=projections,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    _expand_kernel[(num_segments, m_tiles, triton.cdiv(out.shape[1], BLOCK_N))](
        buf, lora_b, out, segments.rows, segments.starts, segments.lengths, segments.slots, ranks, bounds,
        buf.stride(0), lora_b.stride(0), lora_b.stride(1), out.stride(0), NUM_PROJECTIONS=projections,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
