"""A small quantiser for GGUF's k-quant block formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), which the ``gguf``
package reads but cannot write, so that test files can hold them and the Q4_K_M mix llama.cpp's quantize makes.

Each follows the block layout of ggml's ``block_q2_K`` ... ``block_q6_K`` with a plain min/max
search per sub-block (llama.cpp refines its scales with an error search; for tests any valid block will do,
and ``gguf.dequantize`` reads them back). Rows of ``k`` columns, ``k`` a multiple of 256.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _super_blocks(weights: np.ndarray) -> np.ndarray:
    if weights.ndim != 2 or weights.shape[1] % QK_K:
        raise ValueError(f"k-quants take [rows, k] with k a multiple of {QK_K}, got {weights.shape}")
    return weights.astype(np.float32).reshape(-1, QK_K)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _min_max_block(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K's asymmetric sub-blocks of 32: ``x ~ d * sc * q - dmin * m`` with 6-bit ``sc``, ``m`` and
    codes 0..levels. Returns the fp16 ``d``, ``dmin`` (as bytes), ``sc``, ``m`` and the codes."""
    sub = blocks.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0.0)                     # the offset never shifts the range up
    span = (sub.max(axis=-1) - low) / levels
    d = (span.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (-low.min(axis=-1) / 63).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(span / d[:, None]), 0).clip(0, 63)
        m = np.where(dmin[:, None] > 0, np.rint(-low / dmin[:, None]), 0).clip(0, 63)
        step = (d[:, None] * sc)[..., None]
        q = np.where(step > 0, np.rint((sub + (dmin[:, None] * m)[..., None]) / step), 0).clip(0, levels)
    return _fp16_bytes(d), _fp16_bytes(dmin), sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)


def _pack_scales_mins(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> ggml's 12 bytes: bytes 0-3 scales 0-3 with the top 2 bits of scales 4-7
    above, bytes 4-7 the same for the mins, bytes 8-11 the low 4 bits of scales 4-7 and mins 4-7."""
    return np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1).astype(np.uint8)


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [blocks, 8, 32] -> 128 bytes: sub-block 2c in the low nibbles of bytes 32c.., 2c + 1 in the high."""
    low = q & 15
    return (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)


def quantize_q4_k(weights: np.ndarray) -> np.ndarray:
    """float [rows, k] -> Q4_K blocks, uint8 [rows, k / 256 * 144]."""
    blocks = _super_blocks(weights)
    d, dmin, sc, m, q = _min_max_block(blocks, 15)
    out = np.concatenate([d, dmin, _pack_scales_mins(sc, m), _low_nibbles(q)], axis=1)
    return out.reshape(weights.shape[0], -1)


def quantize_q5_k(weights: np.ndarray) -> np.ndarray:
    """float [rows, k] -> Q5_K blocks, uint8 [rows, k / 256 * 176]: the fifth bit of code j of sub-block i is
    bit i of byte j of ``qh``."""
    blocks = _super_blocks(weights)
    d, dmin, sc, m, q = _min_max_block(blocks, 31)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    out = np.concatenate([d, dmin, _pack_scales_mins(sc, m), qh, _low_nibbles(q)], axis=1)
    return out.reshape(weights.shape[0], -1)


def _symmetric_sub_blocks(weights: np.ndarray, half: int, max_scale: int) -> tuple[np.ndarray, ...]:
    """Q3_K/Q6_K's 16 symmetric sub-blocks of 16: ``x ~ d * sc * q`` with ``sc`` in 0..max_scale of one fp16 ``d``
    per super-block and codes ``q`` in -half..half - 1 (the largest magnitude at ``half - 1``). Returns ``d``
    (float32 [blocks]), ``sc`` [blocks, 16] and the codes stored as ``q + half`` (uint8 [blocks, 16, 16])."""
    sub = _super_blocks(weights).reshape(-1, 16, 16)
    span = np.abs(sub).max(axis=-1) / (half - 1)
    d = (span.max(axis=-1) / max_scale).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(span / d[:, None]), 0).clip(0, max_scale)
        step = (d[:, None] * sc)[..., None]
        q = (np.where(step > 0, np.rint(sub / step), 0).clip(-half, half - 1) + half).astype(np.uint8)
    return d, sc, q


def quantize_q6_k(weights: np.ndarray) -> np.ndarray:
    """float [rows, k] -> Q6_K blocks, uint8 [rows, k / 256 * 210]: 16 symmetric sub-blocks of 16 with int8
    scales of one fp16 ``d``, codes ``q + 32`` (q in -32..31) split into ``ql`` (low 4 bits) and ``qh``."""
    d, sc, q = _symmetric_sub_blocks(weights, 32, 127)
    halves = q.reshape(-1, 2, 128)                               # per half: codes 0-63 low, 64-127 high nibbles
    ql = (halves[:, :, :64] & 15) | ((halves[:, :, 64:] & 15) << 4)
    top = (halves >> 4).reshape(-1, 2, 4, 32)                    # bits 2t..2t+1 of qh: codes 32t..32t+31
    qh = (top << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]).sum(axis=2, dtype=np.uint8)
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                          _fp16_bytes(d)], axis=1)
    return out.reshape(weights.shape[0], -1)


