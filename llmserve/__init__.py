"""llmserve: a high-throughput LLM inference engine with a paged KV cache and continuous batching."""

from llmserve.entrypoints.llm import LLM
from llmserve.outputs import CompletionOutput, Logprob, RequestOutput
from llmserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
