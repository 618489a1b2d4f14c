"""Server-sent events: framing, chunk shapes, and many streams at once.

* Every streamed response is ``text/event-stream`` made only of events ``data: <one-line JSON>\\n\\n``,
  ending with exactly one ``data: [DONE]\\n\\n`` and nothing after it.
* Completion chunks are ``text_completion`` objects, chat chunks ``chat.completion.chunk`` objects; all
  chunks of one response share its ``id``, ``created`` and ``model``; a completion chunk holds one choice.
* A chat choice's first chunk carries only the role (``{"role": "assistant", "content": ""}``), its last
  chunk carries the ``finish_reason`` (exactly once), and no chunk of that choice follows it; with
  ``n > 1`` this holds for every choice, also when they finish at different steps (completions alike).
* With ``stream_options.include_usage`` every chunk but the last has ``"usage": null`` and the last chunk
  (just before ``[DONE]``) has the usage and an empty ``choices`` list (OpenAI's documented behaviour).
* Tokens are streamed as they are generated: a 16-token greedy completion arrives in more than one chunk.
  With ``--stream-interval 4`` it arrives in five (tokens 1, 2-5, 6-9, 10-13, 14-16), with the same text; so it
  does with ``--num-scheduler-steps 4`` (each step's four tokens together).
* 64 streaming clients at once (asyncio + ``AsyncOpenAI``, half completions, half chat, each with its own
  prompt, plus raw ``httpx`` streams checked for framing) each receive exactly the offline API's greedy
  text for their prompt, in a well-formed stream, and the server returns to idle afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmserve import LLM, SamplingParams

PROMPTS = ["Hello world, this is", "The quick brown fox", "def add(a, b):", "Une phrase en français, café"]
MAX_TOKENS = 16
NUM_CLIENTS = 64
NUM_RAW = 8   # of the 64, streamed with raw httpx so the exact framing can be checked


@pytest.fixture(scope="module")
def offline(llama_dir) -> LLM:
    return LLM(str(llama_dir), kv_cache_memory_bytes="16MiB")


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def parse_sse(body: str) -> list[dict]:
    """Check the exact SSE framing of a whole response body; return the JSON chunks before [DONE]."""
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert events.count("data: [DONE]") == 1
    chunks = []
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event, repr(event)
        chunks.append(json.loads(event[len("data: "):]))
    assert chunks, "a stream has at least one chunk"
    return chunks


def raw_stream(base_url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", base_url + path, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes()).decode("utf-8")
    return parse_sse(raw)


def check_common(chunks: list[dict], obj: str) -> None:
    assert all(c["object"] == obj for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1 and isinstance(chunks[0]["created"], int)
    assert all(c["model"] == "tiny" for c in chunks)


def check_chat_choices(chunks: list[dict]) -> tuple[dict[int, str], dict[int, str]]:
    """Per-choice well-formedness of chat chunks; returns ({index: text}, {index: finish_reason})."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            index = choice["index"]
            assert index not in finish, f"choice {index} got a chunk after its finish_reason"
            if index not in texts:
                assert choice["delta"] == {"role": "assistant", "content": ""}
                assert choice["finish_reason"] is None
                texts[index] = ""
                continue
            assert "role" not in choice["delta"]
            texts[index] += choice["delta"].get("content") or ""
            if choice["finish_reason"] is not None:
                finish[index] = choice["finish_reason"]
    assert set(finish) == set(texts)
    return texts, finish


def check_completion_choices(chunks: list[dict]) -> tuple[dict[int, str], dict[int, str]]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            index = choice["index"]
            assert index not in finish, f"choice {index} got a chunk after its finish_reason"
            assert set(choice) >= {"index", "text", "logprobs", "finish_reason"}
            texts[index] = texts.get(index, "") + choice["text"]
            if choice["finish_reason"] is not None:
                finish[index] = choice["finish_reason"]
    assert set(finish) == set(texts)
    return texts, finish


