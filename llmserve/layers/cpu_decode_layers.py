"""Typed entry point of the one-call decode step (``csrc/cpu_decode_layers.c``): every decoder layer of a
Llama-shaped model, for rows that each decode one token, in a single call into C; and, with the token embedding and
LM head attached, several greedy decode steps in one call (:meth:`DecodeLayersKernel.steps`).

The descriptors (each layer's norm weights, projections and attention scale) are built once from the loaded
modules; each step passes only its rows' positions, K/V slots, block tables and lengths. The descriptors hold
the weights' addresses, so the tensors they were built from are kept alive here and must not be replaced while
the plan is used. What may run this way, and the per-step choice, are decided in
:mod:`llmserve.models.llama_fused_decode`.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from llmserve.layers.cpu_group_int8 import WeightSegment
from llmserve.layers.cpu_kernels import CPUKernels

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
MAX_SEGMENTS = 4   # group-int8 row segments per projection (DL_MAX_SEGMENTS)
F32_BLOCKED, BF16_BLOCKED, GROUP_INT8, F32_ROWS, BF16_ROWS = 0, 1, 2, 3, 4


class FusedDecodeUnsupported(ValueError):
    """The model (or one of its layers) is not one the fused decode step runs; the message says why."""


class _LoRA(ctypes.Structure):
    """A projection's LoRA slots as ``llmserve_lora_add`` takes them (``a`` None: none)."""
    _fields_ = [("a", _P), ("bt", _P), ("a_slot_stride", _L), ("bt_slot_stride", _L), ("bt_stride", _L),
                ("slot_ranks", _P), ("bounds", _P), ("in_features", _L), ("projections", _I), ("w_bf16", _I)]


class LoRAStepArgs(ctypes.Structure):
    """A step's adapter rows as ``llmserve_lora_add`` takes them: the rows (None: every row, one adapter), the
    segment table and its length, the float32 scratch for the shrunk rows and its row stride."""
    _fields_ = [("rows", _P), ("segments", _P), ("num_segments", _L), ("shrunk", _P), ("shrunk_stride", _L)]


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _I), ("segments", _I), ("n", _L), ("k", _L), ("weight", _P), ("bias", _P),
                ("weights", WeightSegment * MAX_SEGMENTS), ("lora", _LoRA)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P), ("qkv", _Linear),
                ("o", _Linear), ("gate_up", _Linear), ("down", _Linear), ("key_cache", _P), ("value_cache", _P),
                ("block_stride", _L), ("scale", _F)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", _L), ("hidden", _L), ("num_heads", _L), ("num_kv_heads", _L), ("head_dim", _L),
                ("intermediate", _L), ("block_size", _L), ("max_position", _L), ("eps", _F), ("bf16", _I),
                ("cos", _P), ("sin", _P), ("final_norm", _P), ("layers", ctypes.POINTER(_Layer))]


class SampleParams(ctypes.Structure):
    """A row's sampling in the multi-step loop (``sample_params`` of ``csrc/cpu_sampling.h``): temperature <= 0 is
    greedy; top_k 0, top_p 1, min_p 0 are off."""
    _fields_ = [("temperature", _F), ("top_p", _F), ("min_p", _F), ("top_k", _L)]


class _Ends(ctypes.Structure):
    """The token embedding (row-major, activations' dtype) and the LM head of the multi-step loop."""
    _fields_ = [("embedding", _P), ("vocab", _L), ("head", _Linear)]


def linear_descriptor(layer: nn.Module, dtype: torch.dtype, keep: list[torch.Tensor]) -> _Linear:
    """The projection ``layer`` (a linear layer after ``process_weights_after_loading``) as the C step runs it:
    a blocked float32 or bfloat16 weight, or group-int8 segments (GGUF). Tensors made here are appended to
    ``keep``. Raises :class:`FusedDecodeUnsupported` for any other layout."""
    desc = _Linear()
    bias = getattr(layer, "bias", None)
    plan = getattr(layer, "group_int8_plan", None)
    weight = getattr(layer, "weight", None)
    if plan is not None:
        if plan.count > MAX_SEGMENTS:
            raise FusedDecodeUnsupported(f"{plan.count} group-int8 segments in one projection (at most "
                                         f"{MAX_SEGMENTS})")
        desc.kind, desc.segments, desc.n, desc.k = GROUP_INT8, plan.count, plan.n, plan.k
        for i in range(plan.count):
            desc.weights[i] = plan.weights[i]
        bias_dtype = torch.float32
    elif weight is not None and weight.dtype == dtype == torch.float32 and weight.dim() == 3:
        desc.kind, desc.n, desc.k, desc.weight = F32_BLOCKED, weight.shape[0] * weight.shape[2], weight.shape[1], \
            weight.data_ptr()
        bias_dtype = torch.float32
    elif weight is not None and weight.dtype == dtype == torch.bfloat16 and weight.dim() == 4:
        # (k from the layer: the blocked pairs round an odd k up; an LM head's inputs are its embedding_dim)
        k = getattr(layer, "input_size_per_partition", None) or layer.embedding_dim
        desc.kind, desc.n, desc.k, desc.weight = BF16_BLOCKED, weight.shape[0] * weight.shape[2], k, weight.data_ptr()
        bias_dtype = torch.bfloat16
    else:
        shape = None if weight is None else (tuple(weight.shape), weight.dtype)
        raise FusedDecodeUnsupported(f"{type(layer.quant_method).__name__} weight {shape} in a {dtype} model "
                                     f"(blocked float32 / bfloat16 or GGUF group-int8 only)")
    if weight is not None and plan is None and not weight.is_contiguous():
        raise FusedDecodeUnsupported("a blocked weight that is not contiguous")
    if bias is not None:
        bias = bias.detach().to(bias_dtype).contiguous()
        keep.append(bias)
        desc.bias = bias.data_ptr()
    return desc


def row_major_descriptor(weight: torch.Tensor, dtype: torch.dtype) -> _Linear:
    """A plain row-major ``[out, in]`` weight (a tied LM head's, the embedding's own) as the C step runs it: through
    the kernels the module path runs such a weight with for a few rows (``apply_linear``'s compiled GEMV in
    float32, its row-major kernel in bfloat16). The weight must outlive the descriptor."""
    if weight.dtype != dtype or dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2 \
            or not weight.is_contiguous():
        raise FusedDecodeUnsupported(f"a {weight.dtype} {tuple(weight.shape)} row-major weight in a {dtype} model")
    desc = _Linear()
    desc.kind = F32_ROWS if dtype == torch.float32 else BF16_ROWS
    desc.n, desc.k, desc.weight = weight.shape[0], weight.shape[1], weight.data_ptr()
    return desc


def attach_lora(desc: _Linear, slot_args: tuple, in_features: int, w_bf16: int) -> None:
    """Adds a projection's LoRA slots (:attr:`~llmserve.lora.cpu_ops.CPULoRALayer.slot_args` and the rest) to its
    descriptor: a step given adapter rows adds their deltas right after the projection. The slot tensors must
    outlive the descriptor."""
    a, a_slot_stride, bt, bt_slot_stride, bt_stride, ranks, bounds, projections = slot_args
    desc.lora = _LoRA(a, bt, a_slot_stride, bt_slot_stride, bt_stride, ranks, bounds, in_features, projections,
                      w_bf16)


