"""The attention-backend interface: the only place the CPU and GPU paths differ.

The model runner describes each step's batch once as a :class:`BatchLayout` (which tokens belong to
which sequence, where their K/V go, which blocks hold each sequence's context). A backend turns that
into its own precomputed metadata (masks, index tensors, kernel arguments) once per step, and
``forward`` is then called by every attention layer with that metadata.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from llmserve.layers.cpu_kernels import cpu_kernels


@dataclass
class BatchLayout:
    """One step's flattened batch. Sequences whose query is a single token come first (decodes).

    - ``query_lens[i]``: tokens of sequence i computed this step (1 for a decode, a chunk for a prefill);
    - ``context_lens[i]``: tokens of sequence i already in the KV cache before this step;
    - ``block_tables[i]``: the physical block ids holding sequence i, in order;
    - ``slot_mapping[t]``: the flat cache slot (block * block_size + offset) where token t's K/V go.
    """

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor
    num_decodes: int
    block_size: int

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]


class AttentionBackend(ABC):
    """Paged attention for mixed prefill + decode batches."""

    name: str
    # Whether a decode-only step can be captured in a CUDA graph (static metadata buffers, a kernel grid
    # that depends only on the batch size); see TritonAttentionBackend.graph_decode_metadata.
    supports_cuda_graphs: bool = False

    @abstractmethod
    def build_metadata(self, layout: BatchLayout, device: torch.device) -> object:
        """Precompute per-step tensors shared by all layers."""

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: object,
                scale: float) -> torch.Tensor:
        """Store ``key``/``value`` [T, KV, D] in the cache, attend ``query`` [T, H, D] over each
        sequence's cached context causally, and return [T, H, D].

        Caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        """

    def graph_decode_metadata(self, batch_size: int, max_blocks: int, max_seq_len: int,
                              device: torch.device) -> object:
        """Static metadata buffers for a CUDA-graph decode batch (backends with ``supports_cuda_graphs``)."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def fill_graph_decode_metadata(self, static: object, layout: BatchLayout) -> None:
        """Write a decode-only step into buffers from :meth:`graph_decode_metadata`, in place."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")


ATTENTION_BACKEND_ENV = "LLMSERVE_ATTENTION_BACKEND"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_attention_backend(device: torch.device, choice: str | None = None,
                             dtype: torch.dtype = torch.float32) -> str:
    """``"torch"``, ``"cpu"`` or ``"triton"`` for ``device`` and the model's ``dtype``.

    ``choice`` (default: the ``LLMSERVE_ATTENTION_BACKEND`` environment variable) may be ``auto`` (or
    empty), ``torch``, ``cpu`` or ``triton``. ``auto`` picks Triton on CUDA when it imports; on CPU in
    float32 the compiled decode kernel (``cpu``) when it builds here; else PyTorch. Forcing ``triton`` off
    CUDA is allowed only under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the kernels
    are tested without a GPU.
    """
    choice = (choice if choice is not None else os.environ.get(ATTENTION_BACKEND_ENV, "")).strip().lower() or "auto"
    if choice not in ("auto", "torch", "cpu", "triton"):
        raise ValueError(f"{ATTENTION_BACKEND_ENV} must be auto, torch, cpu or triton, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "cpu":
        if device.type != "cpu" or dtype != torch.float32:
            raise RuntimeError(f"the cpu attention backend runs float32 on the CPU, not {dtype} on {device.type}")
        if cpu_kernels() is None:
            raise RuntimeError(f"{ATTENTION_BACKEND_ENV}=cpu but the CPU kernels could not be built (see the "
                               f"warning above; a C compiler is needed)")
        return "cpu"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ATTENTION_BACKEND_ENV}=triton but triton is not installed (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"the Triton attention backend needs a CUDA device (or TRITON_INTERPRET=1), "
                               f"not {device.type}")
        return "triton"
    if device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if device.type == "cpu" and dtype == torch.float32 and cpu_kernels() is not None:
        return "cpu"
    return "torch"


def get_attention_backend(device: torch.device, dtype: torch.dtype, choice: str | None = None, *,
                          num_kv_heads: int = 8) -> AttentionBackend:
    """The backend for a device and dtype: Triton kernels on CUDA when triton imports, the compiled decode
    kernel on CPU in float32, PyTorch otherwise (see :func:`select_attention_backend` for forcing one).
    ``num_kv_heads`` is the model's (the Triton decode kernel sizes its split-K grid with it)."""
    selected = select_attention_backend(device, choice, dtype)
    if selected == "triton":
        from llmserve.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(dtype, num_kv_heads)
    if selected == "cpu":
        from llmserve.layers.attention.cpu_backend import CPUAttentionBackend

        return CPUAttentionBackend(cpu_kernels())
    from llmserve.layers.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend(dtype)