def _two_bit_planes(q: np.ndarray) -> np.ndarray:
    """Codes [blocks, 256] (their low 2 bits) -> 64 bytes: code ``128 h + 32 j + b`` in bits ``2j..2j+1`` of
    byte ``32 h + b``, as Q2_K's and Q3_K's ``qs``."""
    planes = (q & 3).reshape(-1, 2, 4, 32) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return planes.sum(axis=2, dtype=np.uint8).reshape(-1, 64)


def quantize_q2_k(weights: np.ndarray) -> np.ndarray:
    """float [rows, k] -> Q2_K blocks, uint8 [rows, k / 256 * 84]: 16 asymmetric sub-blocks of 16,
    ``x ~ d * sc * q - dmin * m`` with 4-bit ``sc`` and ``m`` (byte ``sc | m << 4``) and codes 0..3."""
    blocks = _super_blocks(weights)
    sub = blocks.reshape(-1, 16, 16)
    low = np.minimum(sub.min(axis=-1), 0.0)
    span = (sub.max(axis=-1) - low) / 3
    d = (span.max(axis=-1) / 15).astype(np.float16).astype(np.float32)
    dmin = (-low.min(axis=-1) / 15).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(span / d[:, None]), 0).clip(0, 15).astype(np.uint8)
        m = np.where(dmin[:, None] > 0, np.rint(-low / dmin[:, None]), 0).clip(0, 15).astype(np.uint8)
        step = (d[:, None] * sc)[..., None]
        q = np.where(step > 0, np.rint((sub + (dmin[:, None] * m)[..., None]) / step), 0).clip(0, 3)
    out = np.concatenate([sc | (m << 4), _two_bit_planes(q.astype(np.uint8).reshape(-1, QK_K)), _fp16_bytes(d),
                          _fp16_bytes(dmin)], axis=1)
    return out.reshape(weights.shape[0], -1)


def quantize_q3_k(weights: np.ndarray) -> np.ndarray:
    """float [rows, k] -> Q3_K blocks, uint8 [rows, k / 256 * 110]: 16 symmetric sub-blocks of 16 with 6-bit
    scales ``sc - 32`` of one fp16 ``d`` and codes ``q`` in -4..3, stored as ``q + 4``: the low 2 bits in ``qs``
    and the third in ``hmask`` (bit ``i`` of byte ``b``: code ``32 i + b``); the scales' low nibbles in bytes
    0-7 (scale ``i`` low nibble of byte ``i``, ``8 + i`` the high one), their top 2 bits in bytes 8-11."""
    d, sc, q = _symmetric_sub_blocks(weights, 4, 31)
    q = q.reshape(-1, QK_K)
    stored = (sc + 32).astype(np.uint8)
    hmask = ((q >> 2).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    low = (stored[:, :8] & 15) | ((stored[:, 8:] & 15) << 4)
    high = ((stored >> 4).reshape(-1, 4, 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]).sum(
        axis=1, dtype=np.uint8)
    out = np.concatenate([hmask, _two_bit_planes(q), low, high, _fp16_bytes(d)], axis=1)
    return out.reshape(weights.shape[0], -1)


K_QUANTIZERS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k,
                "Q6_K": quantize_q6_k}


# llama.cpp's types for a tensor whose rows do not split into 256-column super-blocks.
_FALLBACKS = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# The mixes llama.cpp's quantize names after their main type: file type -> (main type, llama_ftype value).
MIXES = {"Q4_K_M": ("Q4_K", 15), "Q5_K_M": ("Q5_K", 17)}


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third in between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mix_tensor_type(file_type: str, gguf_name: str, layers: int, k: int) -> str:
    """The type llama.cpp's quantize gives tensor ``gguf_name`` (``blk.3.attn_v.weight``) of a ``file_type``
    (``Q4_K_M``: Q6_K for the output head and for ``attn_v``/``ffn_down`` in the layers that get more bits, Q5_K
    for a fused ``attn_qkv``, the main type elsewhere; a plain type: that type), falling back as llama.cpp does
    where ``k`` columns do not split into super-blocks."""
    chosen = file_type
    if file_type in MIXES:
        chosen = MIXES[file_type][0]
        layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
        if gguf_name == "output.weight":
            chosen = "Q6_K"
        elif ".attn_qkv." in gguf_name:
            chosen = "Q5_K"
        elif (".attn_v." in gguf_name or ".ffn_down." in gguf_name) and _more_bits(layer, layers):
            chosen = "Q6_K"
    return _FALLBACKS[chosen] if chosen in _FALLBACKS and k % QK_K else chosen


def quantize_tensor(weights: np.ndarray, type_name: str) -> np.ndarray:
    """float [rows, k] -> blocks of ``type_name``: the k-quants here, the rest through the ``gguf`` package."""
    if type_name in K_QUANTIZERS:
        return K_QUANTIZERS[type_name](weights)
    import gguf

    return gguf.quants.quantize(weights, gguf.GGMLQuantizationType[type_name])
