"""A request's life in the server, and the server's: readiness, timeouts, faults, disconnects, shutdown.

Servers run through ``slow_server.py``, which sleeps in every model forward (``--step-delay``), so that a
long request really is long on any machine, and can sleep while loading (``--load-delay``) or apply
``fault_server.py``'s injected faults (``--inject-faults``). "Idle" below means /metrics shows
``vllm:num_requests_running`` 0 and ``vllm:kv_cache_usage_perc`` 0.

* A configuration the model cannot take (``-tp 3`` over 4 heads, ``-pp 9`` over 2 layers): the server
  exits 1 within seconds, before any worker starts, with one log line naming the numbers and no traceback.
* Readiness: the port opens before the model is loaded; until it is, /health answers 503 (never 200 and
  then 503 again), model endpoints answer 503 with ``Retry-After`` (code ``not_ready``) and /version
  answers; then /health answers 200.
* ``--request-timeout 1``: a longer non-streaming request gets 504 (code ``timeout``) after about a
  second, a streaming one gets its chunks, then an SSE error event and ``data: [DONE]``; the requests
  are aborted, so the server is idle within a second, and short requests are still served.
* A fault in the model forward on one request (any batch holding the poisoned token id fails): that
  request gets 500 (code ``engine_error``), or an SSE error event and ``[DONE]`` when streaming, while
  requests running beside it complete with exactly the text they get alone; /health stays 200, the
  failures count under ``finished_reason="error"`` and the server is idle afterwards.
* A fault in the engine loop itself: /health answers 503 from the moment the failing request has its
  answer (503, code ``engine_dead``); requests in flight get the same (streams: an SSE error event and
  ``[DONE]``); the process exits non-zero by itself within a few seconds.
* A client that goes away has its request aborted: a streaming client closing mid-stream, a
  non-streaming one giving up (read timeout). The server is idle within a second (the request could not
  have finished by itself), the abort counts under ``finished_reason="abort"`` and the log says
  ``request <id> aborted``.
* SIGTERM: connections are refused at once; a streaming request in flight completes normally; requests
  that cannot finish in time get a 503 (code ``shutting_down``) or an SSE error event and ``[DONE]``
  instead of a cut connection, and the process exits 0 within ``--shutdown-timeout``.
* ``X-Request-Id``: echoed in the response header (a generated id when none was sent), and it names the
  request in the log: one line per finished engine request, ``request <id> finished:
  prompt_tokens=P output_tokens=O ttft=Xs total=Ys finish=...`` with the counts of the response's usage.
* GET /version returns ``llmserve.__version__``. /tokenize and /detokenize round-trip a prompt (with or
  without special tokens) and chat messages (their tokens are the chat prompt the engine sees).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import llmserve
from tests.entrypoints.openai.conftest import HERE
from tests.entrypoints.openai.fault_server import FORWARD_POISON, LOOP_POISON, RANK_POISON

SLOW = HERE / "slow_server.py"
STEP_DELAY = "0.005"   # seconds per forward: a 1500-token request takes over 7 s
LONG = 1500
CHAT = [{"role": "user", "content": "Hi there"}]


class Metrics:
    def __init__(self, base_url: str) -> None:
        self.values: dict[str, float] = defaultdict(float)
        self.success: dict[str, float] = defaultdict(float)
        for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
            for sample in family.samples:
                self.values[sample.name] += sample.value
                if sample.name == "vllm:request_success_total":
                    self.success[sample.labels["finished_reason"]] += sample.value

    @property
    def idle(self) -> bool:
        return self.values["vllm:num_requests_running"] == 0 and self.values["vllm:kv_cache_usage_perc"] == 0


def wait_idle(base_url: str, within: float) -> Metrics:
    """Poll /metrics until idle; fail if it takes longer than ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        m = Metrics(base_url)
        if m.idle:
            return m
        assert time.monotonic() < deadline, f"not idle after {within} s: {dict(m.values)}"
        time.sleep(0.02)


def wait_running(base_url: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while Metrics(base_url).values["vllm:num_requests_running"] < count:
        assert time.monotonic() < deadline, "requests never started running"
        time.sleep(0.02)


def openai_error(response: httpx.Response, status: int, code: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


def sse_error(events: list[str], code: str) -> dict:
    """The stream ends with an error event and [DONE]; returns the error."""
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2][len("data: "):])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


async def sse_lines(client: httpx.AsyncClient, body: dict) -> list[str]:
    """The non-empty lines of a streamed completion."""
    async with client.stream("POST", "/v1/completions", json=body) as response:
        return [line async for line in response.aiter_lines() if line]


