"""Tests for IncrementalDetokenizer on tiny tokenizers trained here, so they need no download.

The streamed text is checked against `tokenizer.decode`, which is the text a client would get
without streaming: for many random texts and token sequences, one token at a time and in chunks.
"""

from __future__ import annotations

import functools
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llmserve.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT_CHAR = "\ufffd"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade, Ångström, São Paulo, Łódź.",
    "你好，世界！我们今天学习中文。",
    "Emoji time 😀🎉👍 and more 🚀 rockets.",
    "def main():\n    print('hello world')\n    return 42",
] * 3
# Pieces of random texts: words the tokenizers merged, single characters, and characters absent
# from the corpus, which the sentencepiece-style tokenizer spells as 2, 3 or 4 byte-fallback tokens.
PIECES = ["quick", "brown", " the", " fox", "hello", "Café", "crème", "你好", "世界", "学习", "😀", "🚀"]
PIECES += [*"abcdefgh .,!?\n", *"éàüñçÅ", *"ßø乂丐龘", "𝄞", "🦀"]


@functools.cache
def sentencepiece_tokenizer() -> PreTrainedTokenizerBase:
    """Llama-style: Metaspace pre-tokenizer, byte fallback, decoder that strips the first space."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # Byte tokens go into the model vocabulary: as trainer special tokens they would be skipped.
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@functools.cache
def byte_level_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2 style byte-level BPE, with a special and a plain added token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_special_tokens(["<|im_end|>"])
    tokenizer.add_tokens(["<tool>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )


TOKENIZERS = {"sentencepiece": sentencepiece_tokenizer, "byte_level": byte_level_tokenizer}


@pytest.fixture(params=sorted(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return TOKENIZERS[request.param]()


def ids(tokenizer: PreTrainedTokenizerBase, *tokens: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(tokens))


def byte_id(tokenizer: PreTrainedTokenizerBase, byte: int) -> int:
    """The token of a single byte: "<0xNN>" with byte fallback, GPT-2's byte character otherwise."""
    if tokenizer is sentencepiece_tokenizer():
        return tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>")
    # GPT-2 maps printable bytes to themselves and the others, in order, to chr(256) onwards.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    unprintable = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + unprintable.index(byte))
    return tokenizer.convert_tokens_to_ids(char)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def random_text(rng: random.Random, max_pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces)))


def special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return [i for i, token in added.items() if token.content != "<unk>"]


def reference(
    tokenizer: PreTrainedTokenizerBase, prompt: list[int], output: list[int], skip: bool
) -> str:
    """The text the output adds to the prompt: decode(prompt + output) - decode(prompt)."""
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=skip)
    full_text = tokenizer.decode(prompt + output, skip_special_tokens=skip)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


def chunked(token_ids: list[int], rng: random.Random | None) -> list[list[int]]:
    """One token per chunk, or random chunks of 1 to 5 tokens."""
    chunks, start = [], 0
    while start < len(token_ids):
        size = rng.randint(1, 5) if rng else 1
        chunks.append(token_ids[start : start + size])
        start += size
    return chunks


def stream(
    detokenizer: IncrementalDetokenizer, chunks: list[list[int]], check_no_fffd: bool = False
) -> tuple[list[str], str | None]:
    """Feeds chunks as an engine would, returning the streamed deltas and the stop string."""
    deltas, stop = [], None
    for chunk in chunks:
        stop = detokenizer.update(chunk)
        deltas.append(detokenizer.get_next_output_text(finished=stop is not None, delta=True))
        if check_no_fffd:
            assert REPLACEMENT_CHAR not in detokenizer.output_text
        if stop is not None:
            return deltas, stop
    deltas.append(detokenizer.get_next_output_text(finished=True, delta=True))
    return deltas, stop


