"""Device code the paged-attention kernels share: one KV tile of flash attention (gather through the block
table, dequantise, score, cap, bias, online softmax) and its helpers."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Whether the kernels below are defined for the Triton interpreter (``@triton.jit`` decides when it runs).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED and type(tl.zeros).__name__ == "JITFunction":
    # triton.language's own jitted helpers (tl.zeros, tl.cdiv, ...) were defined for the compiler: the
    # interpreter would fail inside every kernel with "Cannot call @triton.jit'd outside of the scope of a kernel".
    raise ImportError("TRITON_INTERPRET=1 was set after triton had been imported; set it before the first "
                      "`import triton` of the process")


def pow2_at_least(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


# KV_FORMAT codes: a cache of the model's dtype, int8, float8 e4m3 (bytes), float8 e5m2 (bytes).
KV_PLAIN, KV_INT8, KV_FP8_E4M3, KV_FP8_E5M2 = 0, 1, 2, 3


@triton.jit
def _fp8_to_float(x, M_BITS: tl.constexpr, BIAS: tl.constexpr):
    """float8 bytes (sign, exponent, ``M_BITS`` mantissa bits, exponent bias ``BIAS``) as float32: the fields
    move into float32's with the bias changed (exact for normal numbers); a subnormal (exponent field 0) then
    reads as 2^-BIAS (1 + m 2^-M_BITS) where it means 2 (that - 2^-BIAS). NaN / infinity codes are never written."""
    x = x.to(tl.int32)
    mag = x & 0x7F
    v = ((mag << (23 - M_BITS)) + ((127 - BIAS) << 23)).to(tl.float32, bitcast=True)
    v = tl.where((mag >> M_BITS) == 0, (v - tl.exp2(-BIAS * 1.0)) * 2.0, v)
    return tl.where((x & 0x80) != 0, -v, v)


@triton.jit
def _dequantize(x, dtype, KV_FORMAT: tl.constexpr):
    """A loaded K/V tile as ``dtype`` (the queries'), unscaled: exact, since int8 and float8 values are
    representable in float16, bfloat16 and float32."""
    if KV_FORMAT == 1:
        x = x.to(tl.float32)
    elif KV_FORMAT == 2:
        x = _fp8_to_float(x, 3, 7)
    elif KV_FORMAT == 3:
        x = _fp8_to_float(x, 2, 15)
    return x.to(dtype)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with a float32 accumulator. ``UPCAST`` (set only under the Triton interpreter for
    bfloat16, whose CPU emulation of ``tl.dot`` mishandles bfloat16 operands) multiplies the exact float32
    images of the operands instead, which gives the same products."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _soft_cap(s, CAP: tl.constexpr):
    """``CAP * tanh(s / CAP)`` (any units: scores here are in log2 units, with ``CAP`` scaled to match),
    as ``sign(y) (1 - e) / (1 + e)`` with ``e = exp(-2 |y|)`` <= 1: no overflow, and within a few float32
    ulps of ``CAP`` (the Triton interpreter has no ``tanh``)."""
    y = s / CAP
    e = tl.exp2(tl.abs(y) * -2.8853900817779268)   # exp(-2 |y|) = 2^(-2 log2(e) |y|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t) * CAP


@triton.jit
def attend_kv_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, offs_n, n_mask, keep, kv_head, offs_d,
                   d_mask, scale_log2, slopes, q_pos, stride_c_block, stride_c_slot, stride_c_head,
                   BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   SOFT_CAP: tl.constexpr, USE_ALIBI: tl.constexpr, MAY_BE_EMPTY: tl.constexpr,
                   KV_FORMAT: tl.constexpr):
    """One KV tile of flash attention, shared by prefill and decode: gather the tile's K/V rows through the
    block table, score the queries against them (``keep`` masks scores out), and fold the tile into the
    running max ``m_i``, sum ``l_i`` and unnormalised output ``acc`` (all float32).

    ``scale_log2`` includes a quantised cache's K scale; ``KV_FORMAT``: the caches' entries (see
    :func:`_dequantize`). ``SOFT_CAP`` (log2 units, 0 = none) caps the scores before the mask; with
    ``USE_ALIBI``, each row adds
    ``slopes`` (its head's, log2 units) times the distance from its query position ``q_pos`` to each key
    after the cap. ``MAY_BE_EMPTY``: a row may have
    no key kept in this tile nor before it (a sliding window that starts past the tile); its maximum stays
    -inf and it is left at zero instead of computing ``exp2(-inf - -inf)``."""
    blocks = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    kv_off = blocks * stride_c_block + (offs_n % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0)
    if KV_FORMAT != 0:
        k = _dequantize(k, q.dtype, KV_FORMAT)
    s = dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
    if SOFT_CAP > 0:
        s = _soft_cap(s, SOFT_CAP)
    if USE_ALIBI:
        s = s + slopes[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MAY_BE_EMPTY:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)   # such a row's p and alpha are then exp2(-inf) = 0
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0)
    if KV_FORMAT != 0:
        v = _dequantize(v, q.dtype, KV_FORMAT)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc
