"""How ``bench serve`` reads a streamed response: events split anywhere across network reads (or ended with
``\\r\\n``) are reassembled, only ``data:`` lines count, nothing after ``[DONE]`` is read; the first chunk
with text sets TTFT and each later one adds an inter-token latency; the usage chunk sets the token counts;
an error event fails the request with its message; a chat stream's text is its deltas' ``content``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from llmserve.benchmarks.datasets import SampleRequest
from llmserve.benchmarks.serve import Target, send_request


class _Content:
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def iter_any(self):
        for piece in self.pieces:
            await asyncio.sleep(0)
            yield piece


class _Response:
    """What ``send_request`` reads of an aiohttp response."""

    def __init__(self, body: bytes, piece: int) -> None:
        self.status = 200
        self.content = _Content([body[i:i + piece] for i in range(0, len(body), piece)])

    async def __aenter__(self) -> "_Response":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None


class _Client:
    def __init__(self, body: bytes, piece: int) -> None:
        self.body, self.piece = body, piece

    def post(self, *args: Any, **kwargs: Any) -> _Response:
        return _Response(self.body, self.piece)


def _events(*chunks: dict | str, newline: str = "\n") -> bytes:
    lines = [f": a comment{newline}{newline}"]
    for chunk in chunks:
        lines.append(f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}{newline}{newline}")
    return "".join(lines).encode()


def _run(body: bytes, piece: int, chat: bool = False):
    target = Target("http://x", "/v1/chat/completions" if chat else "/v1/completions", "m")
    request = SampleRequest(prompt=[1, 2, 3], prompt_len=3, expected_output_len=3)
    return asyncio.run(send_request(_Client(body, piece), target, request, True, 0.0))


COMPLETION = _events({"choices": [{"index": 0, "text": "Hé", "logprobs": None}], "usage": None},
                     {"choices": [{"index": 0, "text": ""}], "usage": None},
                     {"choices": [{"index": 0, "text": " there", "finish_reason": "length"}], "usage": None},
                     {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
                     "[DONE]", {"choices": [{"index": 0, "text": "after done"}]})


def test_events_split_across_reads_are_reassembled():
    for piece in (1, 7, 64, len(COMPLETION)):
        result = _run(COMPLETION, piece)
        assert result.success, result.error
        assert result.generated_text == "Hé there"
        assert (result.output_tokens, result.prompt_len, len(result.itl)) == (2, 3, 1)
        assert 0 < result.ttft <= result.latency


def test_crlf_line_ends():
    body = COMPLETION.replace(b"\n", b"\r\n")
    result = _run(body, 5)
    assert result.success and result.generated_text == "Hé there"


def test_chat_text_is_the_delta_content():
    body = _events({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                   {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
                   {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]")
    result = _run(body, 3, chat=True)
    assert result.success and result.generated_text == "Hi" and result.output_tokens == -1   # counted later


def test_an_error_event_fails_the_request_with_its_message():
    body = _events({"choices": [{"index": 0, "text": "a"}]},
                   {"error": {"message": "the engine failed", "type": "x", "code": 500}}, "[DONE]")
    result = _run(body, 10)
    assert not result.success and result.error == "the engine failed"
