"""The attention-backend interface: the only place the CPU and GPU paths differ.

The model runner describes each step's batch once as a :class:`BatchLayout` (which tokens belong to
which sequence, where their K/V go, which blocks hold each sequence's context). A backend turns that
into its own precomputed metadata (masks, index tensors, kernel arguments) once per step, and
``forward`` is then called by every attention layer with that metadata and the layer's
:class:`AttentionSpec` (head geometry, scale, sliding window, logit soft-cap, ALiBi slopes). Layers of one model may
differ in their spec (Gemma 2 alternates sliding-window and full layers), so whatever a backend derives
from a spec per step (a window's masks, say) is built lazily at the first layer that needs it and cached
on the metadata for the rest of the step.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.quantization.kv_cache import KV_CACHE_DTYPES, KVCacheFormat, check_kv_cache_dtype, kv_cache_format


@dataclass
class BatchLayout:
    """One step's flattened batch. The first ``num_decodes`` rows are decodes: rows with exactly one query
    token (over any context). Every other row may have any number of query tokens over any cached context:
    a fresh prompt (context 0), a prefill chunk after earlier chunks, or a running sequence verifying
    1 + k speculated tokens; each is causal within its own tokens and sees its whole context.

    - ``query_lens[i]``: tokens of sequence i computed this step (1 for a decode);
    - ``context_lens[i]``: tokens of sequence i already in the KV cache before this step;
    - ``block_tables[i]``: the physical block ids holding sequence i, in order, padded with 0 to the
      widest row: an int32 array (given lists, it is built from them);
    - ``slot_mapping[t]``: the flat cache slot (block * block_size + offset) where token t's K/V go.
    """

    query_lens: list[int]
    context_lens: list[int]
    block_tables: np.ndarray
    slot_mapping: torch.Tensor
    num_decodes: int
    block_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.block_tables, np.ndarray):
            self.block_tables = padded_block_tables(self.block_tables)

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]


class KVCacheGroupMetadata(tuple):
    """A step's attention metadata per KV-cache group (:mod:`llmserve.worker.kv_cache_groups`), for a model
    whose groups have block tables of their own: each layer reads its group's."""


def padded_block_tables(tables: Sequence[Sequence[int]]) -> np.ndarray:
    """Block-id lists as one int32 array [rows, longest], shorter rows padded with block 0."""
    out = np.zeros((len(tables), max((len(t) for t in tables), default=0)), dtype=np.int32)
    for i, table in enumerate(tables):
        out[i, :len(table)] = table
    return out


# Names of the dtype a KV cache may be asked for that mean "the model's dtype".
_MODEL_DTYPE_NAMES = ("auto", "model")