# ------------------------------------------------------------------ framing and chunk shapes


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_stream_framing(server, offline, include_usage):
    expected = [o.outputs[0].text for o in offline.generate(PROMPTS[:2], greedy())]
    body = {"model": "tiny", "prompt": PROMPTS[:2], "n": 2, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = raw_stream(server.base_url, "/v1/completions", body)
    check_common(chunks, "text_completion")
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == []
        assert last["usage"]["completion_tokens"] == 4 * MAX_TOKENS
        assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 4 * MAX_TOKENS
        assert all("usage" in c and c["usage"] is None for c in chunks), "other chunks carry usage: null"
    else:
        assert all(c.get("usage") is None for c in chunks)
    assert all(c["choices"] for c in chunks)
    texts, finish = check_completion_choices(chunks)
    assert texts == {0: expected[0], 1: expected[0], 2: expected[1], 3: expected[1]}
    assert finish == {i: "length" for i in range(4)}


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_framing(server, offline, include_usage):
    messages = [{"role": "user", "content": "Tell me a story about café society"}]
    expected = offline.chat(messages, greedy())[0]
    body = {"model": "tiny", "messages": messages, "n": 3, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = raw_stream(server.base_url, "/v1/chat/completions", body)
    check_common(chunks, "chat.completion.chunk")
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == []
        cached = last["usage"].pop("prompt_tokens_details")["cached_tokens"]   # earlier tests may have cached it
        assert 0 <= cached < len(expected.prompt_token_ids)
        assert last["usage"] == {"prompt_tokens": len(expected.prompt_token_ids),
                                 "completion_tokens": 3 * MAX_TOKENS,
                                 "total_tokens": len(expected.prompt_token_ids) + 3 * MAX_TOKENS}
        assert all("usage" in c and c["usage"] is None for c in chunks), "other chunks carry usage: null"
    else:
        assert all(c.get("usage") is None for c in chunks)
    assert all(c["choices"] for c in chunks)
    texts, finish = check_chat_choices(chunks)
    assert texts == {i: expected.outputs[0].text for i in range(3)}
    assert finish == {i: "length" for i in range(3)}


def test_tokens_arrive_incrementally(server):
    """A streamed response is not buffered: the text comes in several chunks, the first long before the end."""
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) > 20
    assert arrivals[0] < arrivals[-1] / 2


def test_a_stream_interval_groups_tokens_into_fewer_chunks_with_the_same_text(start_server, offline):
    """The first token at once, then at most one chunk per 4 tokens: 5 chunks for 16 (a front end that falls
    behind the core merges more tokens into a chunk, so a loaded machine sends fewer), the same text."""
    expected = offline.generate(PROMPTS[:1], greedy())[0].outputs[0].text
    coarse = start_server("--stream-interval", "4")
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    *chunks, usage = raw_stream(coarse.base_url, "/v1/completions", body)
    most = 1 + -(-(MAX_TOKENS - 1) // 4)
    assert 1 <= len(chunks) <= most == 5 and usage["usage"]["completion_tokens"] == MAX_TOKENS
    assert check_completion_choices(chunks) == ({0: expected}, {0: "length"})
    chat = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True}
    chunks = raw_stream(coarse.base_url, "/v1/chat/completions", chat)
    assert 3 <= len(chunks) <= 1 + most + 1   # the role, the tokens, the finish reason
    check_chat_choices(chunks)


def test_multi_step_decoding_streams_each_steps_tokens_together_with_the_same_text(start_server, offline):
    """``--num-scheduler-steps 4``: a greedy request's first token comes from its prompt's step, the rest four to a
    step: at most 5 chunks for 16 tokens, the offline text; a stop string inside a step ends the text there."""
    expected = offline.generate(PROMPTS[:1], greedy())[0].outputs[0].text
    server = start_server("--num-scheduler-steps", "4")
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    *chunks, usage = raw_stream(server.base_url, "/v1/completions", body)
    assert 1 <= len(chunks) <= 5 and usage["usage"]["completion_tokens"] == MAX_TOKENS
    assert check_completion_choices(chunks) == ({0: expected}, {0: "length"})
    stop = expected[len(expected) // 2:len(expected) // 2 + 2]
    chunks = raw_stream(server.base_url, "/v1/completions", {**body, "stop": [stop]})
    text = offline.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                        stop=[stop]))[0].outputs[0].text
    assert check_completion_choices(chunks[:-1]) == ({0: text}, {0: "stop"})


def test_streamed_equals_non_streamed(server):
    """The same seeded request gives the same text streamed or not, for every choice."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    kwargs = {"model": "tiny", "prompt": PROMPTS[3], "n": 3, "max_tokens": MAX_TOKENS, "temperature": 0.8,
              "seed": 11, "logprobs": 1, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kwargs)
    streamed: dict[int, str] = {}
    streamed_tokens: dict[int, list[str]] = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
            streamed_tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens if choice.logprobs else [])
    assert streamed == {c.index: c.text for c in whole.choices}
    assert streamed_tokens == {c.index: c.logprobs.tokens for c in whole.choices}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_choices_that_finish_at_different_steps_finish_once_each(server, path):
    """n = 3 with a stop string: the choices stop at different steps; each choice's finish is sent exactly once
    and nothing of it follows (an earlier-finished choice is not repeated while the others go on); a completion
    chunk holds one choice, as OpenAI and vLLM stream them; the texts are the non-streamed ones."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    lengths = set()
    for seed in range(4):
        body = {"model": "tiny", "n": 3, "max_tokens": 12, "temperature": 1.0, "seed": seed, "stop": ["e"]}
        if path == "/v1/completions":
            body["prompt"] = PROMPTS[0]
            chunks = raw_stream(server.base_url, path, body)
            assert all(len(c["choices"]) == 1 for c in chunks)
            texts, finish = check_completion_choices(chunks)
            whole = client.completions.create(**body)
            assert texts == {c.index: c.text for c in whole.choices}
        else:
            body["messages"] = [{"role": "user", "content": PROMPTS[0]}]
            chunks = raw_stream(server.base_url, path, body)
            texts, finish = check_chat_choices(chunks)
            whole = client.chat.completions.create(**body)
            assert texts == {c.index: c.message.content for c in whole.choices}
        assert finish == {c.index: c.finish_reason for c in whole.choices}
        for c in whole.choices:
            lengths.add(c.finish_reason)
        finishes = [ch["index"] for chunk in chunks for ch in chunk["choices"] if ch["finish_reason"] is not None]
        assert sorted(finishes) == [0, 1, 2]
    assert "stop" in lengths   # the stop string did end choices early


