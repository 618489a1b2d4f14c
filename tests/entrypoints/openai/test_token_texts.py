"""What chat logprobs say of a token: its text as it adds to the sequence, and its raw ``bytes`` (OpenAI's
field, there so that clients can rebuild characters split over tokens): a sentencepiece byte-fallback token
``<0xE6>`` is ``[230]`` and a byte-level BPE token's characters are its bytes, never the bytes of a
replacement character; the bytes of a text's tokens, joined, are the text's UTF-8."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llmserve.entrypoints.openai.serving_base import TokenTexts

TEXT = "Hello 日本語 😀 café"


@pytest.mark.parametrize("family", ["llama", "qwen2"])   # byte fallback; byte-level BPE
def test_the_bytes_of_a_texts_tokens_are_its_utf8(checkpoint_dir, family):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir(family))
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    raw = b"".join(bytes(texts.raw_bytes(i)) for i in ids)
    assert raw.decode("utf-8").lstrip() == TEXT   # sentencepiece may add a leading space
    assert any("\ufffd" in texts(i) for i in ids)   # some token is part of a character (what bytes are for)


def test_a_byte_fallback_token_is_its_byte(checkpoint_dir):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("llama"))
    texts = TokenTexts(tokenizer)
    byte_token = tokenizer.convert_tokens_to_ids("<0xE6>")
    assert texts(byte_token) == "\ufffd" and texts.raw_bytes(byte_token) == [0xE6]