@pytest.mark.parametrize("skip", [True, False])
def test_random_texts_match_decode(tokenizer: PreTrainedTokenizerBase, skip: bool) -> None:
    """Output ids are encoded random texts, with special and added tokens between them."""
    rng = random.Random(0)
    extra_ids = special_ids(tokenizer)
    for _ in range(150):
        prompt = encode(tokenizer, random_text(rng, 8)) if rng.random() < 0.8 else []
        if tokenizer.bos_token_id is not None and rng.random() < 0.7:
            prompt = [tokenizer.bos_token_id] + prompt
        output = []
        for _ in range(rng.randint(1, 4)):
            output += encode(tokenizer, random_text(rng, 8))
            if rng.random() < 0.4:
                output.append(rng.choice(extra_ids))
        expected = reference(tokenizer, prompt, output, skip)
        if not prompt:
            assert expected == tokenizer.decode(output, skip_special_tokens=skip)
        assert REPLACEMENT_CHAR not in expected
        for chunk_rng in (None, rng):
            detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
            deltas, _ = stream(detokenizer, chunked(output, chunk_rng), check_no_fffd=True)
            assert detokenizer.output_text == expected
            assert "".join(deltas) == expected
            assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_random_token_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    """Random vocabulary ids, complete characters spelled as byte pieces, and invalid bytes.

    decode() is the reference whenever the output is valid UTF-8; otherwise its U+FFFD can depend
    on tokens after a character (a byte-fallback run decodes whole or not at all), so only the
    stream's own consistency is checked.
    """
    rng = random.Random(1)
    vocab_size = len(tokenizer)
    exact = 0
    for _ in range(300):
        output = []
        for _ in range(rng.randint(1, 20)):
            kind = rng.random()
            if kind < 0.5:
                output.append(rng.randrange(vocab_size + 10))  # a few past the vocabulary
            elif kind < 0.9:
                output += [byte_id(tokenizer, byte) for byte in rng.choice(PIECES).encode()]
            else:  # a byte that cannot start a character, or a lone lead byte
                output.append(byte_id(tokenizer, rng.choice([0x80, 0xBD, 0xE4, 0xF0, 0xFF])))
        skip = rng.random() < 0.5
        expected = reference(tokenizer, [], output, skip)
        for chunk_rng in (None, rng):
            detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
            deltas, _ = stream(detokenizer, chunked(output, chunk_rng))
            assert "".join(deltas) == detokenizer.output_text
            if REPLACEMENT_CHAR not in expected:
                exact += 1
                assert detokenizer.output_text == expected
                assert not any(REPLACEMENT_CHAR in delta for delta in deltas)
    assert exact > 40


@pytest.mark.parametrize(
    ("name", "tokens"),
    [
        ("sentencepiece", ["<0xE4>", "<0xBD>", "<0xA0>"]),  # 你 as byte-fallback tokens
        ("sentencepiece", ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]),  # 🦀
        ("byte_level", ["ð", "Ŀ", "Ħ", "ŀ"]),  # 𝄞, one byte per token
    ],
)
def test_character_split_across_tokens_appears_once_complete(name: str, tokens: list[str]) -> None:
    tokenizer = TOKENIZERS[name]()
    char_ids = ids(tokenizer, *tokens)
    char = tokenizer.decode(char_ids)
    assert len(char) == 1 and char != REPLACEMENT_CHAR
    detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, "hello"))
    deltas = []
    for token_id in char_ids + ids(tokenizer, "a"):
        detokenizer.update([token_id])
        deltas.append(detokenizer.get_next_output_text(finished=False, delta=True))
    assert deltas == [""] * (len(char_ids) - 1) + [char, "a"]


def test_incomplete_last_character_is_flushed_on_finish() -> None:
    """A request cut off mid-character ends as decode() ends it: with U+FFFD."""
    tokenizer = sentencepiece_tokenizer()
    output = encode(tokenizer, "abc") + ids(tokenizer, "<0xE4>", "<0xBD>")
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    detokenizer.update(output)
    assert detokenizer.get_next_output_text(finished=False, delta=True) == "abc"
    assert detokenizer.get_next_output_text(finished=True, delta=True) == REPLACEMENT_CHAR * 2
    assert detokenizer.output_text == tokenizer.decode(output)
    with pytest.raises(RuntimeError):
        detokenizer.update(encode(tokenizer, "a"))