def completion_body(max_tokens: int, prompt: str | list[int] = "go", **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            **extra}


# ------------------------------------------------------------------ readiness


@pytest.fixture(scope="module")
def slow(start_server):
    """A slow-loading, slow-stepping server, with what was seen while it loaded."""
    srv = start_server("--load-delay", "2", "--step-delay", STEP_DELAY, wrapper=SLOW, ready=False)
    seen: dict[str, list] = {"health": [], "completion": [], "version": [], "models": []}
    deadline = time.monotonic() + 60
    while True:
        assert srv.process.poll() is None and time.monotonic() < deadline, srv.log()
        try:
            status = httpx.get(f"{srv.base_url}/health", timeout=2).status_code
        except httpx.TransportError:
            time.sleep(0.02)
            continue
        seen["health"].append(status)
        if status == 200:
            break
        if not seen["completion"]:
            seen["completion"].append(httpx.post(f"{srv.base_url}/v1/completions", json=completion_body(2)))
            seen["models"].append(httpx.get(f"{srv.base_url}/v1/models"))
            seen["version"].append(httpx.get(f"{srv.base_url}/version"))
        time.sleep(0.05)
    srv.seen = seen
    return srv


@pytest.mark.parametrize("flags,message", [
    (("-tp", "3"), "num_attention_heads (4) is not divisible by the tensor-parallel size (3)"),
    (("-pp", "9"), "cannot split 2 decoder layers over 9 pipeline stages"),
])
def test_a_split_the_model_cannot_take_fails_start_up_in_one_line(start_server, flags, message):
    srv = start_server(*flags, ready=False)
    assert srv.process.wait(60) == 1
    log = srv.log()
    assert f"failed to load the model: {message}" in log and "Traceback" not in log, log
    assert "worker" not in log, log   # refused before any worker process started


def test_health_is_503_until_the_model_is_loaded(slow):
    health = slow.seen["health"]
    assert health[0] == 503 and health[-1] == 200
    assert health == [503] * (len(health) - 1) + [200]
    refused = slow.seen["completion"][0]
    openai_error(refused, 503, "not_ready")
    assert int(refused.headers["retry-after"]) >= 1
    openai_error(slow.seen["models"][0], 503, "not_ready")
    assert slow.seen["version"][0].json() == {"version": llmserve.__version__}
    # Ready now: the same requests are served.
    assert httpx.post(f"{slow.base_url}/v1/completions", json=completion_body(2)).status_code == 200
    assert [m["id"] for m in httpx.get(f"{slow.base_url}/v1/models").json()["data"]] == ["tiny"]


def test_version(slow):
    response = httpx.get(f"{slow.base_url}/version")
    assert response.status_code == 200 and response.json() == {"version": llmserve.__version__}


