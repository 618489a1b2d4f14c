"""Find a checkpoint (local folder, Hugging Face Hub id or ``s3://`` URL), read its config and stream its weights.

Weights are read tensor by tensor from memory-mapped safetensors files straight into the model's
preallocated parameters, so peak memory is the model plus one tensor, never two copies of the model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from llmserve.distributed.parallel_state import get_tp_group
from llmserve.errors import ModelNotFoundError
from llmserve.model_loader.gguf_config import load_gguf_config
from llmserve.model_loader.gguf_loader import (GGUFTensors, download_gguf, gguf_packing, hub_gguf_reference,
                                               iterate_gguf_weights)
from llmserve.model_loader.model_source import is_gguf
from llmserve.model_loader.s3_loader import download_s3_checkpoint, is_s3_mirror, is_s3_url, iterate_s3_weights
from llmserve.models.registry import resolve_model_class, text_model_config
from llmserve.quantization.base import QuantizationConfig
from llmserve.quantization.gguf import GGUFConfig
from llmserve.quantization.registry import get_quantization_config

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "*.txt"]


def resolve_model_path(model: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A local folder or ``.gguf`` file as is; ``org/repo:QUANT`` is that repo's GGUF file of that quantisation;
    ``s3://bucket/prefix`` is a local mirror of its small files (the weights stay remote, see
    :mod:`~llmserve.model_loader.s3_loader`); anything else is a Hub id, downloaded (or found in the cache)
    through huggingface_hub.

    ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub: only the local cache is looked at.
    """
    if is_s3_url(model):
        if revision is not None:
            raise ModelNotFoundError(f"--revision / --tokenizer-revision name a Hub revision; {model} has none")
        return download_s3_checkpoint(model, download_dir, [p for p in _HUB_PATTERNS if p != "*.safetensors"])
    path = Path(model).expanduser()
    if path.is_dir() or is_gguf(path):
        return path
    if path.exists():
        raise ModelNotFoundError(f"model path {model} is a file but not a .gguf file; pass the checkpoint folder")
    gguf_reference = hub_gguf_reference(model)
    if gguf_reference is not None:
        try:
            return download_gguf(*gguf_reference, revision, download_dir)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"could not fetch the GGUF file {model!r}: {exc}") from None
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model:
        raise ModelNotFoundError(f"model folder {model} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir,
                                      allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"model {model!r} is not a local folder and is not in the Hugging Face cache"
            + (" (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else
               " and the Hub could not be reached")) from None
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise ModelNotFoundError(f"could not fetch model {model!r} from the Hugging Face Hub: {exc}") from None


def load_config(path: Path, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    from transformers import AutoConfig

    if is_gguf(path):
        return text_model_config(load_gguf_config(path))
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, revision=revision)
    return text_model_config(config)   # a multimodal checkpoint served as text: its language model's config


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelNotFoundError(f"{index.name} lists shards that are not in {path}: {', '.join(missing)}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {path} (PyTorch .bin checkpoints are not supported)")
    return files


def iterate_weights(path: Path, config: Any = None, quant_config: QuantizationConfig | None = None,
                    gguf_tensors: GGUFTensors | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time from every safetensors shard, or from the GGUF file (whose
    names are mapped through ``config``'s architecture; the weights a :class:`GGUFConfig` packs as their
    blocks; ``gguf_tensors``: the file already open), or streamed from S3 for an ``s3://`` mirror folder."""
    if is_gguf(path):
        yield from iterate_gguf_weights(gguf_tensors or GGUFTensors(path, config),
                                        quant_config.packs if isinstance(quant_config, GGUFConfig) else None)
        return
    if is_s3_mirror(path):
        yield from iterate_s3_weights(path)
        return
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(config: Any, path: Path, dtype: torch.dtype, device: torch.device,
               quantization: str | None = None) -> nn.Module:
    """Build this rank's part of the model (the TP and PP ranks come from
    :mod:`~llmserve.distributed.parallel_state`, trivial groups in a single process), load it, then let
    every layer post-process its loaded weights once (e.g. block them for the CPU kernels, or repack
    quantised ones). ``quantization``: ``--quantization`` (the checkpoint's own config applies regardless).
    A GGUF file without ``--quantization`` keeps its quantised linear weights packed (one rank)."""
    model_cls = resolve_model_class(config)
    quant_config = None
    gguf_tensors = GGUFTensors(path, config) if is_gguf(path) else None
    if gguf_tensors is not None and quantization is None and get_tp_group().world_size == 1:
        quant_config = gguf_packing(gguf_tensors, model_cls.checkpoint_name)
    if quant_config is None:
        quant_config = get_quantization_config(config, quantization)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config, quant_config)
    finally:
        torch.set_default_dtype(previous)
    if gguf_tensors is not None and quant_config is not None:   # what the layers took packed, once built
        logger.info("Quantisation: %r", quant_config)
    model.load_weights(iterate_weights(path, config, quant_config, gguf_tensors))
    del gguf_tensors   # its metadata (the whole vocabulary) is not needed once the weights are in
    for module in model.modules():
        process = getattr(module, "process_weights_after_loading", None)
        if callable(process):
            process()
    return model.eval()