def _dtype_name(value: Any) -> str | None:
    """``torch.bfloat16`` / ``"bfloat16"`` / ``"torch.bfloat16"`` / ``"bf16"`` -> ``"bfloat16"``; None when
    ``value`` names no floating torch dtype."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if not isinstance(value, str):
        return None
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        value.strip().lower().removeprefix("torch."), value.strip().lower().removeprefix("torch."))
    dtype = getattr(torch, name, None)
    return name if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer asks of the backend, besides the step's batch (plain, hashable fields).

    - ``scale``: multiplies ``q . k`` (usually ``head_dim ** -0.5``);
    - ``sliding_window``: None for full attention; else a query at position ``p`` sees the keys at
      positions ``p - sliding_window < j <= p`` (its last ``sliding_window`` positions, itself included),
      as transformers' ``sliding_window_overlay`` + ``causal_mask_function`` (Mistral, Qwen2, Gemma 2);
    - ``logits_soft_cap``: None, or ``c`` for Gemma 2's ``c * tanh(scores / c)`` applied to the scaled
      scores before the mask and the softmax;
    - ``alibi_slopes``: None, or one slope per query head of this layer (this rank's heads under tensor
      parallelism) for ALiBi: ``slope * (key_position - query_position)`` is added to the (soft-capped)
      scaled scores before the mask (see :mod:`llmserve.layers.attention.alibi`);
    - ``kv_cache_dtype``: ``"auto"`` (the cache holds the model's dtype), the model's dtype itself
      (``torch.bfloat16`` or ``"bfloat16"``, stored as its name), or a quantised cache of one byte per element:
      ``"fp8"`` (= ``"fp8_e4m3"``), ``"fp8_e5m2"`` or ``"int8"`` with per-tensor K and V scales
      (:mod:`llmserve.quantization.kv_cache`). Another float dtype raises ``NotImplementedError``. The model's
      dtype is torch's default dtype when the spec is built (the loader sets it while it constructs the model).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    alibi_slopes: tuple[float, ...] | None = None
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or int(self.sliding_window) != self.sliding_window
                                                or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive number of tokens (or None for full attention), "
                             f"got {self.sliding_window!r}")
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be > 0 (or None for no cap), got {self.logits_soft_cap!r}")
        if self.alibi_slopes is not None:
            slopes = tuple(float(s) for s in self.alibi_slopes)
            if len(slopes) != self.num_heads or not all(math.isfinite(s) for s in slopes):
                raise ValueError(f"alibi_slopes must be {self.num_heads} finite numbers (one per query head), got "
                                 f"{self.alibi_slopes!r}")
            object.__setattr__(self, "alibi_slopes", slopes)
        object.__setattr__(self, "scale", float(self.scale))
        if self.sliding_window is not None:
            object.__setattr__(self, "sliding_window", int(self.sliding_window))
        if self.logits_soft_cap is not None:
            object.__setattr__(self, "logits_soft_cap", float(self.logits_soft_cap))
        object.__setattr__(self, "kv_cache_dtype", self._check_kv_cache_dtype(self.kv_cache_dtype))

    @staticmethod
    def _check_kv_cache_dtype(value: Any) -> str:
        if value is None or (isinstance(value, str) and value.strip().lower() in _MODEL_DTYPE_NAMES):
            return "auto"
        if isinstance(value, str) and value.strip().lower() in KV_CACHE_DTYPES:
            return check_kv_cache_dtype(value)
        model = torch.get_default_dtype()
        name = _dtype_name(value)
        if name is None or getattr(torch, name) != model:
            raise NotImplementedError(
                f"kv_cache_dtype={value!r} is not supported: the KV cache holds the model's dtype ({model}) for "
                f"now (pass 'auto')")
        return name

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_format(self) -> KVCacheFormat | None:
        """The quantised format of this layer's KV cache; None when it holds the model's dtype."""
        return kv_cache_format(self.kv_cache_dtype)


class AttentionBackend(ABC):
    """Paged attention for mixed prefill + decode batches."""

    name: str
    # Whether a decode-only step can be captured in a CUDA graph (static metadata buffers, a kernel grid
    # that depends only on the batch size); see TritonAttentionBackend.graph_decode_metadata.
    supports_cuda_graphs: bool = False

    @abstractmethod
    def build_metadata(self, layout: BatchLayout, device: torch.device) -> object:
        """Precompute per-step tensors shared by all layers."""

    def metadata_for_group(self, metadata: object, block_tables: np.ndarray, slot_mapping: torch.Tensor) -> object:
        """The step of ``metadata`` (from :meth:`build_metadata`) for another KV-cache group
        (:mod:`llmserve.worker.kv_cache_groups`): the same rows with this group's ``block_tables`` and
        ``slot_mapping`` (on the device). Only these differ between groups, so what the rows' lengths decide is
        shared with ``metadata``, not built again."""
        raise NotImplementedError(f"the {self.name} attention backend does not support several KV-cache groups")

    # Whether it reads and writes quantised (int8 / float8) caches.
    supports_quantized_kv_cache: bool = False

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: object,
                spec: AttentionSpec, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        """Store ``key``/``value`` [T, KV, D] in the cache, attend ``query`` [T, H, D] over each
        sequence's cached context causally (within ``spec.sliding_window`` when set, scores scaled by
        ``spec.scale``, soft-capped by ``spec.logits_soft_cap`` and biased by ``spec.alibi_slopes`` when set),
        and return [T, H, D].

        Caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous within each block; blocks may
        lie further apart (a padded page: :mod:`llmserve.worker.kv_cache_pages`), keys' and values' alike. A
        quantised cache (int8 / float8, told by its dtype) stores ``key / kv_scales[0]`` and ``value /
        kv_scales[1]`` (float32 [2] on the cache's device; with one cache for both, the values use the key's
        scale).
        """

    def graph_decode_metadata(self, batch_size: int, max_blocks: int, max_seq_len: int,
                              device: torch.device) -> object:
        """Static metadata buffers for a CUDA-graph decode batch (backends with ``supports_cuda_graphs``)."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def fill_graph_decode_metadata(self, static: object, layout: BatchLayout) -> None:
        """Write a decode-only step into buffers from :meth:`graph_decode_metadata`, in place."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def graph_metadata_for_group(self, static: object) -> object:
        """Static buffers of another KV-cache group for the graph that reads ``static`` (from
        :meth:`graph_decode_metadata`): block tables and slots of its own, the lengths shared."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def fill_graph_group_metadata(self, static: object, layout: BatchLayout) -> None:
        """Write another group's block tables and slots (``layout``: the step with that group's) into buffers
        from :meth:`graph_metadata_for_group`, in place; the shared lengths are written by
        :meth:`fill_graph_decode_metadata`."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")


ATTENTION_BACKEND_ENV = "LLMSERVE_ATTENTION_BACKEND"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_attention_backend(device: torch.device, choice: str | None = None,
                             dtype: torch.dtype = torch.float32, *, latent_attention: bool = False) -> str:
    """``"torch"``, ``"cpu"`` or ``"triton"`` for ``device`` and the model's ``dtype``.

    ``choice`` (default: the ``LLMSERVE_ATTENTION_BACKEND`` environment variable) may be ``auto`` (or
    empty), ``torch``, ``cpu`` or ``triton``. ``auto`` picks Triton on CUDA when it imports; on CPU in
    float32 or bfloat16 the compiled decode kernel (``cpu``) when it builds here; else PyTorch. Forcing
    ``triton`` off CUDA is allowed only under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the
    kernels are tested without a GPU. A model with multi-head latent attention (``latent_attention``: DeepSeek)
    gets PyTorch on CUDA: the Triton kernels do not implement it, and forcing them is refused.
    """
    choice = (choice if choice is not None else os.environ.get(ATTENTION_BACKEND_ENV, "")).strip().lower() or "auto"
    if choice not in ("auto", "torch", "cpu", "triton"):
        raise ValueError(f"{ATTENTION_BACKEND_ENV} must be auto, torch, cpu or triton, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "cpu":
        if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
            raise RuntimeError(f"the cpu attention backend runs float32 or bfloat16 on the CPU, not {dtype} on "
                               f"{device.type}")
        if cpu_kernels() is None:
            raise RuntimeError(f"{ATTENTION_BACKEND_ENV}=cpu but the CPU kernels could not be built (see the "
                               f"warning above; a C compiler is needed)")
        return "cpu"
    if choice == "triton":
        if latent_attention:
            raise RuntimeError(f"{ATTENTION_BACKEND_ENV}=triton but the Triton attention backend does not implement "
                               f"multi-head latent attention (DeepSeek); use torch")
        if not triton_available():
            raise RuntimeError(f"{ATTENTION_BACKEND_ENV}=triton but triton is not installed (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"the Triton attention backend needs a CUDA device (or TRITON_INTERPRET=1), "
                               f"not {device.type}")
        return "triton"
    if device.type == "cuda":
        return "triton" if triton_available() and not latent_attention else "torch"
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernels() is not None:
        return "cpu"
    return "torch"


def get_attention_backend(device: torch.device, dtype: torch.dtype, choice: str | None = None, *,
                          num_kv_heads: int = 8, latent_attention: bool = False) -> AttentionBackend:
    """The backend for a device and dtype: Triton kernels on CUDA when triton imports, the compiled decode
    kernel on CPU in float32 or bfloat16, PyTorch otherwise (see :func:`select_attention_backend` for forcing
    one and for ``latent_attention``). ``num_kv_heads`` is the model's (the Triton decode kernel sizes its
    split-K grid with it)."""
    selected = select_attention_backend(device, choice, dtype, latent_attention=latent_attention)
    if selected == "triton":
        from llmserve.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(dtype, num_kv_heads)
    if selected == "cpu":
        from llmserve.layers.attention.cpu_backend import CPUAttentionBackend

        return CPUAttentionBackend(cpu_kernels(), dtype)
    from llmserve.layers.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend(dtype)


def widest_window(windows: list[int | None]) -> int | None:
    """The sliding window that covers every one of ``windows`` (None, full attention, if any is None): no
    layer reads a key older than it, so the KV blocks before it can be freed."""
    return None if not windows or None in windows else max(windows)
