"""The request body of ``POST /v1/embeddings``: OpenAI's embeddings request (pydantic), whose JSON schema is
the OpenAPI document's. ``input`` takes the four prompt shapes of completions; ``dimensions`` is refused
with a 400 naming it, since these models have no Matryoshka representation to shorten a vector by; ``user``
is accepted and not used (OpenAI's end-user id, for their abuse monitoring). vLLM's ``normalize`` turns the
L2 normalisation on or off for this request; ``add_special_tokens`` and ``cache_salt`` work as on completions,
and ``priority`` is refused unless 0."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from llmserve.entrypoints.openai.protocol import PromptInput, refuse_unless_noop, prompt_list, refuse_empty_prompts
from llmserve.entrypoints.openai.request_base import RequestModel


class EmbeddingRequest(RequestModel):
    model: str | None = None
    input: PromptInput = Field(description="a string, a list of strings, token ids or a list of token-id lists; "
                                           "none of them empty, each within the model's context length")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: each vector's float32 little-endian bytes, as OpenAI's client decodes")
    dimensions: None = Field(default=None, description="not supported (400): the model cannot shorten its vectors")
    user: str | None = Field(default=None, description="accepted, not used")
    normalize: bool | None = Field(default=None, description="vLLM's: L2-normalise the vectors (default: as "
                                                             "--pooler-config says, true unless set otherwise)")
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, description=(
        "vLLM's: keep only the prompt's last k tokens (-1: the model's context length); not 0"))
    add_special_tokens: bool = Field(default=True, description="vLLM's: add the tokenizer's special tokens (BOS)")
    # prefix-cache blocks are shared only between requests with the same salt (last-token pooling uses the cache)
    cache_salt: str | None = Field(default=None, min_length=1)
    priority: int | None = Field(default=None, description="not supported (400 unless 0)")

    _not_empty = field_validator("input", mode="before")(refuse_empty_prompts)

    _refuse_priority = field_validator("priority", mode="before")(refuse_unless_noop)

    @field_validator("dimensions", mode="before")
    @classmethod
    def _refuse_dimensions(cls, value: Any) -> Any:
        if value is not None:
            raise PydanticCustomError("not_supported", "not supported: this model has no Matryoshka representation, "
                                                       "so its embeddings cannot be shortened")
        return value

    def prompts(self) -> list[str | list[int]]:
        return prompt_list(self.input)
