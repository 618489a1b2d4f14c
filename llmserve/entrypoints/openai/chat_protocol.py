"""Chat messages and tool definitions of /v1/chat/completions (pydantic, so the OpenAPI document has them).

Tool calling as OpenAI's API defines it: ``tools`` (function definitions with a JSON schema of their
arguments), ``tool_choice`` (``none``, ``auto``, ``required`` or a named function), assistant messages
carrying ``tool_calls`` and ``tool`` messages answering them. :meth:`ToolRequest.checked_tools` refuses
what cannot be honoured, naming the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmserve.entrypoints.openai.request_base import RequestModel
from llmserve.errors import InvalidRequestError

MAX_TOOLS = 128
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(RequestModel):
    name: str = Field(min_length=1)
    arguments: str = Field(description="the arguments as JSON text, as the assistant produced them")

    @field_validator("arguments")
    @classmethod
    def _is_json(cls, value: str) -> str:
        try:
            json.loads(value or "{}")
        except ValueError:
            raise PydanticCustomError("invalid_arguments", "tool call arguments must be JSON text") from None
        return value


class AssistantToolCall(RequestModel):
    """A call in an earlier assistant message of the conversation."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(RequestModel):
    """A message of the conversation. ``tool`` messages answer a call by its ``tool_call_id``. An assistant message
    a client sends back as it came (OpenAI's ``refusal``, ``annotations``, ``audio``, ``function_call``, all null)
    is taken as it is; what this server cannot render is refused, naming the message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = Field(default=None, description="assistant messages only")
    tool_call_id: str | None = Field(default=None, min_length=1, description="required in tool messages")
    reasoning_content: str | None = Field(default=None, description=(
        "vLLM's: an earlier assistant turn's reasoning, passed to the template (which may render or drop it)"))
    refusal: str | None = Field(default=None, description="an earlier assistant refusal: its text, when there is "
                                                          "no content")
    annotations: list[Any] | None = Field(default=None, max_length=0, description="400 unless empty")
    audio: None = Field(default=None, description="400 unless null: audio is not supported")
    function_call: None = Field(default=None, description="400 unless null: OpenAI's deprecated function calling")

    @field_validator("annotations", "audio", "function_call", mode="before")
    @classmethod
    def _nothing_to_render(cls, value: Any, info: Any) -> Any:
        why = {"annotations": "annotations (citations of a tool this server does not run) are not supported",
               "audio": "audio is not supported", "function_call": "function_call (OpenAI's deprecated function "
                                                                    "calling) is not supported; use tool_calls"}
        if value is None or (value == [] and info.field_name == "annotations"):
            return value
        raise PydanticCustomError("not_supported", why[info.field_name])

    @field_validator("role", mode="before")
    @classmethod
    def _no_function_role(cls, value: Any) -> Any:
        if value == "function":
            raise PydanticCustomError("not_supported", "function messages (OpenAI's deprecated function calling) "
                                                       "are not supported; use tool messages")
        return value

    @model_validator(mode="after")
    def _tool_fields_fit_role(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)   # as vLLM renders text parts for a string template

    def for_template(self) -> dict[str, Any]:
        """What the chat template sees: ``name``, ``tool_calls`` and ``tool_call_id`` only when given; a
        call's arguments decoded, since templates write them with ``tojson`` (as vLLM passes them)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": json.loads(call.function.arguments or "{}")}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A function's arguments are a JSON object (clients pass them as keyword arguments), as OpenAI requires."""
    if "type" in schema and schema["type"] != "object":
        raise PydanticCustomError("schema_not_object", "a function's parameters must be a JSON schema of type "
                                  "\"object\", got type {got}", {"got": json.dumps(schema["type"])})
    return schema


ToolParameters = Annotated[dict[str, Any], AfterValidator(_object_schema),
                           Field(description="a JSON schema of the arguments object (type \"object\")")]


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: ToolParameters | None = None
    strict: bool | None = Field(default=None, description=(
        "true: arguments always match the schema; with tool_choice required or a named function the grammar "
        "enforces every schema, strict or not; with auto a grammar in the --tool-call-parser's format enforces "
        "the strict ones (hermes, llama3_json, mistral; refused for pythonic)"))


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition

    def as_template_tool(self) -> dict[str, Any]:
        """OpenAI's shape, which is what transformers' chat templates take as ``tools``."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolRequest(RequestModel):
    """The tool-calling fields of a chat request."""

    tools: list[ChatTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(
        default=None, description="default: auto when tools are given, none otherwise; auto needs the server's "
                                  "--enable-auto-tool-choice and --tool-call-parser")
    parallel_tool_calls: bool = Field(default=True, description="false: at most one call")

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def checked_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template takes them, after refusing a request that cannot be honoured."""
        tools = self.tools or []
        names = [tool.function.name for tool in tools]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate is not None:
            raise InvalidRequestError(f"tools define the function {duplicate!r} more than once", "tools")
        choice = self.effective_tool_choice
        if choice != "none" and not tools:
            raise InvalidRequestError("tool_choice needs tools to choose from", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequestError(f"tool_choice names the function {choice.function.name!r}, which is not "
                                      f"in tools ({', '.join(names)})", "tool_choice")
        return [tool.as_template_tool() for tool in tools]
