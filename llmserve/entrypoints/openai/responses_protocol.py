"""Request body of ``POST /v1/responses``: the subset of OpenAI's Responses API that vLLM serves.

Input is a string or a list of items: messages (``input_text`` / ``output_text`` parts), earlier
``function_call`` items and their ``function_call_output``. ``instructions`` become the system message;
function ``tools`` and ``tool_choice`` work as on chat; ``text.format`` is ``response_format``. Responses
are not stored, so what needs storage (``store: true``, ``previous_response_id``, ``background``) and what
llmserve has no model for (``reasoning``, ``include``, images and files) is refused with a 400 naming it.
:meth:`ResponsesRequest.as_chat_request` maps the request onto the chat request that runs it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmserve.entrypoints.openai.chat_protocol import FUNCTION_NAME_PATTERN, MAX_TOOLS, ToolParameters
from llmserve.entrypoints.openai.protocol import ChatCompletionRequest, JsonSchemaResponseFormat
from llmserve.entrypoints.openai.request_base import RequestModel
from llmserve.sampling_params import INT64_MAX

_NOT_STORED = "responses are not stored"


class InputText(RequestModel):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText] = Field(description="a string, or input_text / output_text parts (images and "
                                                       "files are not supported)")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


class FunctionCallItem(RequestModel):
    """A call the model made earlier in the conversation."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = Field(description="JSON text")
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(RequestModel):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str
    id: str | None = None
    status: str | None = None


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if kind in ("message", "function_call", "function_call_output") else "message"


InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")], Discriminator(_item_kind)]


class FunctionTool(RequestModel):
    """The Responses API's function tool (flat, unlike chat's ``{"type", "function": {...}}``)."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: ToolParameters | None = None
    strict: bool | None = Field(default=None, description="as on chat: enforced with required / named, and with "
                                                           "auto by the --tool-call-parser's format (not pythonic)")


class NamedFunctionChoice(RequestModel):
    type: Literal["function"]
    name: str


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, description="required with json_schema")
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _named_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            missing = "name" if self.name is None else "schema"
            raise PydanticCustomError("field_required", "{missing} is required with json_schema", {"missing": missing})
        return self


class TextConfig(RequestModel):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(default=None, description="medium only (400 otherwise): a model "
                                                                           "trained for the hint would be needed")


class ResponsesRequest(RequestModel):
    model: str | None = None
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = Field(default=None, description="the system message")
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX,
                                          description="input + max_output_tokens must fit the context")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS, description="function tools only")
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = Field(
        default=None, description="as on chat: auto (the default with tools) needs --enable-auto-tool-choice")
    parallel_tool_calls: bool = True
    text: TextConfig | None = Field(default=None, description="format: text, json_object or json_schema")
    stream: bool = False
    store: Literal[False] = Field(default=False, description=f"{_NOT_STORED}; true is refused (400)")
    metadata: dict[str, str] | None = Field(default=None, max_length=16, description="echoed in the response")
    user: str | None = None
    # prefix-cache blocks are shared only between requests with the same salt (vLLM's extra field, as on chat)
    cache_salt: str | None = Field(default=None, min_length=1)
    previous_response_id: None = Field(default=None, description=f"{_NOT_STORED}: refused (400)")
    background: Literal[False] = Field(default=False, description="true is refused (400)")
    reasoning: None = Field(default=None, description="refused (400): no reasoning models")
    include: list[str] | None = Field(default=None, max_length=0, description="refused (400) unless empty")
    truncation: Literal["disabled"] = Field(default="disabled", description="auto is refused (400)")
    conversation: None = Field(default=None, description=f"{_NOT_STORED}: refused (400)")
    prompt: None = Field(default=None, description="stored prompt templates are refused (400)")
    top_logprobs: Literal[0] | None = Field(default=None, description="refused (400) unless 0")
    max_tool_calls: None = Field(default=None, description="refused (400); parallel_tool_calls: false allows one")
    service_tier: Literal["auto", "default"] | None = Field(default=None, description="auto or default (400 "
                                                                                      "otherwise)")
    safety_identifier: str | None = Field(default=None, description="accepted, unused (as user)")

    @field_validator("store", "previous_response_id", "background", "reasoning", "include", "truncation",
                     "conversation", "prompt", "top_logprobs", "max_tool_calls", mode="before")
    @classmethod
    def _refuse(cls, value: Any, info: Any) -> Any:
        no_op = {"store": False, "background": False, "include": [], "truncation": "disabled", "top_logprobs": 0}
        if info.field_name in no_op and value == no_op[info.field_name]:
            return value
        why = {"store": f"{_NOT_STORED}; send store: false",
               "previous_response_id": f"{_NOT_STORED}, so previous_response_id cannot refer to one; send the "
                                       "conversation as input",
               "background": "background responses are not supported",
               "reasoning": "reasoning options are not supported",
               "include": "include is not supported",
               "truncation": "truncation \"auto\" is not supported; the input must fit the context",
               "conversation": f"{_NOT_STORED}, so there are no conversations; send the conversation as input",
               "prompt": "stored prompt templates are not supported",
               "top_logprobs": "logprobs are not supported on /v1/responses (chat completions has them)",
               "max_tool_calls": "max_tool_calls is not supported; parallel_tool_calls: false allows one call"}
        raise PydanticCustomError("not_supported", why[info.field_name])

    def as_chat_request(self) -> ChatCompletionRequest:
        """The chat request that runs this one (validated: the bounds are the same)."""
        body: dict[str, Any] = {"model": self.model, "messages": self._messages(), "stream": self.stream,
                                "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature,
                                "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls,
                                "user": self.user}
        if self.tools is not None:
            body["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                             for tool in self.tools]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format is not None:
            body["response_format"] = self._response_format(self.text.format)
        return ChatCompletionRequest.model_validate(body)

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant":   # the turn's text and calls are one message
                    messages[-1].setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return messages

    @staticmethod
    def _response_format(fmt: TextFormat) -> dict[str, Any]:
        if fmt.type != "json_schema":
            return {"type": fmt.type}
        schema = JsonSchemaResponseFormat.model_validate(
            {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_, "strict": fmt.strict})
        return {"type": "json_schema", "json_schema": schema.model_dump(by_alias=True, exclude_none=True)}
