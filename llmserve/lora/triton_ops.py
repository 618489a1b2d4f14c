"""Triton kernels for the batched LoRA ops on GPU: segmented shrink and expand (Punica's SGMV).

The step's adapter rows, grouped by slot (:class:`~llmserve.lora.punica.LoRABatchMapping`), are laid out
once per step as segments: ``rows`` (token indices, one segment after another), and per segment its
start, length and slot. Each kernel runs the whole batch in one launch, grid ``(segment, row tile,
column tile)``: a program loads its rows of ``x`` through ``rows`` (no gathered copy), its slot's tile of
the stacked A or B, and multiplies. The shrink writes ``x A^T`` into a float32 buffer ``[tokens, R]``;
the expand adds ``buffer B^T`` into the base output in place (segments are disjoint, so each output
element has one writer). A layer's slot ``s`` uses the first ``ranks[s]`` columns (0: the program does
nothing). Tiles are multiplied in float32 with IEEE products, whatever the model dtype: the deltas are
small next to the base matmul, and exact float32 lets the tests compare against a float64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.lora.punica import LoRABatchMapping

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, buf_ptr, rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, ranks_ptr, K,
                   stride_xm, stride_as, stride_ar, stride_bm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < length
    mask_n = offs_n < rank
    rows = tl.load(rows_ptr + start + offs_m, mask=mask_m, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptr + slot * stride_as + offs_n[None, :] * stride_ar + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    tl.store(buf_ptr + rows[:, None] * stride_bm + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _expand_kernel(buf_ptr, b_ptr, out_ptr, rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, ranks_ptr, N,
                   stride_bm, stride_bs, stride_bn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < length
    mask_n = offs_n < N
    rows = tl.load(rows_ptr + start + offs_m, mask=mask_m, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, rank, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < rank
        h = tl.load(buf_ptr + rows[:, None] * stride_bm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(h, b.to(tl.float32), input_precision="ieee")
    mask = mask_m[:, None] & mask_n[None, :]
    out = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    base = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


class Segments:
    """A step's :class:`~llmserve.lora.punica.LoRABatchMapping` as device tensors (built once per step,
    shared by every layer)."""

    def __init__(self, mapping: LoRABatchMapping, device: torch.device) -> None:
        rows = mapping.rows
        self.rows = torch.arange(mapping.num_tokens, device=device) if rows is None else rows.to(device)
        segments = mapping.segments
        self.starts = torch.tensor([start for _, start, _ in segments], dtype=torch.long, device=device)
        self.lengths = torch.tensor([end - start for _, start, end in segments], dtype=torch.long, device=device)
        self.slots = torch.tensor([slot for slot, _, _ in segments], dtype=torch.long, device=device)
        self.max_length = max((end - start for _, start, end in segments), default=0)


def add_lora_segments(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      ranks: torch.Tensor, segments: Segments) -> None:
    """``out[rows] += x[rows] A[slot]^T B[slot]^T`` per segment; ``ranks`` [slots] on the device."""
    if segments.max_length == 0:
        return
    assert x.stride(1) == 1 and out.stride(1) == 1 and lora_a.is_contiguous() and lora_b.is_contiguous()
    num_segments, width = len(segments.slots), lora_a.shape[1]
    buf = torch.empty(x.shape[0], width, dtype=torch.float32, device=x.device)
    m_tiles = triton.cdiv(segments.max_length, BLOCK_M)
    _shrink_kernel[(num_segments, m_tiles, triton.cdiv(width, BLOCK_N))](
        x, lora_a, buf, segments.rows, segments.starts, segments.lengths, segments.slots, ranks, x.shape[1],
        x.stride(0), lora_a.stride(0), lora_a.stride(1), buf.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    _expand_kernel[(num_segments, m_tiles, triton.cdiv(out.shape[1], BLOCK_N))](
        buf, lora_b, out, segments.rows, segments.starts, segments.lengths, segments.slots, ranks, out.shape[1],
        buf.stride(0), lora_b.stride(0), lora_b.stride(1), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
