"""llmserve: a high-throughput LLM inference engine with a paged KV cache and continuous batching.

The public names are imported on first use (PEP 562), so a process that needs only a light part of the
package (the chat-template renderer, the CLI's argument parsing) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]

_EXPORTS = {"LLM": "llmserve.entrypoints.llm", "SamplingParams": "llmserve.sampling_params",
            "RequestOutput": "llmserve.outputs", "CompletionOutput": "llmserve.outputs", "Logprob": "llmserve.outputs"}

if TYPE_CHECKING:
    from llmserve.entrypoints.llm import LLM
    from llmserve.outputs import CompletionOutput, Logprob, RequestOutput
    from llmserve.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
