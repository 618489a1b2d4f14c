"""GGUF checkpoints: llama.cpp's one-file format, as ``./model-Q4_K_M.gguf`` or ``repo-id:Q4_K_M``.

The config (:mod:`~llmserve.model_loader.gguf_config`), the tokenizer and its chat template come from the
file's metadata through transformers' GGUF support, which also knows each architecture's tensor names and
the reshuffles llama.cpp's converter makes (the Q/K row permutation of Llama-style attention, BLOOM's fused
QKV...; Falcon's grouped QKV, which it leaves as it is, is undone here). The linear weights a
:class:`~llmserve.quantization.gguf.GGUFConfig` packs are handed over as their rows of blocks; every other
tensor is dequantised tensor by tensor into the model's dtype as it is loaded (peak memory: the model plus one
tensor) and runs at full precision.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmserve.quantization.gguf import GGUFConfig, gguf_quantization_config

logger = logging.getLogger(__name__)

# The tensor types llama.cpp's quantize writes for the usual mixes (Q4_K_M, Q5_K_M, Q6_K, Q8_0...).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
_REPO_AND_QUANT = re.compile(r"^(?P<repo>[\w.\-]+/[\w.\-]+):(?P<quant>[\w.\-]+)$")


def import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF checkpoints need the gguf package: pip install 'llmserve[gguf]'") from None
    return gguf


def hub_gguf_reference(model: str) -> tuple[str, str] | None:
    """``"org/repo:Q4_K_M"`` -> ``("org/repo", "Q4_K_M")``; None for anything else."""
    match = _REPO_AND_QUANT.match(model)
    return (match["repo"], match["quant"]) if match else None


def download_gguf(repo: str, quant: str, revision: str | None, download_dir: str | None) -> Path:
    """The repo's one GGUF file of that quantisation (``*Q4_K_M.gguf``, any case), fetched or from the cache."""
    from huggingface_hub import hf_hub_download, list_repo_files

    files = [f for f in list_repo_files(repo, revision=revision) if f.lower().endswith(".gguf")]
    wanted = re.compile(rf"(^|[^a-z0-9]){re.escape(quant.lower())}(\.gguf$|-\d+-of-\d+\.gguf$)")
    matches = sorted(f for f in files if wanted.search(f.lower()))
    if not matches:
        raise FileNotFoundError(f"{repo} has no {quant} GGUF file; it has: {', '.join(files) or 'no GGUF files'}")
    if len(matches) > 1:
        raise ValueError(f"{repo} has {len(matches)} {quant} GGUF files ({', '.join(matches)}): a split or "
                         f"ambiguous GGUF is not supported; pass one file's local path")
    return Path(hf_hub_download(repo, matches[0], revision=revision, cache_dir=download_dir))


def file_identity(path: Path) -> tuple[str, int, int]:
    """``(resolved path, modification time, size)``: a cache key that a rewritten file does not match."""
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size


def load_gguf_tokenizer(path: Path) -> Any:
    """The file's tokenizer, a new instance per call (one per thread that uses it) copied from the one built
    once per file: building it parses the whole vocabulary from the metadata."""
    return copy.deepcopy(_build_tokenizer(*file_identity(path)))


@functools.lru_cache(maxsize=1)
def _build_tokenizer(path: str, mtime_ns: int, size: int) -> Any:
    """Through the generic fast tokenizer where transformers cannot build the config its ``AutoTokenizer``
    would read first (Command-R, Cohere2)."""
    import_gguf()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from llmserve.model_loader.gguf_config import transformers_reads_config

    file = Path(path)
    tokenizer_class = AutoTokenizer if transformers_reads_config(file) else PreTrainedTokenizerFast
    try:
        return tokenizer_class.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as exc:
        try:
            missing = "tokenizer.ggml.model" not in import_gguf().GGUFReader(str(file)).fields   # only on failure
        except Exception:
            raise exc from None
        if missing:
            raise ValueError("the file carries no tokenizer (tokenizer.ggml.model); pass --tokenizer with the "
                             "model's folder or Hugging Face id") from None
        raise


