"""Quantisation methods: how a linear layer stores its weights and multiplies by them.

A layer asks its :class:`QuantizationConfig` for a :class:`QuantizeMethodBase` (or gets
:class:`UnquantizedLinearMethod`); the method creates the parameters, post-processes them once after
loading and runs the matmul, so new formats plug in without touching the layers or the models.
"""

from llmserve.quantization.base import QuantizationConfig, QuantizeMethodBase
from llmserve.quantization.unquantized import UnquantizedLinearMethod, apply_linear, blocked_layout_available

__all__ = ["QuantizationConfig", "QuantizeMethodBase", "UnquantizedLinearMethod", "apply_linear",
           "blocked_layout_available"]
