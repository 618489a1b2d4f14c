"""Write the generated float checkpoints in the quantised formats, laid out as the real tools write them.

No quantised checkpoint can be downloaded here, so the loaders are tested on files made from the project's
own checkpoints. Every projection (``q/k/v/o_proj``, ``gate/up/down_proj``; a mixture of experts' shared
expert and each of its experts, Mixtral's ``w1/w3/w2`` too) is quantised round-to-nearest (the layout, not the
calibration, is what a loader reads) and written:

* ``gptq``: AutoGPTQ / GPTQModel's ``qweight``/``qzeros``/``scales``/``g_idx`` (codes packed along the
  input dim, zero points along the output dim, lowest bits first; v1 stores ``zero - 1``, ``gptq_v2`` the
  zero); ``desc_act`` quantises the columns in a permuted order (one per input, shared by the projections
  that read it, as act-order's Hessian is) and records each column's group in ``g_idx``;
* ``awq``: AutoAWQ's gemm layout (``qweight`` ``[in, out / 8]`` in the ``[0, 2, 4, 6, 1, 3, 5, 7]`` nibble
  order, asymmetric zeros packed the same way);
* ``ct-w4a16``, ``ct-w8a8``, ``ct-fp8-dynamic``, ``ct-fp8-static``: llm-compressor's compressed-tensors
  (``pack-quantized`` int4 offset by 8 in int32 along the input dim with ``weight_shape``; ``int-quantized``
  int8 per channel; ``float-quantized`` e4m3 per channel with dynamic per-token activations, or per tensor
  with a static ``input_scale``).

Every other matrix of a decoder layer stays in float, as the tools leave it, and the config says so (GPTQ's and
AWQ's ``modules_to_not_convert``, compressed-tensors' ``ignore``): a router (``mlp.gate``), Qwen2-MoE's
``shared_expert_gate``, DeepSeek's latent-attention projections.

Next to each, the same model with every weight replaced by its dequantised value, in float32: the oracle
transformers runs. (transformers with the ``compressed-tensors`` package decompresses the compressed-tensors
files to these same weights: ``tests/quantization/test_compressed_tensors.py``.)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmserve.model_loader.loader import iterate_weights

INPUT_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp",
            "up_proj": "mlp", "down_proj": "down", "w1": "mlp", "w3": "mlp", "w2": "down"}
PROJECTIONS = tuple(INPUT_OF)      # Mixtral's experts: w1 (gate), w3 (up), w2 (down)
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FORMATS = ("gptq", "awq", "ct-w4a16", "ct-w8a8", "ct-fp8-dynamic", "ct-fp8-static")
FP8_MAX = 448.0


def _pack_int32(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned codes ``[..., m]`` -> int32 ``[..., m * bits / 32]``, the ``i``-th field of each word (lowest
    bits first) holding value ``order[i]`` of its group (``i`` without ``order``)."""
    pack = 32 // bits
    groups = values.to(torch.int64).reshape(*values.shape[:-1], -1, pack)
    if order is not None:
        groups = groups[..., list(order)]
    words = (groups << (torch.arange(pack) * bits)).sum(-1)
    return (words & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)


def _round_to_nearest(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's quantiser on rows of ``w`` [out, cols]: codes 0..maxq, fp16 scale and integer zero per row."""
    maxq = 2 ** bits - 1
    xmin, xmax = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    scale = ((xmax - xmin) / maxq).clamp(min=1e-8).half().float()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale).clamp(1, maxq)
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    return codes, scale, zero


