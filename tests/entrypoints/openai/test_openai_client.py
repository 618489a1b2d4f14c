"""The official ``openai`` client (sync and async) works against the server unchanged, and what it gets
back is what the offline API computes.

* ``client.models.list()`` shows the served name ``tiny`` with the model's ``max_model_len``.
* Greedy completions and chat completions, streamed or not, through the sync or the async client, equal
  ``LLM.generate`` / ``LLM.chat`` token text for token text (same ``SamplingParams``: temperature 0,
  ``ignore_eos``, same ``max_tokens``); chat prompts are rendered with the tokenizer's chat template, and
  ``usage`` counts exactly the prompt and completion tokens.
* ``n > 1`` returns choices indexed ``0..n-1``, each a full completion of ``max_tokens`` tokens; a list of
  prompts (text or token ids) returns choice ``prompt_i * n + j`` for sample ``j`` of prompt ``i``.
* ``logprobs=2`` (completions) gives ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``
  of one entry per generated token, the chosen token's logprob being the best of the two offered and equal
  to the offline logprob; each ``top_logprobs`` entry is a {token: logprob} object holding the chosen token
  too (so up to logprobs + 1 entries, as OpenAI's); streamed, the chunks' ``text_offset`` continue each other.
  Chat's ``logprobs=True, top_logprobs=2`` does the same in chat's shape ({token, logprob, bytes} objects).
* ``echo`` puts the prompt in front of the text (streamed: in each choice's first chunk); a token-id
  prompt's text follows ``skip_special_tokens``. ``echo`` + ``max_tokens=0`` + ``logprobs`` (the scoring
  call of evaluation harnesses) returns exactly the prompt with its logprobs (the first ``null``), equal to
  the offline prompt logprobs, no completion tokens, the same when sent twice (prefix cache) and streamed.
* ``stream_options={"include_usage": True}``: the last chunk carries ``usage`` and no choices, every other
  chunk has ``usage`` None; without it no chunk carries usage.
* A stop string cuts the text just before its first occurrence (``finish_reason`` "stop", ``stop_reason``
  the string), streamed or not.
* A seeded sampled request is reproducible: the same seed gives the same text, streamed or not.
* Chat's ``max_completion_tokens`` bounds the completion (and wins over the deprecated ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import re
import string

import openai
import pytest

from llmserve import LLM, SamplingParams

PROMPTS = ["Hello world, this is", "The quick brown fox", "def add(a, b):", "Une phrase en français, café"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
MAX_TOKENS = 8
GREEDY_EXTRA = {"ignore_eos": True}


@pytest.fixture(scope="module")
def offline(llama_dir) -> LLM:
    return LLM(str(llama_dir), kv_cache_memory_bytes="16MiB")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def offline_texts(offline: LLM, prompts, max_tokens: int = MAX_TOKENS) -> list[str]:
    return [o.outputs[0].text for o in offline.generate(prompts, greedy(max_tokens))]


def by_index(choices) -> list:
    return sorted(choices, key=lambda c: c.index)


def collect_completion_stream(stream) -> tuple[dict[int, str], dict[int, str], list]:
    """Streamed completion chunks -> ({index: text}, {index: finish_reason}, chunks)."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                assert choice.index not in finish, "a choice finished twice"
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


def collect_chat_stream(chunks) -> tuple[dict[int, str], dict[int, str]]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.index not in texts:
                assert choice.delta.role == "assistant", "a choice's first chunk names the role"
                texts[choice.index] = ""
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                assert choice.index not in finish, "a choice finished twice"
                finish[choice.index] = choice.finish_reason
    return texts, finish


# ------------------------------------------------------------------ models


def test_models_list_shows_served_name_and_max_model_len(client, offline):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].object == "model"
    assert models[0].max_model_len == offline.engine.max_model_len == 2048


# ------------------------------------------------------------------ greedy equals offline


def test_completions_equal_offline_sync(client, offline):
    expected = offline.generate(PROMPTS, greedy())
    out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body=GREEDY_EXTRA)
    assert out.object == "text_completion" and out.model == "tiny"
    choices = by_index(out.choices)
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert [c.text for c in choices] == [o.outputs[0].text for o in expected]
    assert all(c.finish_reason == "length" for c in choices)
    assert out.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert out.usage.completion_tokens == len(PROMPTS) * MAX_TOKENS
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    texts, finish, _ = collect_completion_stream(client.completions.create(
        model="tiny", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body=GREEDY_EXTRA))
    assert [texts[i] for i in range(4)] == [o.outputs[0].text for o in expected]
    assert finish == {i: "length" for i in range(4)}


def test_chat_equals_offline_sync(client, offline):
    expected = offline.chat(MESSAGES, greedy())[0]
    tokenizer = offline.get_tokenizer()
    rendered = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)
    assert expected.prompt_token_ids == rendered
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body=GREEDY_EXTRA)
    assert out.object == "chat.completion" and out.model == "tiny"
    assert len(out.choices) == 1 and out.choices[0].index == 0
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.outputs[0].text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(rendered)
    assert out.usage.completion_tokens == MAX_TOKENS

    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, extra_body=GREEDY_EXTRA))
    texts, finish = collect_chat_stream(chunks)
    assert texts == {0: expected.outputs[0].text} and finish == {0: "length"}
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_async_client_equals_offline(server, offline, stream):
    expected_completions = offline_texts(offline, PROMPTS)
    expected_chat = offline.chat(MESSAGES, greedy())[0].outputs[0].text

    async def run() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0) as aclient:
            async def completion(prompt: str) -> str:
                response = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                                            temperature=0, stream=stream, extra_body=GREEDY_EXTRA)
                if not stream:
                    return response.choices[0].text
                return "".join([c.text async for chunk in response for c in chunk.choices])

            async def chat() -> str:
                response = await aclient.chat.completions.create(model="tiny", messages=MESSAGES,
                                                                 max_tokens=MAX_TOKENS, temperature=0, stream=stream,
                                                                 extra_body=GREEDY_EXTRA)
                if not stream:
                    return response.choices[0].message.content
                return "".join([c.delta.content or "" async for chunk in response for c in chunk.choices])

            results = await asyncio.gather(*(completion(p) for p in PROMPTS), chat())
            return list(results[:-1]), results[-1]

    texts, chat_text = asyncio.run(run())
    assert texts == expected_completions
    assert chat_text == expected_chat


# ------------------------------------------------------------------ n, prompt lists, token ids


def test_n_greedy_choices_are_full_completions(client, offline):
    expected = offline_texts(offline, PROMPTS[:1])[0]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], n=3, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body=GREEDY_EXTRA)
    assert [c.index for c in by_index(out.choices)] == [0, 1, 2]
    assert [c.text for c in by_index(out.choices)] == [expected] * 3
    assert out.usage.completion_tokens == 3 * MAX_TOKENS

    texts, finish, _ = collect_completion_stream(client.completions.create(
        model="tiny", prompt=PROMPTS[0], n=3, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body=GREEDY_EXTRA))
    assert texts == {0: expected, 1: expected, 2: expected} and finish == {0: "length", 1: "length", 2: "length"}


def test_n_sampled_choices_each_have_max_tokens(client):
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], n=4, max_tokens=MAX_TOKENS, temperature=1.0,
                                    seed=7, logprobs=0, extra_body=GREEDY_EXTRA)
    choices = by_index(out.choices)
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == MAX_TOKENS and c.finish_reason == "length" for c in choices)
    assert len({c.text for c in choices}) > 1, "n samples at temperature 1 should not all be equal"
    assert out.usage.completion_tokens == 4 * MAX_TOKENS

    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, max_completion_tokens=MAX_TOKENS,
                                          temperature=1.0, seed=7, logprobs=True, extra_body=GREEDY_EXTRA)
    choices = by_index(chat.choices)
    assert [c.index for c in choices] == [0, 1, 2]
    assert all(len(c.logprobs.content) == MAX_TOKENS and c.finish_reason == "length" for c in choices)
    assert chat.usage.completion_tokens == 3 * MAX_TOKENS

    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, n=3,
                                                 max_completion_tokens=MAX_TOKENS, temperature=1.0, seed=7,
                                                 stream=True, extra_body=GREEDY_EXTRA))
    texts, finish = collect_chat_stream(chunks)
    assert texts == {c.index: c.message.content for c in choices}   # seeded: streaming changes nothing
    assert finish == {0: "length", 1: "length", 2: "length"}


