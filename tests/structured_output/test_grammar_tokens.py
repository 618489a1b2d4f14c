"""Which stop token a Lark grammar names as output, by id range or by name; what is inside a string, a regex
literal or a comment (``//`` or ``#``) is text, not a token reference; a negated range names the tokens
outside it."""

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
    ('start: "ab" <[^0-1,3-1999]>', 2),   # a negated range: all but these, EOS among them
    ('start: "ab" <[^0-9]>', None),
    ('start: "a" # ends with </s>\n', None),
    ('start: "a" b  # say "hi\nb: </s>', 2),   # a quote inside a comment opens no string
])
def test_named_stop_token(grammar, stop):
    assert named_stop_token(grammar, VOCAB, STOPS) == stop
