"""Hand-written CPU kernels (``layers/csrc/*.c``), compiled for this machine on first use.

Places where PyTorch's CPU kernels leave most of the machine idle at decode time:

* linear layers: on a handful of rows a matrix-vector product bound by how fast the weights stream
  from memory (oneDNN's GEMV streams at ~85% of what a plain read of the same bytes does, MKL's at a
  third to a half), on many rows a GEMM that oneDNN runs ~5% slower on a plain weight than on a
  prepacked copy; ``cpu_linear.c`` keeps one copy, blocked as [out/16, in, 16] at load (see
  :func:`block_weight`), and streams it at the speed of a plain read or multiplies it at the
  prepacked speed;
* paged decode attention done with PyTorch ops gathers every sequence's KV blocks into a padded copy
  and then runs a one-query SDPA over it; the kernel reads each sequence's blocks in place, once per
  KV head for the whole query group (``cpu_attention.c``);
* bfloat16 linear layers: oneDNN's bf16 GEMV is no faster than its float32 one although it reads half the
  bytes; ``cpu_bf16_linear.c`` keeps the weight blocked in pairs (:func:`block_weight`) for AVX512-BF16's
  dot-product instruction (float32 FMAs on widened weights on CPUs without it) and runs register tiles
  over it for any number of rows; a weight that stays row-major (a tied LM head) feeds the same instruction;
* linear layers on quantised weights kept packed (4-bit, 8-bit and fp8 codes with per-group scales,
  dequantised in registers: ``cpu_quant_linear.c``; int8 x int8 with VNNI where the CPU has it:
  ``cpu_w8a8_linear.c``; GGUF's block formats as 4-/8-bit codes with a scale and an offset per group, times
  activations quantised per 32 columns, through int8 dot products: ``cpu_group_int8_linear.c``, bound in
  :mod:`llmserve.layers.cpu_group_int8`);
* the small per-layer ops (RMSNorm with the residual add, SiLU-and-multiply, rotary embedding) are
  each many tensor ops whose fixed costs dominate at small batch; each is one pass here
  (``cpu_layer_ops.c``);
* mixture-of-experts layers: every expert's GEMM in one call per projection, and the sorting of rows by expert
  and the weighted sum back into tokens one call each (``cpu_grouped_linear.c``, ``cpu_moe_rows.c``, bound in
  :mod:`llmserve.layers.cpu_moe_kernels`);
* the sampler's row reductions over [rows, vocab] logits (log-sum-exp, argmax) take several passes and a
  full-size temporary in PyTorch; one pass per row here (``cpu_sampling.c``).

The library is built for this machine by :mod:`llmserve.layers.cpu_kernel_build`; without a compiler, or
with ``LLMSERVE_CPU_KERNELS=0``, llmserve logs why and uses the PyTorch paths: same results, slower decode.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

from llmserve.layers.cpu_kernel_build import CPUKernelsUnavailable, build_library

logger = logging.getLogger(__name__)

CPU_KERNELS_ENV = "LLMSERVE_CPU_KERNELS"
INT8_DOT_PATHS = ("portable", "AVX2", "AVX-512 VNNI")   # by the int8 kernels' *_dot_path() numbers
_P = ctypes.c_void_p
_L = ctypes.c_long
_I = ctypes.c_int
_F = ctypes.c_float
# The KV-cache entry formats of llmserve_paged_decode_attention (its kv_format codes).
_KV_FORMATS = {torch.float32: 0, torch.int8: 3, torch.bfloat16: 4,
               **({torch.float8_e4m3fn: 1, torch.float8_e5m2: 2} if hasattr(torch, "float8_e5m2") else {})}


class CPUKernels:
    """Typed entry points of the compiled library. Every function takes float32 CPU tensors unless it says
    otherwise (the attention caches may also be quantised or bfloat16)."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        lib.llmserve_linear_small_batch.argtypes = [_P, _L, _P, _P, _P, _L, _L, _L, _L, _I]
        lib.llmserve_linear_small_batch.restype = _I
        lib.llmserve_linear_max_rows.restype = _I
        lib.llmserve_linear_blocked.argtypes = [_P, _L, _P, _P, _P, _L, _L, _L, _L, _I]
        lib.llmserve_linear_blocked.restype = _I
        lib.llmserve_bf16_linear_blocked.argtypes = [_P, _L, _P, _P, _P, _L, _L, _L, _L, _I]
        lib.llmserve_bf16_linear_blocked.restype = _I
        lib.llmserve_bf16_linear_rowmajor.argtypes = lib.llmserve_bf16_linear_blocked.argtypes
        lib.llmserve_bf16_linear_rowmajor.restype = None
        lib.llmserve_bf16_uses_dpbf16.restype = _I
        lib.llmserve_bf16_uses_amx.restype = _I
        lib.llmserve_linear_weight_only.argtypes = [_P, _L, _P, _L, _P, _P, _P, _P, _L, _L, _L, _L, _L, _I, _I]
        lib.llmserve_linear_weight_only.restype = _I
        lib.llmserve_linear_w8a8.argtypes = [_P, _L, _P, _L, _P, _P, _P, _P, _L, _L, _L, _L, _I]
        lib.llmserve_linear_w8a8.restype = _I
        lib.llmserve_w8a8_dot_path.restype = _I
        lib.llmserve_dequantize_blocked.argtypes = [_P, _L, _P, _P, _L, _L, _L, _I, _P, _I]
        lib.llmserve_dequantize_blocked.restype = _I
        lib.llmserve_linear_weight_only_gemm.argtypes = lib.llmserve_linear_weight_only.argtypes
        lib.llmserve_linear_weight_only_gemm.restype = _I
        lib.llmserve_paged_decode_attention.argtypes = [_P, _L, _P, _P, _P, _L, _P, _L, _L, _L, _L, _L, _L, _F, _L,
                                                        _F, _P, _P, _L, _I, _I, _F, _F]
        lib.llmserve_paged_decode_attention.restype = _I
        lib.llmserve_rms_norm.argtypes = [_P, _L, _P, _L, _P, _F, _P, _L, _P, _L, _L, _L, _I, _I, _I]
        lib.llmserve_rms_norm.restype = None
        lib.llmserve_silu_and_mul.argtypes = [_P, _L, _P, _L, _L, _L, _I, _I]
        lib.llmserve_silu_and_mul.restype = None
        lib.llmserve_rotary_embedding.argtypes = [_P, _L, _L, _P, _L, _L, _L, _L, _P, _P, _P, _L, _L, _I, _I]
        lib.llmserve_rotary_embedding.restype = _I
        lib.llmserve_logsumexp_rows.argtypes = [_P, _L, _P, _L, _L, _I]
        lib.llmserve_logsumexp_rows.restype = None
        lib.llmserve_argmax_rows.argtypes = [_P, _L, _P, _L, _L, _I]
        lib.llmserve_argmax_rows.restype = None
        self._lib = lib
        self.library = lib   # the loaded library, for the entry points bound elsewhere (cpu_moe_kernels.py, cpu_group_int8.py)
        self.max_linear_rows: int = lib.llmserve_linear_max_rows()
        self.w8a8_dot_path: str = INT8_DOT_PATHS[lib.llmserve_w8a8_dot_path()]
        self.bf16_uses_dpbf16: bool = bool(lib.llmserve_bf16_uses_dpbf16())
        self.bf16_uses_amx: bool = bool(lib.llmserve_bf16_uses_amx())   # bfloat16 linears on AMX tiles

    def linear_small_batch(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ weight.T + bias`` for a 2-D ``x`` of at most ``max_linear_rows`` rows (unit stride
        along the last dim) and a contiguous ``weight`` [out, in]."""
        rows, k = x.shape
        n = weight.shape[0]
        if not weight.is_contiguous() or weight.shape[1] != k or (bias is not None and not bias.is_contiguous()):
            raise ValueError(f"linear_small_batch: weight {tuple(weight.shape)} must be contiguous [out, {k}]")
        out = torch.empty(rows, n, dtype=torch.float32)
        status = self._lib.llmserve_linear_small_batch(
            x.data_ptr(), x.stride(0), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
            out.data_ptr(), n, rows, n, k, torch.get_num_threads())
        if status != 0:
            raise ValueError(f"linear_small_batch takes 1..{self.max_linear_rows} rows, got {rows}")
        return out

    def linear_blocked(self, x: torch.Tensor, blocked_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` for a 2-D ``x`` (unit stride along the last dim), any number of rows, with
        ``W`` given as :func:`block_weight` made it."""
        rows, k = x.shape
        _check_rows(x, k, "x")
        blocks, k_w, lanes = blocked_weight.shape
        if lanes != WEIGHT_BLOCK or k_w != k or not blocked_weight.is_contiguous() \
                or (bias is not None and not bias.is_contiguous()):
            raise ValueError(f"linear_blocked: weight {tuple(blocked_weight.shape)} is not a contiguous "
                             f"[out/{WEIGHT_BLOCK}, {k}, {WEIGHT_BLOCK}] blocked weight")
        n = blocks * WEIGHT_BLOCK
        out = torch.empty(rows, n, dtype=torch.float32)
        self._lib.llmserve_linear_blocked(
            x.data_ptr(), x.stride(0), blocked_weight.data_ptr(), bias.data_ptr() if bias is not None else None,
            out.data_ptr(), n, rows, n, k, torch.get_num_threads())
        return out

    def linear_bf16(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` in bfloat16 (float32 sums) for a 2-D bfloat16 ``x`` (unit stride along the last dim),
        any number of rows, with ``W`` blocked in pairs as :func:`block_weight` makes it from bfloat16, or plain
        row-major ``[out, in]`` (a weight that must keep its layout: a tied LM head, any ``out``)."""
        rows, k = x.shape
        _check_rows(x, k, "x", torch.bfloat16)
        blocked = weight.dim() == 4
        n = weight.shape[0] * WEIGHT_BLOCK if blocked else weight.shape[0]
        layout = (n // WEIGHT_BLOCK, (k + 1) // 2, WEIGHT_BLOCK, 2) if blocked else (n, k)
        bias_ok = bias is None or (bias.shape == (n,) and bias.is_contiguous() and bias.dtype == torch.bfloat16)
        if tuple(weight.shape) != layout or weight.dtype != torch.bfloat16 or not weight.is_contiguous() or not bias_ok:
            raise ValueError(f"linear_bf16: weight {tuple(weight.shape)} {weight.dtype} is not a contiguous bfloat16 "
                             f"[out/{WEIGHT_BLOCK}, {(k + 1) // 2}, {WEIGHT_BLOCK}, 2] or [out, {k}] weight, or the "
                             f"bias is not bfloat16 [out]")
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        run = self._lib.llmserve_bf16_linear_blocked if blocked else self._lib.llmserve_bf16_linear_rowmajor
        run(x.data_ptr(), x.stride(0), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
            out.data_ptr(), n, rows, n, k, torch.get_num_threads())
        return out

    def linear_weight_only(self, x: torch.Tensor, codes: torch.Tensor, code_format: int, scales: torch.Tensor,
                           zeros: torch.Tensor | None, group: int, in_features: int,
                           bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` for ``W[i, j] = scales[i, j // group] * (code(i, j) - zeros[i, j // group])``
        with the codes as :mod:`llmserve.quantization.packed` lays them out (uint8 rows; ``code_format`` 4, 8
        or 9 for 4-bit, 8-bit and float8 e4m3 codes); scales and zeros float32 [out, groups]. Up to
        ``max_linear_rows`` rows stream the packed weight, dequantising in registers; more rows (with outputs a
        multiple of 16) dequantise it panel by panel into cache for the float GEMM tiles."""
        rows, k = x.shape
        _check_rows(x, in_features, "x")
        n = codes.shape[0]
        for t in (codes, scales, zeros, bias):
            if t is not None and not t.is_contiguous():
                raise ValueError("linear_weight_only: codes, scales, zeros and bias must be contiguous")
        out = torch.empty(rows, n, dtype=torch.float32)
        many = rows > self.max_linear_rows and n % WEIGHT_BLOCK == 0
        status = (self._lib.llmserve_linear_weight_only_gemm if many else self._lib.llmserve_linear_weight_only)(
            x.data_ptr(), x.stride(0), codes.data_ptr(), codes.shape[1], scales.data_ptr(),
            zeros.data_ptr() if zeros is not None else None, bias.data_ptr() if bias is not None else None,
            out.data_ptr(), n, rows, n, k, group, code_format, torch.get_num_threads())
        if status == -2:
            raise MemoryError("linear_weight_only: no memory for the group sums of x or the dequantised panel")
        if status != 0:
            raise ValueError(f"linear_weight_only: format {code_format} or group {group} (k={k}) is not supported")
        return out

    def dequantize_blocked(self, codes: torch.Tensor, code_format: int, scales: torch.Tensor,
                           zeros: torch.Tensor | None, group: int, in_features: int) -> torch.Tensor:
        """The float32 weight of :meth:`linear_weight_only`'s operands, blocked as :func:`block_weight` makes it:
        what its many-row path multiplies, panel by panel (the outputs must be a multiple of 16)."""
        n = codes.shape[0]
        out = torch.empty(n // WEIGHT_BLOCK, in_features, WEIGHT_BLOCK, dtype=torch.float32)
        status = self._lib.llmserve_dequantize_blocked(
            codes.data_ptr(), codes.shape[1], scales.data_ptr(), zeros.data_ptr() if zeros is not None else None,
            n, in_features, group, code_format, out.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise ValueError(f"dequantize_blocked: format {code_format}, group {group} or {n} outputs (a multiple "
                             f"of {WEIGHT_BLOCK}) is not supported")
        return out

    def linear_w8a8(self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    weight_compensation: torch.Tensor, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` with x quantised per row to int8 on the fly; ``weight`` int8 [out, k padded to
        64], ``weight_scale`` float32 [out], ``weight_compensation`` int32 [out] = 128 * row sums."""
        rows, k = x.shape
        _check_rows(x, in_features, "x")
        n, kp = weight.shape
        out = torch.empty(rows, n, dtype=torch.float32)
        status = self._lib.llmserve_linear_w8a8(
            x.data_ptr(), x.stride(0), weight.data_ptr(), kp, weight_scale.data_ptr(), weight_compensation.data_ptr(),
            bias.data_ptr() if bias is not None else None, out.data_ptr(), n, rows, n, k, torch.get_num_threads())
        if status == -2:
            raise MemoryError("linear_w8a8: no memory for the quantised activations")
        if status != 0:
            raise ValueError(f"linear_w8a8: weight rows of {kp} bytes must be a multiple of 64 and >= {k}")
        return out

    def paged_decode_attention(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               out: torch.Tensor, *, sliding_window: int | None = None,
                               soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                               kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
        """One query token per sequence over its paged context, written into ``out`` [B, H, D].

        ``query`` [B, H, D] (head and dim contiguous), caches ``[num_blocks, block_size, KV, D]``
        contiguous within each block (blocks may lie further apart: a padded page,
        :mod:`llmserve.worker.kv_cache_pages`; keys' and values' alike), ``block_tables`` int32 [B, max_blocks],
        ``seq_lens`` int32 [B] (tokens to attend, the new one included). ``sliding_window``: attend only each
        sequence's last ``sliding_window`` tokens; ``soft_cap``: scores become ``soft_cap * tanh(scores / soft_cap)`` before the softmax;
        ``alibi_slopes``: float32 [H], ``slope * (key_position - query_position)`` added after the cap.
        The caches are float32 or bfloat16, or a quantised cache (int8, float8 e4m3 / e5m2) whose entries read
        as ``entry * kv_scales[0]`` (keys) and ``entry * kv_scales[1]`` (values). ``query`` and ``out`` are float32,
        or both bfloat16 (a bfloat16 model's: converted to and from float32 here, which is small next to the
        cache reads)."""
        if query.dtype == torch.bfloat16 and out.dtype == torch.bfloat16:
            out32 = torch.empty(out.shape, dtype=torch.float32)
            self.paged_decode_attention(query.float(), key_cache, value_cache, block_tables, seq_lens, scale, out32,
                                        sliding_window=sliding_window, soft_cap=soft_cap, alibi_slopes=alibi_slopes,
                                        kv_scales=kv_scales)
            out.copy_(out32)
            return
        if query.dtype != torch.float32 or out.dtype != torch.float32:
            raise TypeError(f"paged_decode_attention: query and out must be both float32 or both bfloat16, got "
                            f"{query.dtype} and {out.dtype}")
        b, num_heads, head_dim = query.shape
        kv_format = _KV_FORMATS.get(key_cache.dtype)
        if kv_format is None or value_cache.dtype != key_cache.dtype:
            raise TypeError(f"paged_decode_attention: caches must be one of {', '.join(map(str, _KV_FORMATS))}, got "
                            f"{key_cache.dtype} and {value_cache.dtype}")
        if query.stride(2) != 1 or query.stride(1) != head_dim:
            query = query.contiguous()
        block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
        if out.stride(2) != 1 or out.stride(1) != head_dim \
                or key_cache.stride()[1:] != (num_kv_heads * head_dim, head_dim, 1) \
                or value_cache.stride() != key_cache.stride() or block_tables.stride(1) != 1 \
                or not seq_lens.is_contiguous():
            raise ValueError("paged_decode_attention: out [B, H, D] needs contiguous heads and dims; caches must be "
                             "contiguous within each block (both strided alike), block tables and lengths contiguous")
        if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
            raise TypeError("paged_decode_attention: block tables and lengths must be int32")
        if (sliding_window is not None and sliding_window < 1) or (soft_cap is not None and not soft_cap > 0):
            raise ValueError(f"paged_decode_attention: sliding_window must be >= 1 and soft_cap > 0 (or None), got "
                             f"{sliding_window} and {soft_cap}")
        if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32 or alibi_slopes.shape != (num_heads,)
                                         or not alibi_slopes.is_contiguous()):
            raise ValueError(f"paged_decode_attention: alibi_slopes must be a contiguous float32 [{num_heads}] "
                             f"tensor, got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
        status = self._lib.llmserve_paged_decode_attention(
            query.data_ptr(), query.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
            block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), b, num_heads, num_kv_heads,
            head_dim, block_size, key_cache.stride(0), scale, sliding_window or 0, soft_cap or 0.0,
            alibi_slopes.data_ptr() if alibi_slopes is not None else None, out.data_ptr(), out.stride(0),
            torch.get_num_threads(), kv_format, kv_scales[0], kv_scales[1])
        if status == -2:
            raise MemoryError("paged_decode_attention: no memory for the attention scores")
        if status != 0:
            raise ValueError(f"paged_decode_attention: {num_heads} query heads is not a multiple of "
                             f"{num_kv_heads} KV heads")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
                 weight_first: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm over the last dim of a 2-D ``x``; with ``residual``, ``(norm(x + residual), x + residual)``.

        ``x`` and ``residual`` are float32 or bfloat16 (the outputs too), ``weight`` any float dtype. In bfloat16
        the normalised value is rounded before the weight multiplies it (Llama), or after with ``weight_first``
        (Gemma), as transformers rounds."""
        rows, n = x.shape
        dtype = _activation_dtype(x)
        _check_rows(x, n, "x", dtype)
        if residual is not None:
            _check_rows(residual, n, "residual", dtype)
        if not weight.is_contiguous() or weight.numel() != n:
            raise ValueError(f"rms_norm: weight must be {n} contiguous floats")
        weight = weight.float()
        out = torch.empty(rows, n, dtype=dtype)
        residual_out = torch.empty(rows, n, dtype=dtype) if residual is not None else None
        self._lib.llmserve_rms_norm(
            x.data_ptr(), x.stride(0), residual.data_ptr() if residual is not None else None,
            residual.stride(0) if residual is not None else 0, weight.data_ptr(), eps, out.data_ptr(), n,
            residual_out.data_ptr() if residual_out is not None else None, n, rows, n, torch.get_num_threads(),
            int(weight_first), int(dtype == torch.bfloat16))
        return out if residual_out is None else (out, residual_out)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for a 2-D float32 or bfloat16 ``x`` = ``[gate | up]``."""
        rows, width = x.shape
        dtype = _activation_dtype(x)
        _check_rows(x, width, "x", dtype)
        n = width // 2
        out = torch.empty(rows, n, dtype=dtype)
        self._lib.llmserve_silu_and_mul(x.data_ptr(), x.stride(0), out.data_ptr(), n, rows, n,
                                        torch.get_num_threads(), int(dtype == torch.bfloat16))
        return out

    def rotary_embedding(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                         sin_cache: torch.Tensor) -> None:
        """Rotate ``q`` [T, H, D] and ``k`` [T, KV, D] (both float32 or both bfloat16) in place (neox layout) by
        int64 ``positions`` [T]; the float32 tables [rows, R / 2] rotate each head's first R dims (R < D: partial
        rotary) and leave the rest."""
        rows, num_heads, head_dim = q.shape
        dtype = _activation_dtype(q)
        for name, t in (("q", q), ("k", k)):
            if t.stride(2) != 1 or t.stride(1) != head_dim or t.shape[0] != rows or t.shape[2] != head_dim \
                    or t.dtype != dtype:
                raise ValueError(f"rotary_embedding: {name} must be {dtype} [T, heads, {head_dim}] with heads and dims "
                                 f"contiguous")
        if positions.dtype != torch.int64 or not positions.is_contiguous() or positions.numel() != rows:
            raise ValueError(f"rotary_embedding: positions must be {rows} contiguous int64")
        rotary_dim = 2 * cos_cache.shape[1]
        if rotary_dim > head_dim or sin_cache.shape != cos_cache.shape or cos_cache.dtype != torch.float32 \
                or sin_cache.dtype != torch.float32:
            raise ValueError(f"rotary_embedding: cos/sin tables must be float32 [rows, <= {head_dim // 2}] alike, got "
                             f"{tuple(cos_cache.shape)} and {tuple(sin_cache.shape)}")
        status = self._lib.llmserve_rotary_embedding(
            q.data_ptr(), q.stride(0), num_heads, k.data_ptr(), k.stride(0), k.shape[1], head_dim, rotary_dim,
            positions.data_ptr(), cos_cache.data_ptr(), sin_cache.data_ptr(), cos_cache.shape[0], rows,
            torch.get_num_threads(), int(dtype == torch.bfloat16))
        if status != 0:
            raise IndexError(f"rotary_embedding: a position is outside 0..{cos_cache.shape[0] - 1}")

    def logsumexp_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.logsumexp(x, dim=-1)`` for a 2-D float32 ``x``."""
        rows, n = x.shape
        _check_rows(x, n, "x")
        out = torch.empty(rows, dtype=torch.float32)
        self._lib.llmserve_logsumexp_rows(x.data_ptr(), x.stride(0), out.data_ptr(), rows, n, torch.get_num_threads())
        return out

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x.argmax(dim=-1)`` for a 2-D float32 ``x`` with at least one column."""
        rows, n = x.shape
        _check_rows(x, n, "x")
        if n == 0:
            raise ValueError("argmax_rows: rows are empty")
        out = torch.empty(rows, dtype=torch.int64)
        self._lib.llmserve_argmax_rows(x.data_ptr(), x.stride(0), out.data_ptr(), rows, n, torch.get_num_threads())
        return out

    def __repr__(self) -> str:
        return f"CPUKernels(max_linear_rows={self.max_linear_rows})"


WEIGHT_BLOCK = 16   # output rows interleaved in a blocked weight (one 16-float vector)


def block_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` -> ``[out/16, in, 16]``: element ``[b, c, i]`` is ``weight[16 b + i, c]``, so the
    kernels load one input column of 16 outputs as one vector. ``out`` must be a multiple of 16.

    A bfloat16 weight is blocked in pairs of input columns, ``[out/16, ceil(in/2), 16, 2]`` (element
    ``[b, c, i, p]`` is ``weight[16 b + i, 2 c + p]``, zero past ``in``): one vector is the operand of one
    AVX512-BF16 dot-product step."""
    n, k = weight.shape
    if n % WEIGHT_BLOCK:
        raise ValueError(f"block_weight: {n} output rows is not a multiple of {WEIGHT_BLOCK}")
    if weight.dtype == torch.bfloat16:
        padded = torch.nn.functional.pad(weight, (0, k % 2))
        return padded.view(n // WEIGHT_BLOCK, WEIGHT_BLOCK, (k + 1) // 2, 2).transpose(1, 2).contiguous()
    return weight.view(n // WEIGHT_BLOCK, WEIGHT_BLOCK, k).transpose(1, 2).contiguous()


def _check_rows(t: torch.Tensor, width: int, name: str, dtype: torch.dtype = torch.float32) -> None:
    if t.dim() != 2 or t.shape[1] != width or t.stride(1) != 1 or t.dtype != dtype:
        raise ValueError(f"{name} must be 2-D {dtype} with {width} contiguous values per row, got "
                         f"{tuple(t.shape)} {t.dtype} strides {t.stride()}")


# The activation dtypes of the layer ops (norms, SiLU-and-multiply, rotary) and the bfloat16 linear layers.
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


def _activation_dtype(x: torch.Tensor) -> torch.dtype:
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"the layer kernels take float32 or bfloat16 activations, got {x.dtype}")
    return x.dtype


def kernels_for(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> CPUKernels | None:
    """The kernels when ``x`` is a CPU tensor of one of ``dtypes`` and they are available, else None."""
    if x.device.type != "cpu" or x.dtype not in dtypes:
        return None
    return cpu_kernels()


@lru_cache(maxsize=1)
def cpu_kernels() -> CPUKernels | None:
    """The compiled kernels, or None (logged once) where they are disabled or cannot be built."""
    if os.environ.get(CPU_KERNELS_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        logger.info("CPU kernels disabled (%s=0): using the PyTorch paths", CPU_KERNELS_ENV)
        return None
    try:
        return CPUKernels(build_library())
    except (CPUKernelsUnavailable, OSError) as exc:
        logger.warning("CPU kernels unavailable, using the slower PyTorch paths: %s", exc)
        return None