class GGUFTensors:
    """A file's tensors with transformers' name map and tensor processor for its architecture, opened once per
    model load (the packing decision and the weights share it). A tensor type outside :data:`SUPPORTED_TYPES`
    is an error naming it, before any weight is read."""

    def __init__(self, path: Path, config: Any) -> None:
        gguf = import_gguf()
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, read_field)

        self.reader = gguf.GGUFReader(str(path))
        unsupported = sorted({t.tensor_type.name for t in self.reader.tensors} - set(SUPPORTED_TYPES))
        if unsupported:
            raise ValueError(f"{path.name} holds tensors of type {', '.join(unsupported)}, which llmserve cannot "
                             f"run; supported: {', '.join(SUPPORTED_TYPES)}")
        self.architecture = read_field(self.reader, "general.architecture")[0]
        self.parsed = {"config": config.to_dict()}
        processors = {**TENSOR_PROCESSORS, "falcon": _falcon_tensor_processor()}
        self.processor = processors.get(self.architecture, TensorProcessor)(config=self.parsed["config"])
        with torch.device("meta"):   # only its parameter names are needed
            self.names = get_gguf_hf_weights_map(AutoModelForCausalLM.from_config(config), self.processor)

    def process(self, weights: np.ndarray, name: str) -> tuple[str | None, np.ndarray]:
        """``(Hugging Face name or None, weights)`` as transformers' processor reorders the file's tensor."""
        result = self.processor.process(weights=weights, name=name, tensor_key_mapping=self.names,
                                        parsed_parameters=self.parsed)
        return self.names.get(result.name), result.weights


def gguf_packing(tensors: GGUFTensors) -> GGUFConfig | None:
    """Which of the file's linear weights run packed (:mod:`llmserve.quantization.gguf`); None: none of them."""
    return gguf_quantization_config({tensors.names[t.name]: t.tensor_type.name for t in tensors.reader.tensors
                                     if t.name in tensors.names and len(t.shape) == 2}, tensors.architecture)


def iterate_gguf_weights(tensors: GGUFTensors,
                         packs: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(Hugging Face name, float tensor)`` for every tensor of the file, dequantised one at a time; a
    weight ``packs`` names is yielded as its rows of GGUF blocks instead (``<layer>.qweight_type``, one type
    id per row, then ``<layer>.qweight``, uint8 [rows, row bytes]), its rows in the order transformers'
    processor puts them (found by passing the row indices through it)."""
    gguf = import_gguf()
    for tensor in tensors.reader.tensors:
        name = tensors.names.get(tensor.name)
        if name is not None and packs is not None and packs(name):
            rows = tensor.data.shape[0]
            _, order = tensors.process(np.arange(rows, dtype=np.float64).reshape(rows, 1), tensor.name)
            order = order.reshape(-1).astype(np.int64)
            if order.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)):
                raise ValueError(f"GGUF tensor {tensor.name}: transformers' processor does more than reorder its "
                                 f"rows, so it cannot load packed")
            layer = name.removesuffix(".weight")
            yield f"{layer}.qweight_type", torch.full((rows,), int(tensor.tensor_type), dtype=torch.uint8)
            yield f"{layer}.qweight", torch.from_numpy(np.ascontiguousarray(tensor.data[order]))
            continue
        name, weights = tensors.process(gguf.dequantize(tensor.data, tensor.tensor_type), tensor.name)
        if name is None:
            logger.info("GGUF tensor %s has no counterpart in the model; skipped", tensor.name)
            continue
        yield name, torch.from_numpy(np.require(weights, np.float32, ["C", "W"]))


def _falcon_tensor_processor() -> type:
    """Undoes llama.cpp's Falcon QKV layout (``jploski``: all q rows, then all k, then all v) into
    transformers' (per KV group: its query heads, then its key and value head), which transformers' own GGUF
    loading leaves as it is. With one KV head (Falcon-7B) the two are the same."""
    from transformers.modeling_gguf_pytorch_utils import GGUFTensor, TensorProcessor

    class FalconTensorProcessor(TensorProcessor):
        def process(self, weights: np.ndarray, name: str, **kwargs: Any) -> GGUFTensor:
            if ".attn_qkv." not in name:
                return GGUFTensor(weights, name, {})
            groups, heads = self.config["num_kv_heads"], self.config["num_attention_heads"]
            head_dim = self.config["hidden_size"] // heads
            rest = weights.shape[1:]
            q, k, v = np.split(weights, [heads * head_dim, (heads + groups) * head_dim])
            grouped = np.concatenate([q.reshape(groups, heads // groups, head_dim, *rest),
                                      k.reshape(groups, 1, head_dim, *rest), v.reshape(groups, 1, head_dim, *rest)],
                                     axis=1)
            return GGUFTensor(grouped.reshape(weights.shape), name, {})

    return FalconTensorProcessor