@dataclass
class DecoderLayerWeights:
    """One decoder layer as the step runs it: float32 norm weights (``q_norm`` / ``k_norm`` None without
    per-head norms), its four projections and its attention scale."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear
    scale: float


class DecodeLayersKernel:
    """The C step over a model's layers; :meth:`bind_caches` before the first :meth:`forward`."""

    def __init__(self, kernels: CPUKernels, layers: list[DecoderLayerWeights], final_norm: torch.Tensor, *,
                 hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int, eps: float,
                 dtype: torch.dtype, cos: torch.Tensor, sin: torch.Tensor, keep: list[torch.Tensor]) -> None:
        lib = kernels.library
        lib.llmserve_decode_layers_workspace.argtypes = [ctypes.POINTER(_Model), _L]
        lib.llmserve_decode_layers_workspace.restype = _L
        lib.llmserve_decode_layers.argtypes = [ctypes.POINTER(_Model), _P, _P, _L, _P, _P, _P, _L, _P,
                                                ctypes.POINTER(LoRAStepArgs), _P, _I]
        lib.llmserve_decode_layers.restype = _I
        lib.llmserve_decode_steps_workspace.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Ends), _L, _L]
        lib.llmserve_decode_steps_workspace.restype = _L
        lib.llmserve_decode_steps.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Ends), _L, _L, _P, _P, _P, _L,
                                               _P, _P, ctypes.POINTER(SampleParams), ctypes.c_uint64,
                                               ctypes.POINTER(LoRAStepArgs), _P, _P, _I]
        lib.llmserve_decode_steps.restype = _I
        self._lib = lib
        self.dtype, self.hidden = dtype, hidden
        self._norms = [t for w in layers for t in (w.input_norm, w.post_norm, w.q_norm, w.k_norm) if t is not None]
        self._keep = [*keep, final_norm, cos, sin, *self._norms]
        self._layers = (_Layer * len(layers))()
        for desc, w in zip(self._layers, layers):
            desc.input_norm, desc.post_norm = w.input_norm.data_ptr(), w.post_norm.data_ptr()
            desc.q_norm = w.q_norm.data_ptr() if w.q_norm is not None else None
            desc.k_norm = w.k_norm.data_ptr() if w.k_norm is not None else None
            desc.qkv, desc.o, desc.gate_up, desc.down, desc.scale = w.qkv, w.o, w.gate_up, w.down, w.scale
        self._model = _Model(len(layers), hidden, num_heads, num_kv_heads, head_dim, intermediate, 0, cos.shape[0],
                             eps, int(dtype == torch.bfloat16), cos.data_ptr(), sin.data_ptr(), final_norm.data_ptr(),
                             self._layers)
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._workspace = torch.empty(0, dtype=torch.uint8)
        self._ends: _Ends | None = None

    def attach_ends(self, embedding: torch.Tensor, head: _Linear, keep: list[torch.Tensor]) -> None:
        """The token embedding ``[vocab, hidden]`` (row-major, in the activations' dtype) and the LM head
        (:func:`linear_descriptor`, ``vocab`` outputs, its tensors in ``keep``) that :meth:`steps` runs; the
        weights must outlive the kernel.
        Raises :class:`FusedDecodeUnsupported` when they do not fit the layers."""
        if embedding.dtype != self.dtype or embedding.dim() != 2 or embedding.shape[1] != self.hidden \
                or not embedding.is_contiguous():
            raise FusedDecodeUnsupported(f"the token embedding is {embedding.dtype} {tuple(embedding.shape)}, not a "
                                         f"contiguous {self.dtype} [vocab, {self.hidden}]")
        if head.n != embedding.shape[0] or head.k != self.hidden:
            raise FusedDecodeUnsupported(f"the LM head is [{head.n}, {head.k}], the embedding "
                                         f"{tuple(embedding.shape)}")
        self._keep += [embedding, *keep]
        self._ends = _Ends(embedding.data_ptr(), embedding.shape[0], head)

    def bind_caches(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Each layer's (key, value) cache ``[blocks, block_size, kv_heads, head_dim]`` in the activations' dtype,
        contiguous within a block and both strided alike."""
        for desc, (key, value) in zip(self._layers, caches):
            if key.dtype != self.dtype or value.dtype != self.dtype or key.stride() != value.stride() \
                    or key.stride()[1:] != (key.shape[2] * key.shape[3], key.shape[3], 1):
                raise FusedDecodeUnsupported(f"a {key.dtype} KV cache strided {key.stride()} for {self.dtype} "
                                             f"activations")
            desc.key_cache, desc.value_cache, desc.block_stride = key.data_ptr(), value.data_ptr(), key.stride(0)
            self._model.block_size = key.shape[1]
        self._caches = caches

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                block_tables: torch.Tensor, seq_lens: torch.Tensor, lora: LoRAStepArgs | None = None) -> torch.Tensor:
        """The final norm's output [rows, hidden] for ``embeddings`` [rows, hidden] (one token per row): int64
        ``positions`` and ``slots`` [rows], int32 ``block_tables`` [rows, width] and ``seq_lens`` [rows]; ``lora``
        the step's adapter rows for the projections with slots attached (:func:`attach_lora`), None for none."""
        rows = embeddings.shape[0]
        if not self._caches:
            raise RuntimeError("decode layers: no KV caches bound")
        if embeddings.dtype != self.dtype or embeddings.shape != (rows, self.hidden) \
                or not embeddings.is_contiguous():
            raise ValueError(f"decode layers: embeddings must be contiguous {self.dtype} [rows, {self.hidden}]")
        for name, t, dtype in (("positions", positions, torch.int64), ("slots", slots, torch.int64),
                               ("seq_lens", seq_lens, torch.int32)):
            if t.dtype != dtype or t.shape != (rows,) or not t.is_contiguous():
                raise ValueError(f"decode layers: {name} must be {rows} contiguous {dtype}")
        if block_tables.dtype != torch.int32 or block_tables.shape[0] != rows or block_tables.stride(1) != 1:
            raise ValueError(f"decode layers: block_tables must be int32 [{rows}, width] with unit column stride")
        need = self._lib.llmserve_decode_layers_workspace(self._model, rows)
        if self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.uint8)
        out = torch.empty(rows, self.hidden, dtype=self.dtype)
        status = self._lib.llmserve_decode_layers(
            self._model, embeddings.data_ptr(), out.data_ptr(), rows, positions.data_ptr(), slots.data_ptr(),
            block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), lora, self._workspace.data_ptr(),
            torch.get_num_threads())
        self._check(status)
        return out

    def steps(self, first_tokens: torch.Tensor, start_positions: torch.Tensor, block_tables: torch.Tensor,
              steps: int, stops: list[list[int]] | None = None, sampling: list[SampleParams] | None = None,
              seed: int = 0, lora: LoRAStepArgs | None = None) -> torch.Tensor:
        """Up to ``steps`` decode steps (:meth:`attach_ends` first): row r feeds ``first_tokens[r]`` at
        ``start_positions[r]`` (int64 [rows]), then each step's token at the next position; returns the tokens
        int64 [steps run, rows], step t's of every row in row t: each row's argmax, or a draw under its
        ``sampling`` (per row; None: every row greedy) from a generator seeded with ``seed``. The steps end after
        the first in which a row's token is one of its ``stops`` (per row; None: none). ``block_tables`` int32
        [rows, width] must cover every position the steps reach; ``lora`` as :meth:`forward`'s."""
        rows = first_tokens.shape[0]
        if self._ends is None:
            raise RuntimeError("decode steps: no token embedding and LM head attached")
        if not self._caches:
            raise RuntimeError("decode layers: no KV caches bound")
        for name, t in (("first_tokens", first_tokens), ("start_positions", start_positions)):
            if t.dtype != torch.int64 or t.shape != (rows,) or not t.is_contiguous():
                raise ValueError(f"decode steps: {name} must be {rows} contiguous int64")
        if block_tables.dtype != torch.int32 or block_tables.shape[0] != rows or block_tables.stride(1) != 1:
            raise ValueError(f"decode steps: block_tables must be int32 [{rows}, width] with unit column stride")
        if steps < 1 or rows < 1:
            raise ValueError(f"decode steps: {steps} steps of {rows} rows")
        reach = int(start_positions.max()) + steps
        if int(start_positions.min()) < 0 or reach > block_tables.shape[1] * self._model.block_size:
            raise ValueError(f"decode steps: the block tables ({block_tables.shape[1]} blocks) do not cover position "
                             f"{reach - 1}")
        stop_ids = stop_starts = None
        if stops is not None:
            if len(stops) != rows:
                raise ValueError(f"decode steps: stop tokens for {len(stops)} rows, not {rows}")
            stop_ids = torch.tensor([t for row in stops for t in row] or [0], dtype=torch.int64)
            stop_starts = torch.tensor([0, *itertools.accumulate(map(len, stops))], dtype=torch.int64)
        if sampling is not None and len(sampling) != rows:
            raise ValueError(f"decode steps: sampling parameters for {len(sampling)} rows, not {rows}")
        sample = (SampleParams * rows)(*sampling) if sampling is not None else None
        threads = torch.get_num_threads()
        draw_threads = threads if sample is not None else 0
        need = self._lib.llmserve_decode_steps_workspace(self._model, self._ends, rows, draw_threads)
        if self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.uint8)
        tokens = torch.empty(steps, rows, dtype=torch.int64)
        status = self._lib.llmserve_decode_steps(
            self._model, self._ends, rows, steps, first_tokens.data_ptr(), start_positions.data_ptr(),
            block_tables.data_ptr(), block_tables.stride(0),
            None if stop_ids is None else stop_ids.data_ptr(), None if stop_starts is None else stop_starts.data_ptr(),
            sample, seed & (2**64 - 1), lora, tokens.data_ptr(), self._workspace.data_ptr(), threads)
        if status == -4:
            raise IndexError(f"decode steps: a first token is outside the vocabulary (0..{self._ends.vocab - 1})")
        if status < 0:
            self._check(status)
        return tokens[:status]

    def _check(self, status: int) -> None:
        if status == -1:
            raise IndexError(f"decode layers: a position is outside 0..{self._model.max_position - 1}")
        if status == -2:
            raise MemoryError("decode layers: no memory for the attention scores or a layer's activations")
        if status != 0:
            raise ValueError("decode layers: a kernel refused a layer's operands")