def _gptq(w: torch.Tensor, perm: torch.Tensor | None, bits: int, group: int, sym: bool, v2: bool):
    n, k = w.shape
    order = perm if perm is not None else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group).to(torch.int32)
    groups = -(-k // group)
    codes, deq = torch.empty(n, k), torch.empty(n, k)
    scales, zeros = torch.empty(groups, n), torch.empty(groups, n)
    for g in range(groups):
        cols = order[g * group:(g + 1) * group]
        c, s, z = _round_to_nearest(w[:, cols], bits, sym)
        codes[:, cols], scales[g], zeros[g] = c, s, z
        deq[:, cols] = s[:, None] * (c - z[:, None])
    stored_zeros = zeros if v2 else zeros - 1
    tensors = {"qweight": _pack_int32(codes, bits).T.contiguous(), "qzeros": _pack_int32(stored_zeros, bits),
               "scales": scales.half(), "g_idx": g_idx}
    return tensors, deq


def _awq(w: torch.Tensor, group: int):
    n, k = w.shape
    groups = -(-k // group)
    codes, deq = torch.empty(n, k), torch.empty(n, k)
    scales, zeros = torch.empty(groups, n), torch.empty(groups, n)
    for g in range(groups):
        cols = slice(g * group, (g + 1) * group)
        c, s, z = _round_to_nearest(w[:, cols], 4, sym=False)
        codes[:, cols], scales[g], zeros[g] = c, s, z
        deq[:, cols] = s[:, None] * (c - z[:, None])
    tensors = {"qweight": _pack_int32(codes.T, 4, AWQ_PACK_ORDER), "qzeros": _pack_int32(zeros, 4, AWQ_PACK_ORDER),
               "scales": scales.half()}
    return tensors, deq


def _ct_w4a16(w: torch.Tensor, group: int):
    n, k = w.shape
    grouped = w.reshape(n, -1, group)
    scale = (grouped.abs().amax(dim=-1) / 7.5).clamp(min=1e-8).half().float()       # compressed-tensors: bit range / 2
    q = torch.clamp(torch.round(grouped / scale[..., None]), -8, 7)
    deq = (q * scale[..., None]).reshape(n, k)
    packed = _pack_int32((q.reshape(n, k) + 8), 4)
    return {"weight_packed": packed, "weight_scale": scale.half(), "weight_shape": torch.tensor([n, k])}, deq


def _ct_w8a8(w: torch.Tensor):
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
    q = torch.clamp(torch.round(w / scale), -127, 127)
    return {"weight": q.to(torch.int8), "weight_scale": scale}, q * scale


def _ct_fp8(w: torch.Tensor, per_tensor: bool):
    amax = w.abs().amax().reshape(1, 1) if per_tensor else w.abs().amax(dim=1, keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    tensors = {"weight": q, "weight_scale": scale.reshape(1) if per_tensor else scale}
    if per_tensor:
        tensors["input_scale"] = torch.tensor([8.0 / FP8_MAX])   # hidden states of the tiny models stay within 8
    return tensors, q.float() * scale


def _ct_config(fmt: str, group: int, float_modules: list[str]) -> dict[str, Any]:
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
               "group_size": None, "actorder": None, "observer": "minmax"}
    acts = None
    storage = {"ct-w4a16": "pack-quantized", "ct-w8a8": "int-quantized"}.get(fmt, "float-quantized")
    if fmt == "ct-w4a16":
        weights.update(num_bits=4, strategy="group", group_size=group)
    elif fmt == "ct-w8a8":
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    else:
        static = fmt == "ct-fp8-static"
        weights.update(type="float", strategy="tensor" if static else "channel")
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor" if static else "token",
                "dynamic": not static}
    return {"quant_method": "compressed-tensors", "format": storage, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None, "format": storage}},
            "ignore": ["lm_head", *float_modules], "kv_cache_scheme": None, "version": "0.20.0"}


def _input_perm(layer_name: str, projection: str, k: int, seed: int) -> torch.Tensor:
    """act-order's column order, the same for the projections that read the same input (an expert's gate and
    up), different for each expert."""
    layer = int(layer_name.split(".layers.")[1].split(".")[0])
    expert = _EXPERT.search(layer_name)
    source = (0 if expert is None else 1 + int(expert.group(1))) * 10 + list(INPUT_OF.values()).index(
        INPUT_OF[projection])
    key = (seed * 100000 + layer * 1000 + source) % (2 ** 31)
    return torch.randperm(k, generator=torch.Generator().manual_seed(key))


def write_quantized_checkpoint(checkpoint: Path, out: Path, fmt: str, *, bits: int = 4, group_size: int = 32,
                               desc_act: bool = False, sym: bool = True, v2: bool = False,
                               seed: int = 0) -> tuple[Path, Path]:
    """``checkpoint`` (a generated float checkpoint folder) in format ``fmt`` at ``out``, and its dequantised
    float32 twin at ``out`` + ``-dequantized``; returns both folders. ``bits``, ``desc_act``, ``sym``, ``v2``:
    GPTQ only; ``group_size``: GPTQ (-1: one group), AWQ and W4A16."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    reference = Path(f"{out}-dequantized")
    for folder in (out, reference):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    quantized, dequantized, float_modules = {}, {}, []
    for name, tensor in iterate_weights(checkpoint):
        stem, _, leaf = name.rpartition(".")
        projection = stem.rpartition(".")[2]
        if projection not in PROJECTIONS or leaf != "weight":
            quantized[name] = dequantized[name] = tensor.float().contiguous()
            if leaf == "weight" and tensor.dim() == 2 and ".layers." in stem:
                float_modules.append(stem)
            continue
        w = tensor.float()
        k = w.shape[1]
        if fmt == "gptq":
            group = k if group_size == -1 else group_size
            perm = _input_perm(name, projection, k, seed) if desc_act else None
            tensors, deq = _gptq(w, perm, bits, group, sym, v2)
        elif fmt == "awq":
            tensors, deq = _awq(w, group_size)
        elif fmt == "ct-w4a16":
            tensors, deq = _ct_w4a16(w, group_size)
        elif fmt == "ct-w8a8":
            tensors, deq = _ct_w8a8(w)
        else:
            tensors, deq = _ct_fp8(w, per_tensor=fmt == "ct-fp8-static")
        quantized.update({f"{stem}.{key}": value.contiguous() for key, value in tensors.items()})
        dequantized[name] = deq.float().contiguous()
    save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantized, str(reference / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((checkpoint / "config.json").read_text())
    for folder in (out, reference):
        (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32", "dtype": "float32"},
                                                       indent=2))
    if fmt == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
              "checkpoint_format": "gptq_v2" if v2 else "gptq", "static_groups": False, "true_sequential": True,
              "damp_percent": 0.01, **({"modules_to_not_convert": float_modules} if float_modules else {})}
    elif fmt == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": float_modules or None}
    else:
        qc = _ct_config(fmt, group_size, float_modules)
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qc}, indent=2))
    return out, reference