def test_prompt_list_times_n_indices(client, offline):
    n = 2
    expected = offline_texts(offline, PROMPTS[:3])
    out = client.completions.create(model="tiny", prompt=PROMPTS[:3], n=n, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body=GREEDY_EXTRA)
    choices = by_index(out.choices)
    assert [c.index for c in choices] == list(range(3 * n))
    for prompt_i in range(3):
        for j in range(n):
            assert choices[prompt_i * n + j].text == expected[prompt_i], (prompt_i, j)

    texts, finish, _ = collect_completion_stream(client.completions.create(
        model="tiny", prompt=PROMPTS[:3], n=n, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body=GREEDY_EXTRA))
    assert texts == {i * n + j: expected[i] for i in range(3) for j in range(n)}
    assert set(finish) == set(range(3 * n))


def test_token_id_prompts(client, offline):
    tokenizer = offline.get_tokenizer()
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    expected = offline_texts(offline, ids)
    assert expected == offline_texts(offline, PROMPTS[:2])   # the same prompts, tokenised
    one = client.completions.create(model="tiny", prompt=ids[0], max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body=GREEDY_EXTRA)
    assert [c.text for c in one.choices] == expected[:1]
    assert one.usage.prompt_tokens == len(ids[0])
    many = client.completions.create(model="tiny", prompt=ids, n=2, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body=GREEDY_EXTRA)
    assert [c.text for c in by_index(many.choices)] == [expected[0], expected[0], expected[1], expected[1]]
    assert many.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    assert many.usage.completion_tokens == 4 * MAX_TOKENS


# ------------------------------------------------------------------ logprobs


def expected_token_texts(offline: LLM, token_ids: list[int]) -> list[str]:
    """What logprobs show for each token: the piece with sentencepiece's "\u2581" as a space; a byte-fallback
    piece ``<0xNN>`` as its character when ASCII, else U+FFFD (a fragment of a multi-byte character)."""
    texts = []
    for piece in offline.get_tokenizer().convert_ids_to_tokens(token_ids):
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        if byte:
            value = int(byte.group(1), 16)
            texts.append(chr(value) if value < 0x80 else "\ufffd")
        else:
            texts.append(piece.replace("\u2581", " "))
    return texts


def test_completion_logprobs(client, offline):
    reference = offline.generate(PROMPTS[:1], greedy(logprobs=2))[0].outputs[0]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    logprobs=2, extra_body=GREEDY_EXTRA)
    choice = out.choices[0]
    lp = choice.logprobs
    n_tokens = out.usage.completion_tokens
    assert n_tokens == MAX_TOKENS
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_tokens
    assert lp.tokens == expected_token_texts(offline, reference.token_ids)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n_tokens)]
    expected_logprobs = [pos[t].logprob for pos, t in zip(reference.logprobs, reference.token_ids)]
    assert lp.token_logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2
        assert token in top and top[token] == pytest.approx(logprob)   # greedy: the chosen token is the best
        assert max(top.values()) == pytest.approx(logprob)
        assert all(v <= 0 for v in top.values())

    streamed = [c for chunk in client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                                         temperature=0, logprobs=2, stream=True,
                                                         extra_body=GREEDY_EXTRA)
                for c in chunk.choices]
    tokens = [t for c in streamed if c.logprobs for t in c.logprobs.tokens]
    token_logprobs = [t for c in streamed if c.logprobs for t in c.logprobs.token_logprobs]
    assert tokens == lp.tokens and token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_chat_logprobs(client, offline):
    reference = offline.chat(MESSAGES, greedy(logprobs=2))[0].outputs[0]
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body=GREEDY_EXTRA)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == MAX_TOKENS
    assert [c.token for c in content] == expected_token_texts(offline, reference.token_ids)
    expected_logprobs = [pos[t].logprob for pos, t in zip(reference.logprobs, reference.token_ids)]
    assert [c.logprob for c in content] == pytest.approx(expected_logprobs, abs=1e-4)
    for entry in content:
        if "\ufffd" not in entry.token:   # a byte token's bytes are its byte (tests/.../test_token_texts.py)
            assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)

    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body=GREEDY_EXTRA)
    assert plain.choices[0].logprobs is None

    streamed = [c for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                              max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
                                                              top_logprobs=2, stream=True, extra_body=GREEDY_EXTRA)
                for c in chunk.choices if c.logprobs is not None]
    tokens = [entry.token for c in streamed for entry in c.logprobs.content]
    assert tokens == [entry.token for entry in content]


