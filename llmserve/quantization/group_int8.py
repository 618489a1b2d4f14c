"""Group-quantised weights run through int8 dot products, their layout, reference and matmul.

A weight is one or more row segments (a fused layer's projections may come in different formats: a GGUF
Q4_K_M file stores some ``v_proj`` as Q6_K beside a Q4_K ``q_proj``), each ``W = s * q + m`` per group of 16
or 32 columns with 4-, 6- or 8-bit unsigned codes, ``s`` and ``m`` kept in the file's own compact form (fp16 per
block, integer factors per group: :class:`~llmserve.quantization.gguf_blocks.GroupCodes`), so a decode step
streams about the file's bytes.
Each call quantises the activations once, per row and block of 32 columns to int8 (as llama.cpp's Q8_0),
and every segment multiplies them into its columns of the output
(``csrc/cpu_group_int8_linear.c``: ``sum_g s * xscale * dot(q, xq) + m * xscale * sum(xq)``, which is the
quantised activations times ``W``). Without the compiled kernels :func:`group_int8_reference` computes the same
in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.cpu_group_int8 import ACTIVATION_BLOCK, TILE, LayerPlan, group_int8_kernels
from llmserve.layers.cpu_kernels import kernels_for
from llmserve.quantization.gguf_blocks import GroupCodes


class GroupInt8Segment(nn.Module):
    """``rows`` output rows in the kernel's layout: codes [tiles, 2 * bits * k] bytes, per tile of 16 rows (rows
    past ``rows``: zero). 8-bit codes: 64 bytes per step of 4 columns (byte ``4 r + j``: row r, column j). 4-bit
    codes: 64 bytes per 8 columns, the first 4 in the low nibbles. 6-bit codes take 6 bits, not a byte (Q6_K is
    the LM head of a Q4_K_M file): 192 bytes per 16 columns, their low 4 bits as two 4-bit steps, then a 2-bit
    plane whose bits ``2 s, 2 s + 1`` are the top bits of step s's codes. The scale factors per tile too: ``d``
    and ``m`` [tiles, blocks, 16] fp16, ``sc`` and ``mins`` [tiles, k / group, 16]."""

    def __init__(self, weight: GroupCodes) -> None:
        super().__init__()
        rows, k = weight.codes.shape
        if (weight.bits not in (4, 6, 8) or weight.group not in (16, 32) or k % ACTIVATION_BLOCK
                or weight.per_block < 1 or weight.per_block & (weight.per_block - 1)
                or k % (weight.group * weight.per_block)
                or (weight.codes.size and int(weight.codes.max()) >> weight.bits)):
            raise ValueError(f"group_int8: {weight.bits}-bit codes in groups of {weight.group} over {k} columns "
                             f"in blocks of {weight.per_block} (codes below 2^bits for 4, 6 or 8 bits, groups of 16 "
                             f"or 32, blocks of a power of 2 groups, a multiple of {ACTIVATION_BLOCK} columns and of "
                             f"the blocks' {weight.group * weight.per_block})")
        self.rows, self.k, self.bits, self.group = rows, k, weight.bits, weight.group
        self.per_block, self.zero = weight.per_block, weight.zero
        pad = -rows % TILE
        codes = F.pad(torch.from_numpy(weight.codes), (0, 0, 0, pad))
        tiles = codes.shape[0] // TILE
        if weight.bits == 8:
            tiled = codes.view(tiles, TILE, k // 4, 4).transpose(1, 2).reshape(tiles, -1)
        elif weight.bits == 4:
            tiled = _nibble_steps(codes)
        else:
            tops = (codes >> 4).view(tiles, TILE, k // 16, 4, 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8
                                                                                   ).view(4, 1)
            plane = (tops[:, :, :, 0] | tops[:, :, :, 1] | tops[:, :, :, 2] | tops[:, :, :, 3]).transpose(1, 2)
            tiled = torch.cat([_nibble_steps(codes & 15).view(tiles, k // 16, 2 * 4 * TILE),
                               plane.reshape(tiles, k // 16, 4 * TILE)], dim=2).reshape(tiles, -1)
        self.register_buffer("codes", tiled.contiguous(), persistent=False)
        for name in ("d", "sc", "m", "mins"):
            values = getattr(weight, name)
            tiled = None if values is None else (F.pad(torch.from_numpy(values), (0, 0, 0, pad))
                                                 .view(tiles, TILE, -1).transpose(1, 2).contiguous())
            self.register_buffer(name, tiled, persistent=False)

    def _per_group(self, per_block: torch.Tensor, factors: torch.Tensor | None) -> torch.Tensor:
        """[tiles, blocks, 16] fp16 times [tiles, groups, 16] integers -> float32 [tiles * 16, groups] (exact)."""
        values = per_block.float().transpose(1, 2).reshape(-1, per_block.shape[1])
        values = values.repeat_interleave(self.per_block, dim=1)
        return values if factors is None else values * factors.transpose(1, 2).reshape(values.shape).float()

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [rows, k] the stored codes stand for (``s * q + m``)."""
        tiles, k = self.codes.shape[0], self.k
        if self.bits == 8:
            codes = self.codes.view(tiles, k // 4, TILE, 4).transpose(1, 2).reshape(tiles * TILE, k)
        elif self.bits == 4:
            codes = _nibble_codes(self.codes, k)
        else:
            chunks = self.codes.view(tiles, k // 16, 3 * 4 * TILE)
            plane = chunks[:, :, 2 * 4 * TILE:].reshape(tiles, k // 16, TILE, 1, 4)
            tops = (plane >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 3   # [.., 16, step, 4]
            codes = (_nibble_codes(chunks[:, :, :2 * 4 * TILE].reshape(tiles, -1), k)
                     | (tops.transpose(1, 2).reshape(tiles * TILE, k) << 4))

        scales = self._per_group(self.d, self.sc)
        offsets = scales * -float(self.zero) if self.m is None else self._per_group(self.m, self.mins)
        return (scales.repeat_interleave(self.group, dim=1) * codes.float()
                + offsets.repeat_interleave(self.group, dim=1))[:self.rows]


def _nibble_steps(codes: torch.Tensor) -> torch.Tensor:
    """Codes below 16, [tiles * 16, k] -> [tiles, 8 * k]: per 8 columns, byte ``4 r + j`` holds row r's columns
    j (low nibble) and 4 + j (high nibble)."""
    rows, k = codes.shape
    pairs = codes.view(rows // TILE, TILE, k // 8, 2, 4)
    return (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).transpose(1, 2).reshape(rows // TILE, -1)


def _nibble_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`_nibble_steps`: [tiles, 8 * k] -> [tiles * 16, k]."""
    tiles = packed.shape[0]
    steps = packed.view(tiles, k // 8, TILE, 4).transpose(1, 2)
    return torch.stack([steps & 15, steps >> 4], dim=3).reshape(tiles * TILE, k)


def set_group_int8(layer: nn.Module, segments: list[GroupCodes]) -> None:
    """Store the row segments (in output order) on ``layer`` for :func:`apply_group_int8`."""
    widths = {s.codes.shape[1] for s in segments}
    if len(widths) != 1:
        raise ValueError(f"group_int8: the segments of one layer must share their inputs, got {sorted(widths)}")
    layer.group_int8_segments = nn.ModuleList(GroupInt8Segment(s) for s in segments)
    layer.group_int8_in = widths.pop()
    layer.group_int8_plan = LayerPlan(layer.group_int8_in, list(layer.group_int8_segments))


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of float32 ``x`` [M, k] as the kernel quantises them: int8 codes [M, k] and scales [M, k / 32]
    (``max|x| / 127`` per block, 1 for an all-zero block; round half to even)."""
    blocks = x.reshape(x.shape[0], -1, ACTIVATION_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(blocks / scale).clamp_(-127, 127)
    return q.reshape(x.shape).to(torch.int8), scale.squeeze(-1)


def group_int8_reference(x: torch.Tensor, segment: GroupInt8Segment, dtype: torch.dtype = torch.float64,
                         ) -> torch.Tensor:
    """The kernel's result computed in PyTorch: the activations quantised as the kernel quantises them, times
    the dequantised weight, in ``dtype`` (float64: the tests' oracle, exact but for the final rounding)."""
    q, scale = quantize_activations(x.float())
    x_deq = (q.to(dtype).view(x.shape[0], -1, ACTIVATION_BLOCK) * scale.to(dtype).unsqueeze(-1)).view(x.shape)
    return x_deq @ segment.dequantize().to(dtype).T


def apply_group_int8(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + bias`` for the segments :func:`set_group_int8` stored (float32 arithmetic; the result in
    ``x``'s dtype)."""
    rows = x.reshape(-1, layer.group_int8_in)
    if rows.dtype != torch.float32 or rows.stride(1) != 1:
        rows = rows.float().contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    kernels = kernels_for(rows)
    if kernels is None:
        out = torch.cat([group_int8_reference(rows, s, torch.float32) for s in layer.group_int8_segments], dim=1)
        out = out if bias is None else out + bias
    else:
        out = group_int8_kernels(kernels).layer(rows, layer.group_int8_plan, bias)
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])
