"""GGUF's block formats decoded into unsigned codes with the file's own scales, per group of columns.

Every type packed here reads as ``W[o, c] = s[o, g] * q[o, c] + m[o, g]`` with unsigned integer codes ``q``
(4 bits for Q4_0, Q4_1 and Q2_K to Q4_K; 6 for Q5_0, Q5_1, Q5_K and Q6_K and 8 for Q8_0, one a byte here; the
kernel's layout packs them below a byte) and
groups of 32 columns (16 for Q2_K, Q3_K and Q6_K, whose sub-blocks are 16 wide). ``s`` and ``m`` are kept as the
file holds them, so a packed weight takes about the file's bytes: an fp16 ``d`` per block (Q8_0 to Q5_1), or per super-block of 256
columns times an integer sub-block scale (k-quants); the offset is either the zero point of a signed format
times ``s`` (Q8_0: ``q + 128``, ``m = -128 s``; Q4_0, Q5_0, Q3_K, Q6_K), an fp16 ``m`` per block (Q4_1, Q5_1)
or an fp16 ``-dmin`` per super-block times an integer sub-block min (Q2_K, Q4_K, Q5_K). In float32 those
products are exact (fp16 times an integer of at most 8 bits), and ``s * q + m`` reproduces ``gguf.dequantize``
bit for bit (the one rounding is the same add).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256   # columns per k-quant super-block

# type name -> (bytes per block, columns per block, code bits, group)
BLOCK_LAYOUTS: dict[str, tuple[int, int, int, int]] = {
    "Q8_0": (34, 32, 8, 32), "Q4_0": (18, 32, 4, 32), "Q4_1": (20, 32, 4, 32), "Q5_0": (22, 32, 6, 32),
    "Q5_1": (24, 32, 6, 32), "Q2_K": (84, QK_K, 4, 16), "Q3_K": (110, QK_K, 4, 16), "Q4_K": (144, QK_K, 4, 32),
    "Q5_K": (176, QK_K, 6, 32), "Q6_K": (210, QK_K, 6, 16)}
PACKED_TYPES = tuple(BLOCK_LAYOUTS)


@dataclass(frozen=True)
class GroupCodes:
    """``W = s * codes + o`` per group of ``group`` columns, in blocks of ``per_block`` groups:
    ``s = d * sc`` and ``o = m * mins`` (``sc`` / ``mins`` None: 1, as when a block is one group), or
    ``o = -zero * s`` for a signed format (``m`` None).

    codes: uint8 [rows, k]; d and m: float16 [rows, blocks]; sc: int8 and mins: uint8 [rows, k / group];
    ``bits``: how many bits the codes need (4, 6 or 8)."""

    codes: np.ndarray
    d: np.ndarray
    sc: np.ndarray | None
    m: np.ndarray | None
    mins: np.ndarray | None
    zero: int
    bits: int
    group: int
    per_block: int = 1

    @property
    def scales(self) -> np.ndarray:
        """``s`` per row and group, float32 [rows, k / group] (exact)."""
        return _per_group(self.d, self.sc, self.per_block)

    @property
    def offsets(self) -> np.ndarray:
        """``o`` per row and group, float32 [rows, k / group] (exact)."""
        if self.m is None:
            return self.scales * np.float32(-self.zero)
        return _per_group(self.m, self.mins, self.per_block)

    def dequantize(self) -> np.ndarray:
        """The float32 weight the codes stand for (``gguf.dequantize``'s values exactly)."""
        scales = np.repeat(self.scales, self.group, axis=1)
        offsets = np.repeat(self.offsets, self.group, axis=1)
        return scales * self.codes.astype(np.float32) + offsets


def _per_group(per_block: np.ndarray, factors: np.ndarray | None, groups: int) -> np.ndarray:
    values = np.repeat(per_block.astype(np.float32), groups, axis=1)
    return values if factors is None else values * factors.astype(np.float32)


def row_bytes(type_name: str, k: int) -> int:
    """Bytes of one row of ``k`` columns in ``type_name``."""
    size, cols, _, _ = BLOCK_LAYOUTS[type_name]
    if k % cols:
        raise ValueError(f"{type_name} rows hold a multiple of {cols} columns, not {k}")
    return k // cols * size


def decode_rows(raw: np.ndarray, type_name: str, k: int) -> GroupCodes:
    """Rows of GGUF blocks (uint8 [rows, row_bytes]) of ``type_name`` -> their codes and scales."""
    size, cols, bits, group = BLOCK_LAYOUTS[type_name]
    rows = raw.shape[0]
    if raw.dtype != np.uint8 or raw.shape[1] != row_bytes(type_name, k):
        raise ValueError(f"{type_name}: {rows} rows of {k} columns take {row_bytes(type_name, k)} bytes each, got "
                         f"{raw.dtype} {raw.shape}")
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    codes, d, sc, m, mins, zero = _DECODERS[type_name](blocks)

    def per_row(values: np.ndarray | None, dtype: type) -> np.ndarray | None:
        return None if values is None else np.ascontiguousarray(values.astype(dtype).reshape(rows, -1))

    return GroupCodes(codes.astype(np.uint8).reshape(rows, k), per_row(d, np.float16), per_row(sc, np.int8),
                      per_row(m, np.float16), per_row(mins, np.uint8), zero, bits, group, cols // group)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte ``start`` of every block, [blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., 16 w] -> codes [..., 32 w]: low nibbles first, then high ones, per run of bytes."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Little-endian bit i of the uint32 ``qh`` [blocks, 1], for i < count: [blocks, count] of 0/1."""
    return ((qh >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)


def _q8_0(b: np.ndarray) -> tuple:
    return b[:, 2:].view(np.int8).astype(np.int16) + 128, _f16(b, 0), None, None, None, 128


def _q4_0(b: np.ndarray) -> tuple:
    return _nibbles(b[:, 2:]), _f16(b, 0), None, None, None, 8


def _q4_1(b: np.ndarray) -> tuple:
    return _nibbles(b[:, 4:]), _f16(b, 0), None, _f16(b, 2), None, 0


def _q5_0(b: np.ndarray) -> tuple:
    qh = np.ascontiguousarray(b[:, 2:6]).view(np.uint32)
    return _nibbles(b[:, 6:]) | (_high_bits(qh, 32) << 4), _f16(b, 0), None, None, None, 16


def _q5_1(b: np.ndarray) -> tuple:
    qh = np.ascontiguousarray(b[:, 4:8]).view(np.uint32)
    return _nibbles(b[:, 8:]) | (_high_bits(qh, 32) << 4), _f16(b, 0), None, _f16(b, 2), None, 0


def _two_bit_codes(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's 64 bytes of ``qs`` -> 256 two-bit codes: code ``128 h + 32 j + b`` is bits ``2j..2j+1`` of byte
    ``32 h + b``."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _q2_k(b: np.ndarray) -> tuple:
    """16 sub-blocks of 16: byte ``i`` of the first 16 holds scale ``i`` (low nibble) and min ``i`` (high);
    64 bytes of 2-bit codes; then ``d`` and ``dmin``: ``d * sc * q - dmin * m``."""
    sc = b[:, :16]
    return _two_bit_codes(b[:, 16:80]), _f16(b, 80), sc & 15, -_f16(b, 82), sc >> 4, 0


def _q3_k(b: np.ndarray) -> tuple:
    """32 bytes ``hmask`` (bit ``i`` of byte ``j``: code ``32 i + j``; set means the code is its low 2 bits, clear
    means those minus 4), 64 bytes of low 2 bits, 12 bytes of 6-bit scales (stored ``+ 32``; low nibbles of
    scales 0-7 and 8-15 in bytes 0-7, their top 2 bits in bytes 8-11), then ``d``: ``d * (sc - 32) * q`` with
    ``q`` in -4..3, here the code ``q + 4`` and the offset ``-4 d (sc - 32)``."""
    hbit = (b[:, :32][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    codes = _two_bit_codes(b[:, 32:96]) | (hbit.reshape(-1, QK_K) << 2)
    packed = b[:, 96:108]
    low = np.concatenate([packed[:, :8] & 15, packed[:, :8] >> 4], axis=1)
    high = (packed[:, None, 8:12] >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]) & 3
    return codes, _f16(b, 108), (low | (high.reshape(-1, 16) << 4)).astype(np.int16) - 32, None, None, 4


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> the 8 sub-blocks' 6-bit scales and mins: bytes 0-3 hold scales 0-3 (low 6 bits)
    and the top 2 bits of scales 4-7, bytes 4-7 the same for the mins, bytes 8-11 the low 4 bits of
    scales 4-7 (low nibble) and mins 4-7 (high nibble)."""
    lo, mid, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales, mins


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes: 4 runs of 32, each the low nibbles of one sub-block then the high of the next."""
    return _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, QK_K)


def _q4_k(b: np.ndarray) -> tuple:
    scales, mins = _k_scales_mins(b[:, 4:16])
    return _k_low_nibbles(b[:, 16:]), _f16(b, 0), scales, -_f16(b, 2), mins, 0


def _q5_k(b: np.ndarray) -> tuple:
    scales, mins = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]                                     # bit i of byte j: code j of sub-block i
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _k_low_nibbles(b[:, 48:]) | (high.reshape(-1, QK_K) << 4), _f16(b, 0), scales, -_f16(b, 2), mins, 0


def _q6_k(b: np.ndarray) -> tuple:
    """Two halves of 128 codes: low 4 bits from 64 bytes of ``ql`` (low nibbles: codes 0-63, high: 64-127),
    top 2 bits from 32 bytes of ``qh`` (bits 2t..2t+1: codes 32t..32t+31); 16 int8 scales; then ``d``."""
    ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 1, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=-1)                               # [blocks, 2, 128]
    high = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3).reshape(-1, 2, 128)
    return (low | (high << 4)).reshape(-1, QK_K), _f16(b, 208), b[:, 192:208].view(np.int8), None, None, 32


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k,
             "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
