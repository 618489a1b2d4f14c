"""Tool-call parsers: the model's generated text -> content and OpenAI ``tool_calls``, final or streamed."""

from __future__ import annotations

from llmserve.entrypoints.openai.tool_parsers.base import ParsedCall, ParsedOutput, ToolCallParser
from llmserve.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from llmserve.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from llmserve.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from llmserve.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser

# --tool-call-parser NAME -> parser (vLLM's names for the same formats)
TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
}

__all__ = ["TOOL_CALL_PARSERS", "ParsedCall", "ParsedOutput", "ToolCallParser"]
