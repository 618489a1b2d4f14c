"""POST /v1/responses: OpenAI's Responses API (the subset vLLM serves), run as the chat request it maps to.

The request's errors name the Responses fields (``input``, ``max_output_tokens``, ``text``), not the chat
ones it was mapped onto. Streamed, every event is named (``event: response.output_text.delta``) and
numbered (``sequence_number``), and the stream ends with ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it), without ``[DONE]``, as OpenAI's does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from llmserve.entrypoints.openai.errors import APIError
from llmserve.entrypoints.openai.event_stream import EventStream, SSEResponse
from llmserve.entrypoints.openai.responses_output import OutputEvents, output_items
from llmserve.entrypoints.openai.responses_protocol import ResponsesRequest
from llmserve.entrypoints.openai.serving_base import SSEFraming, Submitted, encode_json
from llmserve.entrypoints.openai.serving_chat import OpenAIServingChat
from llmserve.entrypoints.openai.tool_calling import ToolCalling
from llmserve.errors import InvalidRequestError
from llmserve.outputs import RequestOutput

# chat request field -> the Responses field it came from
_RESPONSES_FIELD = {"messages": "input", "prompt": "input", "max_tokens": "max_output_tokens",
                    "max_completion_tokens": "max_output_tokens", "response_format": "text"}


class ResponsesFraming(SSEFraming):
    """Named, numbered events; an error is an ``error`` event; no closing ``[DONE]``."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def event(self, data: dict) -> bytes:
        data = {**data, "sequence_number": self.sequence_number}
        self.sequence_number += 1
        return b"event: " + data["type"].encode() + b"\ndata: " + encode_json(data) + b"\n\n"

    def error(self, status: int, message: str, code: str | None) -> bytes:
        return self.event({"type": "error", "code": code, "message": message, "param": None})

    def closing(self) -> list[bytes]:
        return []


# where a chat error's message says the fault is -> where it is in the Responses request
_RESPONSES_PATH = {"response_format.json_schema.schema": "text.format.schema", "response_format": "text.format"}


def _responses_message(message: str) -> str:
    """A chat field's name, wherever the message names it, as this endpoint's (the longer paths first)."""
    for chat_path, path in _RESPONSES_PATH.items():
        message = message.replace(chat_path, path)
    return message


@contextmanager
def _named_as_responses_fields() -> Iterator[None]:
    try:
        yield
    except APIError as exc:
        exc.param = _RESPONSES_FIELD.get(exc.param, exc.param)
        exc.message = _responses_message(exc.message)
        raise
    except InvalidRequestError as exc:
        raise type(exc)(_responses_message(str(exc)), _RESPONSES_FIELD.get(exc.param, exc.param)) from None
    except ValidationError as exc:   # the mapped chat request refused something of the input
        error = exc.errors()[0]
        raise APIError(400, f"input: {error['msg']}", "input") from None


class OpenAIServingResponses:
    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    async def create(self, body: ResponsesRequest, raw: Request, header_request_id: str | None
                     ) -> JSONResponse | SSEResponse:
        chat = self.chat
        lora = chat.check_model(body.model)
        with _named_as_responses_fields():
            chat_body = body.as_chat_request()
            prompt_ids, params, tool_calling = await chat.prepare(chat_body, body.max_output_tokens, None)
            submitted = chat.submit("resp", [prompt_ids], params, header_request_id, body.cache_salt, lora)
        if body.stream:
            return SSEResponse(chat, self._stream(body, submitted, tool_calling))
        output = (await chat.collect(raw, submitted))[0]
        completion = output.outputs[0]
        incomplete = completion.finish_reason == "length"
        items = output_items(tool_calling, completion.text, incomplete)
        return JSONResponse(self._response(body, submitted, items, output, incomplete))

    def _response(self, body: ResponsesRequest, submitted: Submitted, items: list[dict[str, Any]],
                  output: RequestOutput | None, incomplete: bool) -> dict[str, Any]:
        """The response object; ``output`` None while it is in progress (the first streamed events)."""
        status = "in_progress" if output is None else "incomplete" if incomplete else "completed"
        usage = None
        if output is not None:
            prompt, generated = len(output.prompt_token_ids), len(output.outputs[0].token_ids)
            usage = {"input_tokens": prompt, "output_tokens": generated, "total_tokens": prompt + generated,
                     "input_tokens_details": {"cached_tokens": output.num_cached_tokens},
                     "output_tokens_details": {"reasoning_tokens": 0}}
        return {
            "id": submitted.request_id, "object": "response", "created_at": submitted.created, "status": status,
            "model": submitted.model, "output": items, "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "parallel_tool_calls": body.parallel_tool_calls,
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "tool_choice": _tool_choice(body),
            "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)
                     if body.text and body.text.format else {"type": "text"}},
            "metadata": body.metadata or {}, "user": body.user, "store": False, "truncation": "disabled",
            "previous_response_id": None, "reasoning": None, "background": False,
        }

    def _stream(self, body: ResponsesRequest, submitted: Submitted, tool_calling: ToolCalling) -> EventStream:
        events = OutputEvents(tool_calling)
        started = self._response(body, submitted, [], None, False)

        def render(_: int, output: RequestOutput) -> list[dict]:
            completion = output.outputs[0]
            finished = completion.finish_reason is not None
            return events.feed(completion.text, finished, completion.finish_reason == "length")

        def finish(outputs: list[RequestOutput]) -> list[dict]:
            incomplete = outputs[0].outputs[0].finish_reason == "length"
            response = self._response(body, submitted, events.items, outputs[0], incomplete)
            return [{"type": "response.incomplete" if incomplete else "response.completed", "response": response}]

        return EventStream(submitted, render, finish, ResponsesFraming(),
                           prefix=[{"type": "response.created", "response": started},
                                   {"type": "response.in_progress", "response": started}])


def _tool_choice(body: ResponsesRequest) -> Any:
    if body.tool_choice is None:
        return "auto" if body.tools else "none"
    return body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump()