def test_tokenize_detokenize_round_trip(slow):
    url = slow.base_url
    text = "Hello world, café au lait"
    plain = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["count"] == len(plain["tokens"]) > 0 and plain["max_model_len"] == 2048
    assert httpx.post(f"{url}/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": text}
    special = httpx.post(f"{url}/tokenize", json={"model": "tiny", "prompt": text}).json()
    assert special["tokens"][1:] == plain["tokens"] and special["count"] == plain["count"] + 1   # BOS
    assert httpx.post(f"{url}/detokenize", json={"tokens": special["tokens"]}).json()["prompt"].endswith(text)
    # The prompt's token count is what a completion reports.
    usage = httpx.post(f"{url}/v1/completions", json=completion_body(1, text)).json()["usage"]
    assert usage["prompt_tokens"] == special["count"]
    # Chat messages: the tokens of the rendered conversation, exactly what the chat endpoint runs.
    chat = httpx.post(f"{url}/tokenize", json={"messages": CHAT}).json()
    usage = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"] == len(chat["tokens"])
    rendered = httpx.post(f"{url}/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert "Hi there" in rendered
    again = httpx.post(f"{url}/tokenize", json={"prompt": rendered, "add_special_tokens": False}).json()
    assert again["tokens"] == chat["tokens"]
    # Misuse is a 400 naming the field.
    for body in ({}, {"prompt": "x", "messages": CHAT}):
        openai_error(httpx.post(f"{url}/tokenize", json=body), 400, None)
    assert httpx.post(f"{url}/detokenize", json={"tokens": [5, 10 ** 6]}).json()["error"]["param"] == "tokens"


# ------------------------------------------------------------------ request ids and the log

FINISHED = re.compile(r"request (\S+) finished: prompt_tokens=(\d+) output_tokens=(\d+) ttft=([\d.]+)s "
                      r"total=([\d.]+)s finish=(\S+)")


def test_request_id_is_echoed_and_names_the_log_line(slow):
    url = slow.base_url
    one = httpx.post(f"{url}/v1/completions", json=completion_body(5, "Hello"), headers={"X-Request-Id": "trace-1"})
    assert one.status_code == 200 and one.headers["x-request-id"] == "trace-1"
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"X-Request-Id": "trace-2"},
                      json={"messages": CHAT, "max_tokens": 4, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        assert response.headers["x-request-id"] == "trace-2"
        events = [line for line in response.iter_lines() if line]
    two_usage = json.loads(events[-2][len("data: "):])["usage"]
    three = httpx.post(f"{url}/v1/completions", json=completion_body(3, ["a b", "c d e"]),
                       headers={"X-Request-Id": "trace-3"})
    assert three.status_code == 200 and three.headers["x-request-id"] == "trace-3"
    anonymous = httpx.post(f"{url}/v1/completions", json=completion_body(2, "Hello"))
    generated = anonymous.headers["x-request-id"]
    assert generated and generated not in {"trace-1", "trace-2", "trace-3"}
    other = httpx.post(f"{url}/v1/completions", json=completion_body(2, "Hello")).headers["x-request-id"]
    assert other != generated

    lines = defaultdict(list)
    for match in FINISHED.finditer(slow.log()):
        rid, prompt, output, ttft, total, finish = match.groups()
        lines[rid].append((int(prompt), int(output), float(ttft), float(total), finish))
    assert [(p, o, finish) for p, o, _, _, finish in lines["trace-1"]] == [
        (one.json()["usage"]["prompt_tokens"], 5, "length")]
    assert [(p, o) for p, o, *_ in lines["trace-2"]] == [(two_usage["prompt_tokens"], 4)]
    assert sorted((p, o) for p, o, *_ in lines["trace-3"]) == sorted(
        (p, 3) for p in (len(httpx.post(f"{url}/tokenize", json={"prompt": t}).json()["tokens"])
                         for t in ("a b", "c d e")))
    assert len(lines[generated]) == 1 and len(lines[other]) == 1
    for entries in lines.values():
        for _, _, ttft, total, _ in entries:
            assert 0 <= ttft <= total < 30


# ------------------------------------------------------------------ disconnects


def test_streaming_client_that_hangs_up_is_aborted(slow):
    before = Metrics(slow.base_url)
    with httpx.stream("POST", f"{slow.base_url}/v1/completions", json=completion_body(LONG, stream=True),
                      headers={"X-Request-Id": "gone-streaming"}) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i == 10:
                break   # hang up mid-stream
    after = wait_idle(slow.base_url, within=1.0)
    assert after.success["abort"] == before.success["abort"] + 1
    assert after.values["vllm:generation_tokens_total"] - before.values["vllm:generation_tokens_total"] < LONG
    assert "request gone-streaming aborted" in slow.log()


def test_non_streaming_client_that_gives_up_is_aborted(slow):
    before = Metrics(slow.base_url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow.base_url}/v1/completions", json=completion_body(LONG),
                   headers={"X-Request-Id": "gone-waiting"}, timeout=httpx.Timeout(5, read=0.5))
    after = wait_idle(slow.base_url, within=1.0)
    assert after.success["abort"] == before.success["abort"] + 1
    assert after.values["vllm:generation_tokens_total"] - before.values["vllm:generation_tokens_total"] < LONG
    deadline = time.monotonic() + 2
    while "request gone-waiting aborted" not in slow.log():
        assert time.monotonic() < deadline, slow.log()[-2000:]
        time.sleep(0.05)
    time.sleep(0.5)   # the request's futures are collected by then
    assert "exception was never retrieved" not in slow.log() and "Traceback" not in slow.log()


# ------------------------------------------------------------------ --request-timeout


def test_request_timeout(start_server):
    srv = start_server("--request-timeout", "1", "--step-delay", STEP_DELAY, wrapper=SLOW)
    url = f"{srv.base_url}/v1/completions"
    start = time.monotonic()
    error = openai_error(httpx.post(url, json=completion_body(LONG), timeout=30), 504, "timeout")
    assert "--request-timeout" in error["message"] and time.monotonic() - start < 4
    wait_idle(srv.base_url, within=1.0)

    start = time.monotonic()
    with httpx.stream("POST", url, json=completion_body(LONG, stream=True), timeout=30) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert time.monotonic() - start < 4
    sse_error(events, "timeout")
    assert len(events) > 3 and all("choices" in json.loads(e[len("data: "):]) for e in events[:-2])
    m = wait_idle(srv.base_url, within=1.0)
    assert m.success["abort"] == 2
    chat = httpx.post(f"{srv.base_url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": LONG,
                                                                    "ignore_eos": True}, timeout=30)
    openai_error(chat, 504, "timeout")
    short = httpx.post(url, json=completion_body(5), timeout=30)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 5
    wait_idle(srv.base_url, within=1.0)


