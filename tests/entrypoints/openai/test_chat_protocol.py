"""How a chat message (or a /v1/responses input message) reaches the template: a string content as it is; a list of text parts joined with a
newline, as vLLM renders them for a template that takes string content (``"Line one.\\nLine two."``, not
``"Line one.Line two."``). An assistant message sent back as the API returned it (``refusal``, ``annotations``,
``audio``, ``function_call`` null or empty) is taken; a refusal is its text when there is no content; vLLM's
``reasoning_content`` goes to the template; audio, a deprecated ``function_call`` or citations are refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmserve.entrypoints.openai.chat_protocol import ChatMessage
from llmserve.entrypoints.openai.responses_protocol import InputMessage


def test_text_parts_are_joined_with_a_newline():
    message = ChatMessage.model_validate({"role": "user", "content": [
        {"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]})
    assert message.for_template()["content"] == "Line one.\nLine two."
    item = InputMessage.model_validate({"role": "user", "content": [
        {"type": "input_text", "text": "Line one."}, {"type": "input_text", "text": "Line two."}]})
    assert item.text() == "Line one.\nLine two."   # /v1/responses input items alike


def test_string_content_is_kept_as_is():
    message = ChatMessage.model_validate({"role": "user", "content": "Line one.Line two."})
    assert message.for_template()["content"] == "Line one.Line two."


def test_an_assistant_message_sent_back_as_returned_renders_its_text_and_reasoning():
    returned = {"role": "assistant", "content": None, "refusal": "I cannot help with that.", "annotations": [],
                "audio": None, "function_call": None, "tool_calls": None, "reasoning_content": "Unsafe."}
    assert ChatMessage.model_validate(returned).for_template() == {
        "role": "assistant", "content": "I cannot help with that.", "reasoning_content": "Unsafe."}
    assert ChatMessage.model_validate({**returned, "content": "Sure."}).for_template()["content"] == "Sure."


@pytest.mark.parametrize("field,value,fragment", [
    ("audio", {"id": "audio_1"}, "audio is not supported"),
    ("function_call", {"name": "f", "arguments": "{}"}, "use tool_calls"),
    ("annotations", [{"type": "url_citation"}], "annotations"),
])
def test_what_a_message_cannot_carry_is_refused(field, value, fragment):
    with pytest.raises(ValidationError, match=fragment):
        ChatMessage.model_validate({"role": "assistant", "content": "x", field: value})
