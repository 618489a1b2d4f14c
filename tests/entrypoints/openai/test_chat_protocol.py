"""How a chat message (or a /v1/responses input message) reaches the template: a string content as it is; a list of text parts joined with a
newline, as vLLM renders them for a template that takes string content (``"Line one.\\nLine two."``, not
``"Line one.Line two."``)."""

from __future__ import annotations

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