# ------------------------------------------------------------------ faults


@pytest.mark.parametrize("tp", ["1", "2"], ids=["in-process", "tp2-worker-processes"])
def test_model_fault_fails_only_the_poisoned_request(start_server, tp):
    """The poisoned request fails every step it is in (on every rank, with -tp 2 in the worker processes);
    the requests it shared steps with are isolated and finish with exactly their normal output."""
    srv = start_server("--inject-faults", "--step-delay", "0.002", "--tensor-parallel-size", tp, wrapper=SLOW)
    url = srv.base_url
    good = completion_body(150, "Hello world")
    expected = httpx.post(f"{url}/v1/completions", json=good, timeout=30).json()["choices"][0]["text"]
    before = Metrics(url)

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def stream(body: dict) -> list[str]:
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    return [line async for line in response.aiter_lines() if line]

            normal = [asyncio.ensure_future(client.post("/v1/completions", json=good)) for _ in range(3)]
            normal_stream = asyncio.ensure_future(stream(good))
            while Metrics(url).values["vllm:num_requests_running"] < 4:
                await asyncio.sleep(0.01)
            bad = await client.post("/v1/completions", json=completion_body(5, [5, 6, FORWARD_POISON]))
            bad_stream = await stream(completion_body(5, [FORWARD_POISON, 7]))
            health = (await client.get("/health")).status_code
            assert not all(t.done() for t in normal)   # the poison met them in the batch
            return bad, bad_stream, health, await asyncio.gather(*normal), await normal_stream

    bad, bad_stream, health, normal, normal_stream = asyncio.run(run())
    assert "injected model fault" in openai_error(bad, 500, "engine_error")["message"]
    sse_error(bad_stream, "engine_error")
    assert health == 200
    assert [r.status_code for r in normal] == [200, 200, 200]
    assert all(r.json()["choices"][0]["text"] == expected for r in normal)
    chunks = [json.loads(e[len("data: "):]) for e in normal_stream[:-1]]
    assert normal_stream[-1] == "data: [DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
    after = wait_idle(url, within=3.0)
    assert after.success["error"] - before.success["error"] == 2
    assert after.success["length"] - before.success["length"] == 4
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.post(f"{url}/v1/completions", json=good, timeout=30).json()["choices"][0]["text"] == expected


@pytest.mark.parametrize("parallel", [("--tensor-parallel-size", "2"), ("--pipeline-parallel-size", "2")],
                         ids=["tp2-last-rank-mid-step", "pp2-first-stage"])
def test_a_fault_on_one_rank_fails_only_that_request(start_server, parallel):
    """The poisoned request fails on one rank only, where the other ranks would wait for it (in the LM
    head's all-gather, or for the first stage's hidden states): they drop the step too, the poisoned
    request fails alone, the others finish with exactly their normal output, and the ranks go on in step."""
    srv = start_server("--inject-faults", "--step-delay", "0.002", *parallel, wrapper=SLOW)
    url = srv.base_url
    good = completion_body(150, "Hello world")
    expected = httpx.post(f"{url}/v1/completions", json=good, timeout=60).json()["choices"][0]["text"]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            normal = [asyncio.ensure_future(client.post("/v1/completions", json=good)) for _ in range(2)]
            while Metrics(url).values["vllm:num_requests_running"] < 2:
                await asyncio.sleep(0.01)
            bad = await client.post("/v1/completions", json=completion_body(5, [5, RANK_POISON, 6]))
            assert not all(t.done() for t in normal)   # the poison met them in the batch
            return bad, await asyncio.gather(*normal)

    bad, normal = asyncio.run(run())
    assert "injected fault on one rank" in openai_error(bad, 500, "engine_error")["message"]
    assert [r.json()["choices"][0]["text"] for r in normal] == [expected, expected]
    assert httpx.get(f"{url}/health").status_code == 200
    again = [httpx.post(f"{url}/v1/completions", json=good, timeout=60) for _ in range(2)]
    assert [r.json()["choices"][0]["text"] for r in again] == [expected, expected]


