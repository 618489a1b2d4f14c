"""The quantisation a model runs with: its checkpoint's ``quantization_config``, or ``--quantization``.

A checkpoint that says how it is quantised is read that way; ``--quantization`` then may only name the
same format. ``--quantization int8|fp8`` on a full-precision checkpoint quantises it while loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llmserve.config import LOAD_TIME_QUANTIZATION_SCHEMES, QUANTIZATION_METHODS
from llmserve.quantization.awq import AWQConfig
from llmserve.quantization.base import QuantizationConfig
from llmserve.quantization.checkpoint_params import CheckpointFormatError
from llmserve.quantization.compressed_tensors import CompressedTensorsConfig
from llmserve.quantization.gptq import GPTQConfig
from llmserve.quantization.online import OnlineQuantConfig

logger = logging.getLogger(__name__)

# One reader per name of config.CHECKPOINT_QUANTIZATION_FORMATS (the flag's names live with the flags).
CHECKPOINT_FORMATS: dict[str, Callable[[dict[str, Any]], QuantizationConfig]] = {
    "gptq": GPTQConfig.from_config, "awq": AWQConfig.from_config,
    "compressed-tensors": CompressedTensorsConfig.from_config}


def checkpoint_quantization(hf_config: Any) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config`` as a dict (None for a full-precision checkpoint)."""
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict()
    return raw or None


def get_quantization_config(hf_config: Any, quantization: str | None) -> QuantizationConfig | None:
    """The config every layer asks for its method, or None to run in full precision; logged when chosen."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown --quantization {quantization!r}; choose one of {', '.join(QUANTIZATION_METHODS)}")
    raw = checkpoint_quantization(hf_config)
    if raw is not None:
        method = str(raw.get("quant_method", "")).lower()
        if method not in CHECKPOINT_FORMATS:
            raise CheckpointFormatError(f"the checkpoint is quantised with {method or 'an unnamed method'!r}, which "
                                        f"llmserve does not read; it reads {', '.join(CHECKPOINT_FORMATS)}")
        if quantization not in (None, method):
            raise ValueError(f"--quantization {quantization} contradicts the checkpoint, which is {method}-quantised "
                             f"(quantization_config in its config.json); drop the flag or pass {method}")
        config = CHECKPOINT_FORMATS[method](raw)
    elif quantization in LOAD_TIME_QUANTIZATION_SCHEMES:
        config = OnlineQuantConfig(quantization)
    elif quantization is not None:
        raise ValueError(f"--quantization {quantization} names a checkpoint format, but this checkpoint has no "
                         "quantization_config; load-time quantisation is "
                         f"{' or '.join(LOAD_TIME_QUANTIZATION_SCHEMES)}")
    else:
        return None
    logger.info("Quantisation: %r", config)
    return config