def test_invalid_bytes_do_not_grow_the_window() -> None:
    """Per-step cost stays bounded: no decode sees more than a few dozen tokens, whatever comes."""

    class CountingBackend:
        def __init__(self, backend: Tokenizer) -> None:
            self.backend, self.longest = backend, 0

        def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
            self.longest = max(self.longest, len(token_ids))
            return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

        def __getattr__(self, name: str) -> object:
            return getattr(self.backend, name)

    class CountingTokenizer:
        def __init__(self, backend: CountingBackend) -> None:
            self.backend_tokenizer = backend

    tokenizer = sentencepiece_tokenizer()
    counting = CountingBackend(tokenizer.backend_tokenizer)
    invalid = ids(tokenizer, "<0xFF>") * 200
    text = encode(tokenizer, "你好 Café 🦀 乂 the quick brown fox " * 50)
    prompt = text * 4 + [tokenizer.eos_token_id] * 100
    detokenizer = IncrementalDetokenizer(
        CountingTokenizer(counting), prompt, stop=["never seen"]  # type: ignore[arg-type]
    )
    detokenizer.update(text[:100])
    for token_id in invalid + text:
        detokenizer.update([token_id])
    assert counting.longest < 40
    assert detokenizer.output_text.endswith("the quick brown fox ")
    assert REPLACEMENT_CHAR * 150 in detokenizer.output_text


@pytest.mark.parametrize("skip", [True, False])
def test_ids_outside_the_vocabulary_are_ignored(skip: bool) -> None:
    """Like decode(), and without losing the space that the next token starts with."""
    tokenizer = sentencepiece_tokenizer()
    padded_id = len(tokenizer) + 7
    output = encode(tokenizer, "the") + [padded_id, tokenizer.eos_token_id]
    output += encode(tokenizer, " fox")
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
    deltas, _ = stream(detokenizer, chunked(output, None))
    expected = "the fox" if skip else "the</s> fox"
    assert "".join(deltas) == expected == tokenizer.decode(output, skip_special_tokens=skip)


def test_sentencepiece_leading_space_follows_the_prompt() -> None:
    """The first output token's "▁" is a space after a prompt, and dropped without one."""
    tokenizer = sentencepiece_tokenizer()
    output = encode(tokenizer, "the quick fox")
    assert tokenizer.convert_ids_to_tokens(output)[0].startswith("▁")
    for prompt, skip, expected in [
        ([tokenizer.bos_token_id] + encode(tokenizer, "hello"), True, " the quick fox"),
        ([tokenizer.bos_token_id], True, "the quick fox"),
        ([tokenizer.bos_token_id], False, " the quick fox"),  # "<s>" is text then
        ([], True, "the quick fox"),
    ]:
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        deltas, _ = stream(detokenizer, chunked(output, None))
        assert "".join(deltas) == expected == reference(tokenizer, prompt, output, skip)


def test_prompt_ending_in_byte_tokens() -> None:
    """Context that would start inside a character is widened to the character's first byte."""
    tokenizer = sentencepiece_tokenizer()
    prompt = [tokenizer.bos_token_id] + encode(tokenizer, "Say 乂丐")
    output = ids(tokenizer, "<0xE9>", "<0xBE>", "<0x98>")  # 龘
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas, _ = stream(detokenizer, chunked(output, None))
    assert "".join(deltas) == "龘" == reference(tokenizer, prompt, output, True)


