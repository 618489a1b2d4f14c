"""The quantised KV cache (``--kv-cache-dtype fp8|fp8_e4m3|fp8_e5m2|int8``): one byte per element.

As in vLLM, each attention layer has one scale for its keys and one for its values (per tensor): a cache
entry is ``x / scale`` rounded to the format (saturated at its largest finite value), and reads give
``entry * scale``. The scales come from the checkpoint when it ships them (``k_scale``/``v_scale``, or an older
FP8 checkpoint's single ``kv_scale``), else:

- **fp8** (e4m3, and e5m2): 1.0, vLLM's default. float8 keeps ~2 significant decimal digits over a wide
  range (e4m3 up to 448, e5m2 up to 57344), so unscaled activations survive without calibration;
- **int8**: 256 evenly spaced levels need a scale fitted to the data. The layer measures ``max |K|`` and
  ``max |V|`` over the first batch it runs (as vLLM's ``--calculate-kv-scales``) and maps
  :data:`CALIBRATION_HEADROOM` times that to 127: the first batch (often one short prompt) does not see the
  largest values later tokens bring, and a value past the range saturates. vLLM leaves the same kind of room
  (its calculated float8 scales map ``amax`` to 200 for K and 100 for V, of e4m3's 448); on the test models a
  scale fitted exactly to the first batch saturated Gemma's later values (logprob errors twice as large).

The functions here are the reference every backend matches: writes quantise only the step's new tokens, and
reads dequantise what the kernel gathers (the whole cache is never converted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmserve.config import KV_CACHE_DTYPES

# Calibrated int8 scales cover this many times the first batch's largest magnitude (one bit of the 8 spent on
# range the first batch has not shown).
CALIBRATION_HEADROOM = 2.0


@dataclass(frozen=True)
class KVCacheFormat:
    """A quantised KV-cache element type."""

    name: str              # fp8_e4m3, fp8_e5m2 or int8
    dtype: torch.dtype     # the cache tensors' dtype
    max_value: float       # the largest finite value: quantised entries saturate there


def _formats() -> dict[str, KVCacheFormat]:
    formats = {"int8": KVCacheFormat("int8", torch.int8, 127.0)}
    if hasattr(torch, "float8_e4m3fn") and hasattr(torch, "float8_e5m2"):
        formats["fp8_e4m3"] = KVCacheFormat("fp8_e4m3", torch.float8_e4m3fn, 448.0)
        formats["fp8_e5m2"] = KVCacheFormat("fp8_e5m2", torch.float8_e5m2, 57344.0)
    return formats


FORMATS = _formats()


def check_kv_cache_dtype(value: str) -> str:
    """``value`` as a canonical name (``auto``, ``fp8_e4m3``, ``fp8_e5m2`` or ``int8``; ``fp8`` is e4m3, as in vLLM).

    Raises ``ValueError`` for a name outside :data:`KV_CACHE_DTYPES` and ``RuntimeError`` for fp8 on a torch
    without float8 dtypes."""
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unsupported --kv-cache-dtype {value!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    name = "fp8_e4m3" if name == "fp8" else name
    if name != "auto" and name not in FORMATS:
        raise RuntimeError(f"--kv-cache-dtype {value}: this torch ({torch.__version__}) has no float8 dtypes; "
                           f"use int8 or a torch >= 2.1")
    return name


def kv_cache_format(name: str) -> KVCacheFormat | None:
    """The format of a canonical ``kv_cache_dtype`` name; None for ``auto`` (or a model dtype's name)."""
    return FORMATS.get(name)


def format_of(cache: torch.Tensor) -> KVCacheFormat | None:
    """The quantised format a cache tensor holds, from its dtype; None for a float cache."""
    return next((f for f in FORMATS.values() if f.dtype == cache.dtype), None)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, fmt: KVCacheFormat) -> torch.Tensor:
    """``x / scale`` in ``fmt``: rounded to nearest (even, for float8: torch's cast), saturated at
    ``+-fmt.max_value``. ``scale`` is a 0-d tensor (kept on the device, so a CUDA graph reads its current value)."""
    y = (x.float() / scale).clamp_(-fmt.max_value, fmt.max_value)
    return (y.round_() if fmt.dtype == torch.int8 else y).to(fmt.dtype)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` as ``dtype``."""
    return (q.float() * scale).to(dtype)


def scale_for(x: torch.Tensor, fmt: KVCacheFormat) -> torch.Tensor:
    """The per-tensor scale that maps :data:`CALIBRATION_HEADROOM` times ``max |x|`` to the format's largest value
    (1.0 for an all-zero ``x``)."""
    amax = x.detach().abs().amax().float()
    return torch.where(amax > 0, amax * CALIBRATION_HEADROOM / fmt.max_value, torch.ones_like(amax))


# A checkpoint's KV-cache scales: compressed-tensors / llm-compressor's ``self_attn.k_scale`` and ``v_scale``,
# ModelOpt's ``self_attn.k_proj.k_scale`` and ``v_proj.v_scale``, and older FP8 checkpoints' one ``kv_scale``.
_KV_SCALE_NAME = re.compile(
    r"^(.+\.self_attn)\.(?:k_proj\.(?=k_)|v_proj\.(?=v_)|k_proj\.(?=kv_))?(k_scale|v_scale|kv_scale)$")


def kv_scale_name(name: str) -> tuple[str, str] | None:
    """``(attention block, "k_scale" | "v_scale" | "kv_scale")`` for a checkpoint tensor that is a KV-cache scale."""
    match = _KV_SCALE_NAME.match(name)
    return None if match is None else (match.group(1), match.group(2))


def kv_cache_capacity_gain(kv_cache_dtype: str, num_blocks: int, block_size: int, max_model_len: int,
                           bytes_per_block: int, model_dtype_bytes_per_block: int, model_dtype: torch.dtype) -> str:
    """The start-up line on what a quantised cache buys: blocks and maximum concurrency (full-length
    requests the cache holds at once, as vLLM reports it) against the same memory in the model's dtype."""
    baseline = num_blocks * bytes_per_block // model_dtype_bytes_per_block
    tokens, baseline_tokens = num_blocks * block_size, baseline * block_size
    return (f"KV cache {kv_cache_dtype}: {num_blocks} blocks ({tokens} tokens, maximum concurrency "
            f"{tokens / max_model_len:.2f}x for {max_model_len}-token requests) where {model_dtype} would hold "
            f"{baseline} blocks ({baseline_tokens / max_model_len:.2f}x): {num_blocks / max(baseline, 1):.2f}x the "
            f"capacity")