# ------------------------------------------------------------------ echo


def test_echo(client, offline):
    expected = offline_texts(offline, PROMPTS[:2])
    out = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0,
                                    echo=True, extra_body=GREEDY_EXTRA)
    assert [c.text for c in by_index(out.choices)] == [p + e for p, e in zip(PROMPTS, expected)]

    texts, _, _ = collect_completion_stream(client.completions.create(
        model="tiny", prompt=PROMPTS[:2], n=2, max_tokens=MAX_TOKENS, temperature=0, echo=True, stream=True,
        extra_body=GREEDY_EXTRA))
    assert texts == {0: PROMPTS[0] + expected[0], 1: PROMPTS[0] + expected[0],
                     2: PROMPTS[1] + expected[1], 3: PROMPTS[1] + expected[1]}

    with_logprobs = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                              echo=True, logprobs=1, extra_body=GREEDY_EXTRA)
    lp = with_logprobs.choices[0].logprobs
    usage = with_logprobs.usage
    assert with_logprobs.choices[0].text.startswith(PROMPTS[0])
    assert len(lp.tokens) == len(lp.token_logprobs) == usage.prompt_tokens + usage.completion_tokens
    assert lp.token_logprobs[0] is None   # the first prompt token has nothing to be predicted from
    assert all(v is not None for v in lp.token_logprobs[1:])


def test_echo_of_token_ids_follows_skip_special_tokens(client, offline):
    ids = offline.get_tokenizer().encode(PROMPTS[0])   # starts with BOS
    bos = offline.get_tokenizer().decode(ids[:1])
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True)
    assert plain.choices[0].text == offline.get_tokenizer().decode(ids, skip_special_tokens=True)
    assert not plain.choices[0].text.startswith(bos)
    raw = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True,
                                    extra_body={"skip_special_tokens": False})
    assert raw.choices[0].text.startswith(bos)


def test_echo_with_max_tokens_zero_scores_the_prompt(client, offline):
    reference = offline.generate(PROMPTS[:1], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    ids = reference.prompt_token_ids
    expected = [None] + [pos[t].logprob for pos, t in zip(reference.prompt_logprobs[1:], ids[1:])]
    answers = [client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1)
               for _ in range(2)]   # the second finds the prompt's blocks in the prefix cache
    for out in answers:
        choice = out.choices[0]
        assert choice.text == PROMPTS[0] and choice.finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 0)
        lp = choice.logprobs
        assert lp.tokens == expected_token_texts(offline, ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
        for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert top[token] == pytest.approx(logprob) and 1 <= len(top) <= 2   # the best, and the chosen
    assert answers[0].choices[0].logprobs.token_logprobs == answers[1].choices[0].logprobs.token_logprobs

    streamed = [c for chunk in client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=0, echo=True,
                                                         logprobs=1, stream=True) for c in chunk.choices]
    assert [c.text for c in streamed] == [PROMPTS[0]] and streamed[0].finish_reason == "length"
    assert streamed[0].logprobs.token_logprobs == pytest.approx(answers[0].choices[0].logprobs.token_logprobs,
                                                               abs=1e-5)


def test_streamed_text_offsets_continue_each_other(client):
    kwargs = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0,
              "echo": True, "extra_body": GREEDY_EXTRA}
    whole = client.completions.create(**kwargs).choices[0].logprobs
    streamed = [c.logprobs for chunk in client.completions.create(stream=True, **kwargs) for c in chunk.choices]
    assert [o for lp in streamed for o in lp.text_offset] == whole.text_offset
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens


# ------------------------------------------------------------------ stream_options


def test_include_usage_completions(client, offline):
    prompt_len = len(offline.get_tokenizer().encode(PROMPTS[0]))
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], n=2, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body=GREEDY_EXTRA))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_len, 2 * MAX_TOKENS)
    assert last.usage.total_tokens == prompt_len + 2 * MAX_TOKENS
    assert all(c.usage is None and c.choices for c in chunks[:-1])

    plain = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, extra_body=GREEDY_EXTRA))
    assert all(c.usage is None and c.choices for c in plain)


def test_include_usage_chat(client, offline):
    prompt_len = len(offline.chat(MESSAGES, greedy(1))[0].prompt_token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body=GREEDY_EXTRA))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_len, MAX_TOKENS)
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"

    plain = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True, extra_body=GREEDY_EXTRA))
    assert all(c.usage is None and c.choices for c in plain)


# ------------------------------------------------------------------ stop strings


def pick_stop(text: str) -> str:
    """A 3-letter substring from the middle of ``text`` (letters only, so no tokenizer edge cases)."""
    for start in range(3, len(text) - 3):
        candidate = text[start:start + 3]
        if all(ch in string.ascii_letters for ch in candidate):
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings(client, offline):
    full = offline_texts(offline, PROMPTS[:1], 24)[0]
    stop = pick_stop(full)
    expected = full[:full.index(stop)]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                    stop=["\x00never", stop], extra_body=GREEDY_EXTRA)
    choice = out.choices[0]
    assert choice.text == expected
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert out.usage.completion_tokens < 24

    texts, finish, _ = collect_completion_stream(client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop, stream=True,
        extra_body=GREEDY_EXTRA))
    assert texts == {0: expected} and finish == {0: "stop"}

    chat_full = offline.chat(MESSAGES, greedy(24))[0].outputs[0].text
    chat_stop = pick_stop(chat_full)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                          stop=[chat_stop], extra_body=GREEDY_EXTRA)
    assert chat.choices[0].message.content == chat_full[:chat_full.index(chat_stop)]
    assert chat.choices[0].finish_reason == "stop"
    texts, finish = collect_chat_stream(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, temperature=0, stop=[chat_stop], stream=True,
        extra_body=GREEDY_EXTRA))
    assert texts == {0: chat_full[:chat_full.index(chat_stop)]} and finish == {0: "stop"}


# ------------------------------------------------------------------ seeds, max_completion_tokens


def test_seed_reproducible(client):
    def completion(seed: int, stream: bool = False) -> list[str]:
        kwargs = {"model": "tiny", "prompt": PROMPTS[2], "n": 2, "max_tokens": 12, "temperature": 1.0,
                  "seed": seed, "extra_body": GREEDY_EXTRA}
        if stream:
            texts, _, _ = collect_completion_stream(client.completions.create(stream=True, **kwargs))
            return [texts[0], texts[1]]
        return [c.text for c in by_index(client.completions.create(**kwargs).choices)]

    first = completion(1234)
    assert completion(1234) == first
    assert completion(1234, stream=True) == first
    assert completion(4321) != first

    def chat(seed: int) -> str:
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                              top_p=0.9, seed=seed, extra_body=GREEDY_EXTRA).choices[0].message.content

    assert chat(99) == chat(99)
    assert chat(99) != chat(100)


def test_max_completion_tokens(client, offline):
    expected = offline.chat(MESSAGES, greedy(3))[0].outputs[0].text
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=3, temperature=0,
                                         extra_body=GREEDY_EXTRA)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content == expected
    both = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=3, max_tokens=9,
                                          temperature=0, extra_body=GREEDY_EXTRA)
    assert both.usage.completion_tokens == 3
    only_max_tokens = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                                     extra_body=GREEDY_EXTRA)
    assert only_max_tokens.usage.completion_tokens == 5