@pytest.mark.parametrize(
    ("skip", "expected"),
    [(True, "你好x<tool>y!"), (False, "你好<|im_end|>x<tool>y<|endoftext|>!")],
)
def test_skip_special_tokens(skip: bool, expected: str) -> None:
    """Special tokens are text only when not skipped; added plain tokens always are."""
    tokenizer = byte_level_tokenizer()
    output = encode(tokenizer, "你好<|im_end|>x<tool>y") + [tokenizer.eos_token_id]
    output += encode(tokenizer, "!")
    detokenizer = IncrementalDetokenizer(
        tokenizer, encode(tokenizer, "hi"), skip_special_tokens=skip
    )
    deltas, _ = stream(detokenizer, chunked(output, None))
    assert "".join(deltas) == expected == tokenizer.decode(output, skip_special_tokens=skip)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_three_tokens(
    tokenizer: PreTrainedTokenizerBase, include: bool
) -> None:
    output = encode(tokenizer, "the quick brown fox jumps over the lazy dog")
    texts = [tokenizer.decode(output[:i]) for i in range(len(output) + 1)]
    pieces = [after[len(before) :] for before, after in zip(texts, texts[1:])]
    first = next(
        i for i in range(2, len(output) - 2) if len(pieces[i]) > 1 and len(pieces[i + 2]) > 1
    )
    stop = pieces[first][-1] + pieces[first + 1] + pieces[first + 2][0]
    text = "".join(pieces)
    assert text.count(stop) == 1
    before = text[: text.index(stop)]

    detokenizer = IncrementalDetokenizer(
        tokenizer, [], stop=[stop], include_stop_str_in_output=include
    )
    deltas, found = stream(detokenizer, chunked(output, None))
    assert found == stop
    assert len(deltas) == first + 3  # found with the token that completes it
    assert detokenizer.output_text == "".join(deltas) == (before + stop if include else before)
    with pytest.raises(RuntimeError):
        detokenizer.update(output[first + 3 :])


def test_hold_back_never_shows_a_stop_prefix() -> None:
    tokenizer = byte_level_tokenizer()
    output = encode(tokenizer, "a STO b ST c STOP d")
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["STOP"])
    streamed = ""
    for token_id in output:
        found = detokenizer.update([token_id])
        streamed += detokenizer.get_next_output_text(finished=found is not None, delta=True)
        assert "a STO b ST c ".startswith(streamed)
        if found:
            break
        assert detokenizer.get_next_output_text(finished=False, delta=False) == streamed
        assert len(detokenizer.output_text) - len(streamed) == min(3, len(detokenizer.output_text))
    assert streamed == detokenizer.output_text == "a STO b ST c "

    # Nothing is held back once stop strings stay in the output, or without any.
    for kwargs in ({"stop": ["STOP"], "include_stop_str_in_output": True}, {}):
        detokenizer = IncrementalDetokenizer(tokenizer, [], **kwargs)
        detokenizer.update(encode(tokenizer, "a STO"))
        assert detokenizer.get_next_output_text(finished=False, delta=True) == "a STO"


def test_random_stop_strings_match_a_plain_search() -> None:
    """Earliest-completed stop string wins, whatever the chunking; streams only show kept text."""
    tokenizer = byte_level_tokenizer()
    rng = random.Random(2)
    for _ in range(300):
        text = "".join(rng.choices("ab c", k=rng.randint(0, 40)))
        stops = ["".join(rng.choices("ab c", k=rng.randint(1, 4))) for _ in range(3)]
        stops = stops[: rng.randint(1, 3)]
        include = rng.random() < 0.5
        matches = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        end, start, stop = min(matches) if matches else (len(text), len(text), None)
        expected = text[: end if include else start]
        output = encode(tokenizer, text)
        for chunk_rng in (None, rng):
            detokenizer = IncrementalDetokenizer(
                tokenizer, [], stop=stops, include_stop_str_in_output=include
            )
            deltas, found = stream(detokenizer, chunked(output, chunk_rng))
            assert (found, detokenizer.output_text) == (stop, expected)
            streamed = ""
            for delta in deltas:
                streamed += delta
                assert expected.startswith(streamed)
            assert streamed == expected


def test_multiple_stop_strings_earliest_wins() -> None:
    """The stop string completed first wins, even when a longer one started before it."""
    tokenizer = byte_level_tokenizer()
    output = encode(tokenizer, "hello world, goodbye")
    for stops, expected in [
        (["goodbye", "world", "lo w"], ("lo w", "hel")),
        (["lo w", "world"], ("lo w", "hel")),
        (["hello world", "ello", "llo world"], ("ello", "h")),
    ]:
        for chunks in (chunked(output, None), [output]):
            detokenizer = IncrementalDetokenizer(tokenizer, [], stop=stops)
            _, found = stream(detokenizer, chunks)
            assert (found, detokenizer.output_text) == expected


def test_rejects_empty_stop_string_and_slow_tokenizer() -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(byte_level_tokenizer(), [], stop=["x", ""])
    with pytest.raises(TypeError):
        IncrementalDetokenizer(object(), [])  # type: ignore[arg-type]
