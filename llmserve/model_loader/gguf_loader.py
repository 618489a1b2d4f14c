"""GGUF checkpoints: llama.cpp's one-file format, as ``./model-Q4_K_M.gguf`` or ``repo-id:Q4_K_M``.

The config (:mod:`~llmserve.model_loader.gguf_config`), the tokenizer and its chat template come from the
file's metadata through transformers' GGUF support, which also knows each architecture's tensor names and
the reshuffles llama.cpp's converter makes (the Q/K row permutation of Llama-style attention, BLOOM's fused
QKV...; Falcon's grouped QKV, which it leaves as it is, is undone here). DeepSeek-V2/V3 and Gemma 4, which it
does not read, are mapped by :mod:`~llmserve.model_loader.gguf_deepseek` and
:mod:`~llmserve.model_loader.gguf_gemma4`. The linear weights a
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

from llmserve.model_loader.gguf_deepseek import LatentUpProjections, deepseek_names, pre_tokenizer
from llmserve.model_loader.gguf_experts import (WHOLE_STACKS, check_experts, is_moe_tensor, moe_names,
                                                 stacked_experts_layer, whole_stack_experts)
from llmserve.model_loader.gguf_gemma4 import ROPE_FREQS, gemma4_names, values_from_keys
from llmserve.quantization.gguf import GGUFConfig, gguf_quantization_config

logger = logging.getLogger(__name__)

# The tensor types llama.cpp's quantize writes for the usual mixes (Q4_K_M, Q5_K_M, Q6_K, Q8_0...).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
# Architectures whose tensor names are mapped here (transformers' GGUF map lacks them, or some of their tensors);
# their tensors load as they are (no processor), a Gemma 4 layer's experts as its one stack.
_OWN_NAMES: dict[str, Callable[[Iterator[str]], dict[str, str]]] = {"deepseek2": deepseek_names,
                                                                   "gemma4": gemma4_names}
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
    from huggingface_hub import hf_hub_download

    files = _repo_gguf_files(repo, revision, download_dir)
    wanted = re.compile(rf"(^|[^a-z0-9]){re.escape(quant.lower())}(\.gguf$|-\d+-of-\d+\.gguf$)")
    matches = sorted(f for f in files if wanted.search(f.lower()))
    if not matches:
        raise FileNotFoundError(f"{repo} has no {quant} GGUF file; it has: {', '.join(files) or 'no GGUF files'}")
    if len(matches) > 1:
        raise ValueError(f"{repo} has {len(matches)} {quant} GGUF files ({', '.join(matches)}): a split or "
                         f"ambiguous GGUF is not supported; pass one file's local path")
    return Path(hf_hub_download(repo, matches[0], revision=revision, cache_dir=download_dir))


def _repo_gguf_files(repo: str, revision: str | None, download_dir: str | None) -> list[str]:
    """The repo's GGUF files: as the Hub lists them, or, offline (``HF_HUB_OFFLINE``) or with the Hub out of
    reach, as the revision's snapshot in the cache holds them (a server started from a cache an init container
    filled)."""
    from huggingface_hub import constants, list_repo_files, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        if not constants.HF_HUB_OFFLINE:
            return [f for f in list_repo_files(repo, revision=revision) if f.lower().endswith(".gguf")]
        unreachable: Exception = LocalEntryNotFoundError("HF_HUB_OFFLINE is set")
    except HfHubHTTPError:
        raise   # the Hub answered: no such repo or revision, or no access
    except Exception as exc:   # noqa: BLE001 - any failure to reach the Hub: look in the cache
        unreachable = exc
    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=download_dir, local_files_only=True,
                                        allow_patterns=["*.gguf"]))
    except LocalEntryNotFoundError:
        raise OSError(f"{repo} is not in the Hugging Face cache and the Hub cannot be reached ({unreachable})") \
            from None
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.name.lower().endswith(".gguf"))


def open_gguf(path: Path) -> Any:
    """The file's ``GGUFReader``. A file that cannot be read (not GGUF, truncated, corrupt), one part of a file
    split by llama.cpp's ``llama-gguf-split``, or a mixture-of-experts file of an architecture whose experts are
    not mapped (:func:`~llmserve.model_loader.gguf_experts.check_experts`) is a ValueError naming it."""
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:   # noqa: BLE001 - whatever the reader trips on, the file is unreadable
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(exc).__name__}: {exc}") \
            from None
    from transformers.modeling_gguf_pytorch_utils import read_field

    parts = int((read_field(reader, "split.count") or [1])[0])
    if parts > 1:
        raise ValueError(f"{path.name} is one part of a GGUF file split into {parts}; merge the parts first "
                         f"(llama.cpp: llama-gguf-split --merge FIRST-PART OUT.gguf)")
    architecture = (read_field(reader, "general.architecture") or [""])[0]
    check_experts(architecture, path.name, [t.name for t in reader.tensors])
    return reader


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
        tokenizer = tokenizer_class.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as exc:
        try:
            missing = "tokenizer.ggml.model" not in open_gguf(file).fields   # only on failure
        except Exception:
            raise exc from None
        if missing:
            raise ValueError("the file carries no tokenizer (tokenizer.ggml.model); pass --tokenizer with the "
                             "model's folder or Hugging Face id") from None
        raise
    _set_pre_tokenizer(tokenizer, file)
    return tokenizer


def _set_pre_tokenizer(tokenizer: Any, path: Path) -> None:
    """llama.cpp's pre-tokenizer for a byte-level vocabulary whose ``tokenizer.ggml.pre`` transformers does not
    know (DeepSeek-V3's: :func:`~llmserve.model_loader.gguf_deepseek.pre_tokenizer`); read from the metadata
    alone (transformers' reader, which leaves the vocabulary unparsed)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path), ())
    splits = pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    if splits is not None and metadata.get("tokenizer.ggml.model") == "gpt2":
        tokenizer.backend_tokenizer.pre_tokenizer = splits


class GGUFTensors:
    """A file's tensors with transformers' name map and tensor processor for its architecture, opened once per
    model load (the packing decision and the weights share it). A tensor type outside :data:`SUPPORTED_TYPES`
    is an error naming it, before any weight is read."""

    def __init__(self, path: Path, config: Any) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, read_field)

        self.reader = open_gguf(path)
        unsupported = sorted({t.tensor_type.name for t in self.reader.tensors} - set(SUPPORTED_TYPES))
        if unsupported:
            raise ValueError(f"{path.name} holds tensors of type {', '.join(unsupported)}, which llmserve cannot "
                             f"run; supported: {', '.join(SUPPORTED_TYPES)}")
        self.architecture = read_field(self.reader, "general.architecture")[0]
        self.parsed = {"config": config.to_dict()}
        processors = {**TENSOR_PROCESSORS, "falcon": _falcon_tensor_processor()}
        self.processor = processors.get(self.architecture, TensorProcessor)(config=self.parsed["config"])
        if self.architecture in _OWN_NAMES:   # transformers has no (complete) GGUF map for it
            self.names = _OWN_NAMES[self.architecture](t.name for t in self.reader.tensors)
            return
        with torch.device("meta"):   # only its parameter names are needed (llama.cpp's Mixtral is a llama)
            self.names = get_gguf_hf_weights_map(AutoModelForCausalLM.from_config(config), self.processor,
                                                 model_type="llama" if config.model_type == "mixtral" else None)

    def process(self, weights: np.ndarray, name: str) -> tuple[str | None, np.ndarray]:
        """``(Hugging Face name or None, weights)`` as transformers' processor reorders the file's tensor. A
        processor may keep a tensor under a name of its own and return none (GPT-2's, for ``output.weight``: the
        checkpoint's ``lm_head.weight``): that tensor, under that name."""
        kept = self.parsed.setdefault("tensors", {})
        before = set(kept)
        result = self.processor.process(weights=weights, name=name, tensor_key_mapping=self.names,
                                        parsed_parameters=self.parsed)
        new = set(kept) - before
        if result.name is None and len(new) == 1:
            own_name = new.pop()
            return own_name, kept.pop(own_name).numpy()
        return self.names.get(result.name), result.weights


def gguf_packing(tensors: GGUFTensors, rename: Callable[[str], str] | None = None) -> GGUFConfig | None:
    """Which of the file's linear weights (and stacked experts) run packed (:mod:`llmserve.quantization.gguf`);
    None: none of them. ``rename``: the model's name for a Hugging Face one (its class's ``checkpoint_name``)."""
    expert_types: dict[int, set[str]] = {}
    for t in tensors.reader.tensors:
        layer = stacked_experts_layer(t.name)
        if layer is not None:
            expert_types.setdefault(layer, set()).add(t.tensor_type.name)
    weight_types = {tensors.names[t.name]: t.tensor_type.name for t in tensors.reader.tensors
                    if t.name in tensors.names and len(t.shape) == 2 and not is_moe_tensor(t.name)}
    if tensors.architecture == "gemma4":
        weight_types = values_from_keys(weight_types, tensors.parsed["config"])
    return gguf_quantization_config(weight_types, tensors.architecture, expert_types, rename)


def iterate_gguf_weights(tensors: GGUFTensors,
                         packs: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(Hugging Face name, float tensor)`` for every tensor of the file, dequantised one at a time (a
    layer's stacked experts one expert at a time: :mod:`~llmserve.model_loader.gguf_experts`); a weight
    ``packs`` names is yielded as its rows of GGUF blocks instead (``<layer>.qweight_type``, one type id per row,
    then ``<layer>.qweight``, uint8 [rows, row bytes]), its rows in the order transformers' processor puts them
    (found by passing the row indices through it: :func:`_row_order`)."""
    gguf = import_gguf()
    latent_up = LatentUpProjections()
    for tensor in tensors.reader.tensors:
        if latent_up.holds(tensor.name):   # half of a DeepSeek kv_b_proj
            for name, weights in latent_up.join(tensor.name, gguf.dequantize(tensor.data, tensor.tensor_type)):
                yield name, torch.from_numpy(np.require(weights, np.float32, ["C", "W"]))
            continue
        if tensor.name == ROPE_FREQS and tensors.architecture == "gemma4":   # read into the config
            continue
        experts = whole_stack_experts(tensor.name, tensor.data) if tensors.architecture in WHOLE_STACKS else None
        if experts and packs is not None and packs(f"{experts[0][0]}.weight"):   # each expert its rows of blocks
            for layer, rows in experts:
                yield from _blocks(layer, rows, tensor.tensor_type)
            continue
        if is_moe_tensor(tensor.name) and tensors.architecture not in WHOLE_STACKS:   # stacked experts, a router
            names = moe_names(tensors.architecture, tensor.name, tensor.data.shape[0])
            if packs is not None and tensor.data.ndim == 3 and packs(names[0]):   # each expert its rows of blocks
                for name, rows in zip(names, tensor.data):
                    yield from _blocks(name.removesuffix(".weight"), rows, tensor.tensor_type)
                continue
            weights = gguf.dequantize(tensor.data, tensor.tensor_type)
            for name, part in zip(names, weights if weights.ndim == 3 else [weights]):
                yield name, torch.from_numpy(np.require(part, np.float32, ["C", "W"]))
            continue
        name = tensors.names.get(tensor.name)
        if name is not None and packs is not None and packs(name):
            yield from _blocks(name.removesuffix(".weight"), tensor.data[_row_order(tensors, tensor)],
                               tensor.tensor_type)
            continue
        name, weights = tensors.process(gguf.dequantize(tensor.data, tensor.tensor_type), tensor.name)
        if name is None:
            logger.info("GGUF tensor %s has no counterpart in the model; skipped", tensor.name)
            continue
        yield name, torch.from_numpy(np.require(weights, np.float32, ["C", "W"]))


class NotPackable(ValueError):
    """transformers' processor changes a tensor in more than its row order, so its rows cannot load packed."""


def _row_order(tensors: GGUFTensors, tensor: Any) -> np.ndarray:
    """The order transformers' processor puts the rows of a 2-D tensor in, found by passing it numbered entries:
    two columns, entry (r, c) numbered 2r + c (a column permutation shows too); for a processor that reshapes by
    the column count (BLOOM's), a matrix of the tensor's shape whose entries are their row's index.

    A processor that transposes the whole tensor (GPT-2's, into the checkpoint's ``Conv1D`` layout ``[in, out]``)
    leaves the file's order: a GGUF weight is always ``[out, in]`` (what ggml multiplies by), and the model
    transposes a ``Conv1D`` weight back to the linear layout, so the file's rows are the layer's output rows.
    Any other change to the numbered entries raises :class:`NotPackable` (with the full-width matrix a change
    within a row's columns cannot be seen)."""
    rows, columns = tensor.data.shape[0], int(tensor.shape[0])
    try:
        return _order_of(tensors, tensor.name, np.arange(2 * rows, dtype=np.int64).reshape(rows, 2), 2)
    except NotPackable:
        raise
    except ValueError:   # the processor's own: it needs the real width
        pass
    return _order_of(tensors, tensor.name,
                     np.broadcast_to(np.arange(rows, dtype=np.int32)[:, None], (rows, columns)), 1)


def _order_of(tensors: GGUFTensors, name: str, numbered: np.ndarray, per_row: int) -> np.ndarray:
    """The row order the processor gives ``numbered`` (entry (r, c) numbered ``per_row * r + c`` where
    ``per_row`` is its width, else ``r``); :class:`NotPackable` unless it reorders or transposes whole rows."""
    rows, columns = numbered.shape
    _, moved = tensors.process(numbered, name)
    if moved.shape == (columns, rows) and (moved == numbered.T).all():
        return np.arange(rows)   # transposed whole: the file's order
    order = moved[:, 0] // per_row if moved.shape == (rows, columns) else None
    # (reordered, a matrix of row indices is its order broadcast: no copy of a full-width probe)
    if order is None or not np.array_equal(np.sort(order), np.arange(rows)) \
            or not (moved == (order[:, None] if per_row == 1 else numbered[order])).all():
        raise NotPackable(f"GGUF tensor {name}: transformers' processor does more than reorder or transpose its "
                          f"rows, so it cannot load packed")
    return order.astype(np.int64)


def _blocks(layer: str, rows: np.ndarray, tensor_type: int) -> Iterator[tuple[str, torch.Tensor]]:
    """A layer's rows of GGUF blocks as the packed method loads them: their type (one id a row), then the bytes."""
    yield f"{layer}.qweight_type", torch.full((rows.shape[0],), int(tensor_type), dtype=torch.uint8)
    yield f"{layer}.qweight", torch.from_numpy(np.ascontiguousarray(rows))


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