def test_explicit_nulls_mean_defaults(client, offline):
    """OpenAI's optional parameters are "X or null"; the client sends None as null and it means the default."""
    nulls = {name: None for name in ("n", "top_p", "presence_penalty", "frequency_penalty", "stop", "seed", "user",
                                     "stream_options", "logit_bias")}
    expected = offline_texts(offline, PROMPTS[:1])[0]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    echo=None, logprobs=None, best_of=None, suffix=None, extra_body=GREEDY_EXTRA,
                                    **nulls)
    assert [c.text for c in out.choices] == [expected]
    assert out.choices[0].logprobs is None
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                          max_completion_tokens=None, logprobs=None, top_logprobs=None,
                                          extra_body=GREEDY_EXTRA, **nulls)
    assert [c.message.content for c in chat.choices] == [offline.chat(MESSAGES, greedy())[0].outputs[0].text]
    assert chat.usage.completion_tokens == MAX_TOKENS


def test_continue_final_message_leaves_the_last_message_open(server, client, offline):
    """vLLM's ``continue_final_message`` (with ``add_generation_prompt: false``): the prompt ends with the last
    message's text, nothing of the template after it (no EOS, no new turn), as transformers renders it; the
    server, /tokenize and the offline ``LLM.chat`` run that same prompt."""
    import httpx

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, the answer is"}]
    tokenizer = offline.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                         continue_final_message=True)
    assert text.endswith("Sure, the answer is")
    expected_ids = tokenizer.encode(text, add_special_tokens=False)
    extra = {"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True}
    served = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            extra_body=extra)
    assert served.usage.prompt_tokens == len(expected_ids)
    tokens = httpx.post(f"{server.base_url}/tokenize", json={
        "messages": messages, "continue_final_message": True, "add_generation_prompt": False}).json()["tokens"]
    assert tokens == expected_ids
    local = offline.chat(messages, greedy(), add_generation_prompt=False, continue_final_message=True)[0]
    assert local.prompt_token_ids == expected_ids and local.outputs[0].text == served.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as both:   # a new turn and an open last message at once
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                       extra_body={"continue_final_message": True})
    assert both.value.body["param"] == "continue_final_message"


def test_spaces_between_special_tokens_reaches_the_sampling_params():
    """vLLM's field is passed on to the detokenizer, as offline (with a fast tokenizer it changes nothing: HF
    writes no spaces between added tokens either way)."""
    from llmserve.entrypoints.openai.protocol import CompletionRequest

    for spaces in (True, False):
        body = CompletionRequest.model_validate({"prompt": "x", "spaces_between_special_tokens": spaces})
        assert body.sampling_params(4, None).spaces_between_special_tokens is spaces


def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(server, client):
    """``usage.prompt_tokens_details.cached_tokens`` (OpenAI's field; ``input_tokens_details`` on /v1/responses):
    0 the first time a prompt is seen, its full cached blocks the second time (the last token is always
    computed), streamed or not."""
    import uuid

    import httpx

    prompt = f"{uuid.uuid4().hex} " + " ".join(PROMPTS * 6)   # unseen by the cache, several blocks long
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0   # whole blocks of the default size
    streamed = [c.usage for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=1, stream=True,
                                                           stream_options={"include_usage": True}) if c.usage]
    assert streamed[0].prompt_tokens_details.cached_tokens == cached
    chat = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model="tiny", messages=chat, max_tokens=1)
    assert client.chat.completions.create(model="tiny", messages=chat, max_tokens=1
                                          ).usage.prompt_tokens_details.cached_tokens > 0
    body = {"model": "tiny", "input": prompt, "max_output_tokens": 1}
    usage = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=30).json()["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] > 0


def test_truncate_prompt_tokens_runs_the_prompts_last_tokens(client, offline):
    """vLLM's ``truncate_prompt_tokens`` on completions and chat: the prompt's last k tokens run (what the usage
    counts), as the offline API runs them."""
    ids = offline.get_tokenizer().encode(PROMPTS[0])
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 3, **GREEDY_EXTRA})
    assert out.usage.prompt_tokens == 3
    assert out.choices[0].text == offline_texts(offline, [ids[-3:]])[0]
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1,
                                          extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError) as zero:
        client.completions.create(model="tiny", prompt="x", max_tokens=1, extra_body={"truncate_prompt_tokens": 0})
    assert zero.value.body["param"] == "truncate_prompt_tokens"
