"""Which stop token a Lark grammar names as output, by id range or by name; what is inside a string, a regex
literal or a comment is text, not a token reference."""

from __future__ import annotations

import pytest

from llmserve.structured_output.grammar_tokens import named_stop_token

VOCAB = {"<s>": 1, "</s>": 2, "<|im_end|>": 7, "<|x|>": 5}.get
STOPS = frozenset({2, 7})


@pytest.mark.parametrize("grammar, stop", [
    ('start: "a" <[2]>', 2),
    ('start: "a" <[0-1, 3-9]>', 7),
    ('start: "a" </s>', 2),
    ('start: "x"<|im_end|>', 7),
    ('start: <s> "a" <|x|> <[3-6]>', None),
    ('start: "<[2]> </s>" | /<\\/s>/ // <[2]>\n', None),
    ('start: "\\"</s>"', None),
    ('start: %json {"type": "string", "pattern": "<[2]>"}', None),
    ('start: <|not_in_vocab|>', None),
])
def test_named_stop_token(grammar, stop):
    assert named_stop_token(grammar, VOCAB, STOPS) == stop