# ------------------------------------------------------------------ many clients at once


def metric_value(text: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_64_concurrent_streams_equal_offline(server, offline):
    half = NUM_CLIENTS // 2
    completion_prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(half)]
    chat_messages = [[{"role": "user", "content": f"Question {i}: {PROMPTS[i % 4]}?"}] for i in range(half)]
    expected_completions = [o.outputs[0].text for o in offline.generate(completion_prompts, greedy())]
    expected_chat = [o.outputs[0].text for o in offline.chat(chat_messages, greedy())]
    raw_completion = set(range(NUM_RAW // 2))           # these go over raw httpx
    raw_chat = set(range(half - NUM_RAW // 2, half))

    async def run() -> tuple[list, list]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        http = httpx.AsyncClient(base_url=server.base_url, timeout=120)
        start = asyncio.Event()

        async def raw(path: str, body: dict) -> list[dict]:
            await start.wait()
            async with http.stream("POST", path, json={**body, "stream": True}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                data = b"".join([part async for part in response.aiter_bytes()])
            return parse_sse(data.decode("utf-8"))

        async def completion(i: int) -> tuple[str, list]:
            body = {"model": "tiny", "prompt": completion_prompts[i], "max_tokens": MAX_TOKENS, "temperature": 0}
            if i in raw_completion:
                chunks = await raw("/v1/completions", {**body, "ignore_eos": True})
                check_common(chunks, "text_completion")
                texts, finish = check_completion_choices(chunks)
                assert finish == {0: "length"}
                return texts[0], [chunks[0]["id"]]
            await start.wait()
            stream = await aclient.completions.create(stream=True, extra_body={"ignore_eos": True}, **body)
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].choices[0].finish_reason == "length"
            assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
            assert all(c.choices[0].index == 0 for c in chunks)
            return "".join(c.choices[0].text for c in chunks), [c.id for c in chunks]

        async def chat(i: int) -> tuple[str, list]:
            body = {"model": "tiny", "messages": chat_messages[i], "max_tokens": MAX_TOKENS, "temperature": 0}
            if i in raw_chat:
                chunks = await raw("/v1/chat/completions", {**body, "ignore_eos": True})
                check_common(chunks, "chat.completion.chunk")
                texts, finish = check_chat_choices(chunks)
                assert finish == {0: "length"}
                return texts[0], [chunks[0]["id"]]
            await start.wait()
            stream = await aclient.chat.completions.create(stream=True, extra_body={"ignore_eos": True}, **body)
            chunks = [chunk async for chunk in stream]
            first, last = chunks[0].choices[0], chunks[-1].choices[0]
            assert first.delta.role == "assistant" and first.delta.content == "" and first.finish_reason is None
            assert last.finish_reason == "length"
            assert all(c.choices[0].finish_reason is None and c.choices[0].delta.role is None
                       for c in chunks[1:-1])
            return "".join(c.choices[0].delta.content or "" for c in chunks), [c.id for c in chunks]

        tasks = [asyncio.ensure_future(completion(i)) for i in range(half)]
        tasks += [asyncio.ensure_future(chat(i)) for i in range(half)]
        await asyncio.sleep(0)   # every coroutine is parked on `start`: release them together
        start.set()
        try:
            results = await asyncio.gather(*tasks)
        finally:
            await http.aclose()
            await aclient.close()
        return results[:half], results[half:]

    def engine_steps() -> float:
        return metric_value(httpx.get(server.base_url + "/metrics").text, "vllm:iteration_tokens_total_count")

    steps_before = engine_steps()
    completions, chats = asyncio.run(run())
    steps = engine_steps() - steps_before
    assert [text for text, _ in completions] == expected_completions
    assert [text for text, _ in chats] == expected_chat
    for _, ids in completions + chats:
        assert len(set(ids)) == 1   # every chunk of a stream carries the response's id
    assert len({ids[0] for _, ids in completions + chats}) == NUM_CLIENTS   # and ids are unique
    # One at a time, each request would take at least MAX_TOKENS steps of its own.
    assert 0 < steps < NUM_CLIENTS * MAX_TOKENS / 4, f"the requests were not batched together ({steps} steps)"

    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(server.base_url + "/metrics").text
        idle = (metric_value(text, "vllm:num_requests_running") == 0
                and metric_value(text, "vllm:num_requests_waiting") == 0
                and metric_value(text, "vllm:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, "the server did not return to idle after the burst"