def test_engine_loop_fault_kills_the_server(start_server):
    srv = start_server("--inject-faults", "--step-delay", STEP_DELAY, wrapper=SLOW)
    url = srv.base_url

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            in_flight = [asyncio.ensure_future(sse_lines(client, completion_body(LONG, stream=True))),
                         asyncio.ensure_future(client.post("/v1/completions", json=completion_body(LONG)))]
            while Metrics(url).values["vllm:num_requests_running"] < 2:
                await asyncio.sleep(0.01)
            poisoned = await client.post("/v1/completions", json=completion_body(5, [5, LOOP_POISON]))
            died = time.monotonic()
            try:
                health = (await client.get("/health")).status_code
            except httpx.TransportError:
                health = None   # already shutting down: refused is fine too, 200 is not
            return poisoned, died, health, *await asyncio.gather(*in_flight)

    poisoned, died, health, events, waiting = asyncio.run(run())
    openai_error(poisoned, 503, "engine_dead")
    assert health in (503, None)
    sse_error(events, "engine_dead")
    openai_error(waiting, 503, "engine_dead")
    returncode = srv.process.wait(timeout=10)
    assert returncode != 0 and time.monotonic() - died < 5
    assert "engine loop died" in srv.log()


# ------------------------------------------------------------------ SIGTERM


def test_sigterm_drains_then_exits_zero(start_server):
    shutdown_timeout = 6
    srv = start_server("--step-delay", STEP_DELAY, "--shutdown-timeout", str(shutdown_timeout), wrapper=SLOW)
    url = srv.base_url

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def stream(max_tokens: int, rid: str) -> list[str]:
                async with client.stream("POST", "/v1/completions", headers={"X-Request-Id": rid},
                                         json=completion_body(max_tokens, stream=True)) as response:
                    return [line async for line in response.aiter_lines() if line]

            short = asyncio.ensure_future(stream(150, "short"))
            long = asyncio.ensure_future(stream(LONG, "long"))
            waiting = asyncio.ensure_future(client.post("/v1/completions", json=completion_body(LONG)))
            while Metrics(url).values["vllm:num_requests_running"] < 3:
                await asyncio.sleep(0.01)
            srv.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(timeout=2) as fresh:   # a new connection
                with pytest.raises(httpx.ConnectError):
                    await fresh.get(f"{url}/health")
            return signalled, await short, await long, await waiting

    signalled, short, long, waiting = asyncio.run(run())
    # The short request finished normally.
    assert short[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in short[:-1]]
    assert all("error" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"
    # The long ones could not: they were told so, not cut off.
    assert "--shutdown-timeout" in sse_error(long, "shutting_down")["message"]
    openai_error(waiting, 503, "shutting_down")
    assert srv.process.wait(timeout=shutdown_timeout + 5) == 0
    assert time.monotonic() - signalled < shutdown_timeout
    log = srv.log()
    assert "request short finished" in log and "Traceback" not in log


# ------------------------------------------------------------------ worker processes


def child_pids(pid: int) -> list[int]:
    """Live direct children of ``pid``."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if _alive(int(p))]


def spawned(pid: int) -> bool:
    """Whether ``pid`` is a process started by multiprocessing's spawn (the engine core, a worker)."""
    return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_worker_process_that_dies_or_hangs_kills_the_server_and_leaves_no_orphans(start_server, monkeypatch,
                                                                                   fault):
    """-tp 2: the server, its engine-core process and two worker processes. One worker is killed mid-run, or
    stopped (a hang, noticed after the execute timeout): the stream gets an error event, /health stops
    answering 200, the server exits non-zero within a bounded time, and no process of it is left behind, the
    stopped worker included."""
    monkeypatch.setenv("LLMSERVE_EXECUTE_MODEL_TIMEOUT_SECONDS", "4")
    srv = start_server("--step-delay", STEP_DELAY, "--tensor-parallel-size", "2", wrapper=SLOW)
    url = srv.base_url
    # the server spawns the engine core (whose children are the workers) and the chat-template renderer
    [core] = [p for p in child_pids(srv.process.pid) if spawned(p) and any(spawned(c) for c in child_pids(p))]
    workers = [p for p in child_pids(core) if spawned(p)]
    assert len(workers) == 2
    everything = [core, *workers, *child_pids(srv.process.pid), *child_pids(core)]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            in_flight = asyncio.ensure_future(sse_lines(client, completion_body(LONG, stream=True)))
            await asyncio.to_thread(wait_running, url, 1)
            os.kill(workers[0], fault)
            killed = time.monotonic()
            events = await in_flight
            try:
                health = (await client.get("/health")).status_code
            except httpx.TransportError:
                health = None
            return killed, events, health

    killed, events, health = asyncio.run(run())
    sse_error(events, "engine_dead")
    assert health in (503, None)
    assert srv.process.wait(timeout=20) != 0
    assert time.monotonic() - killed < 20
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in everything) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in everything if _alive(p)], "processes left behind"
