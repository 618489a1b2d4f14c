"""What the routes answer, as pydantic models for the OpenAPI document only: the handlers build their JSON
directly (nothing is validated on the way out), and the schema-driven fuzz test checks that what they
send conforms to these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]


class ErrorInfo(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object; every failure answers it."""

    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens served by the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (echo)")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="per position: the top logprobs tokens' texts -> logprob, plus the chosen token's")
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = Field(description="the stop string or stop token id that ended it")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """A streamed event: each choice's new text (and logprobs); with ``stream_options.include_usage`` every
    chunk has ``usage``, null but in the last one, which has no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the message is only tool calls")
    tool_calls: list[ToolCall] | None = Field(default=None, description="present when the model called tools")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = Field(default=None, description="in the call's first delta")
    arguments: str = Field(description="the next fragment of the arguments' JSON text")


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = Field(default=None, description="in the call's first delta")
    type: Literal["function"] | None = Field(default=None, description="in the call's first delta")
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, description="in a choice's first chunk only")
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(
        default=None, description="a call's id, type and name first, then fragments of its arguments")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    """A streamed event: a choice's role first, then its text, then its finish_reason; ``usage`` as in
    :class:`CompletionChunk`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class ResponseMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: ItemStatus
    role: Literal["assistant"]
    content: list[OutputText]


class ResponseFunctionCall(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str = Field(description="what a later function_call_output answers")
    name: str
    arguments: str = Field(description="JSON text")
    status: ItemStatus


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(description="cached_tokens: input tokens served by the prefix cache")
    output_tokens_details: dict[str, int]


class ResponseObject(BaseModel):
    """OpenAI's response object; what the request did not set is echoed with its default."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[ResponseMessage | ResponseFunctionCall]
    usage: ResponseUsage | None = Field(description="null while in progress")
    error: None
    incomplete_details: dict[str, str] | None = Field(description="{\"reason\": \"max_output_tokens\"} when cut")
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    parallel_tool_calls: bool
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    text: dict[str, Any]
    metadata: dict[str, str]
    user: str | None
    store: Literal[False]
    truncation: Literal["disabled"]
    previous_response_id: None
    reasoning: None
    background: Literal[False]


class ResponseStreamEvent(BaseModel):
    """One streamed event (``event:`` names its type): response.created, response.in_progress,
    response.output_item.added, response.content_part.added, response.output_text.delta,
    response.function_call_arguments.delta, their .done events, response.output_item.done, then
    response.completed or response.incomplete; or an ``error`` event."""

    type: str
    sequence_number: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None = None   # a LoRA adapter's base model
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int = Field(description="the input's position in the request")
    embedding: list[float] | str = Field(description="the vector, or with encoding_format base64 its float32 "
                                                     "little-endian bytes in base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage
