"""The engine-core process's loop (``_core_loop``), run on a thread over an in-process core of the tiny Llama.

Specified:

* The core runs at most ``MAX_STEPS_AHEAD`` steps ahead of the front end's acknowledgements, then waits;
  one acknowledgement may count several messages (``K`` + count), and lets the core run as many steps on.
* The front end writes an acknowledgement on the pipe itself when the sender thread is not writing (no
  thread wake-up per step), and queues it behind a message the sender is writing (never interleaved);
  it reads every message already waiting in one go (``receive_all``).
* An abort that comes while the core waits for an acknowledgement is applied at once: the request's
  blocks are free before any further step, and its message reports ``AbortDelay(steps=0)``.
* An abort that comes during a step is applied right after that step (the one in flight):
  ``AbortDelay(steps=1)``, and no later step computes for the request.
* The count is taken where the request stops, not where the abort is handed to the core: a core that
  stops aborted requests one step late (computing once more for a client that left) reports two steps,
  which fails the abort storm's check.
* The core process builds its core from the checkpoint's config alone (``build_engine_core``): it never
  loads a tokenizer (only the front end tokenises), and its limits are the ones the front end computes.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import queue
import select
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from llmserve import LLM, SamplingParams
from llmserve.engine.core import EngineCore
from llmserve.config import EngineConfig
from llmserve.engine import input_processor
from llmserve.engine.core_client import MAX_STEPS_AHEAD, EngineCoreClient, Received, _core_loop, build_engine_core
from llmserve.engine.messages import EngineCoreOutputs, EngineCoreRequest, decode, encode

LONG = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), kv_cache_memory_bytes="32MiB", max_model_len=64)


@dataclass
class LoopUnderTest:
    core: EngineCore
    received: queue.SimpleQueue[Received]
    outputs: Any   # the reading end of the loop's output pipe

    def send(self, message: bytes) -> None:
        """As the receiver thread does: stamped with the core's steps so far and the time."""
        self.received.put(Received(message, self.core.num_steps, time.monotonic()))

    def add(self, llm: LLM, request_id: str) -> None:
        _, request = llm.engine.inputs.process(request_id, "Hello world, this is", LONG, None, None)
        self.send(b"A" + encode(request))

    def abort(self, request_id: str) -> None:
        self.send(b"B" + json.dumps([request_id, None]).encode())

    def next_output(self, timeout: float = 30.0) -> EngineCoreOutputs:
        assert self.outputs.poll(timeout), "the core sent nothing"
        message = self.outputs.recv_bytes()
        assert message[:1] == b"O", message
        return decode(message[1:], EngineCoreOutputs)


@pytest.fixture
def loop(llm) -> Iterator[LoopUnderTest]:
    core = llm.engine.core
    core.report_stats = True   # as in the core process: every step's message carries the gauges
    received: queue.SimpleQueue[Received] = queue.SimpleQueue()
    out_recv, out_send = multiprocessing.Pipe(duplex=False)
    thread = threading.Thread(target=_core_loop, args=(core, received, out_send), daemon=True)
    thread.start()
    under_test = LoopUnderTest(core, received, out_recv)
    try:
        yield under_test
    finally:
        under_test.send(b"Q")
        thread.join(30)
        core.report_stats = False
    assert not thread.is_alive()
    assert not core.has_unfinished_requests() and core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_an_abort_while_waiting_for_acknowledgements_frees_the_blocks_before_any_step(llm, loop):
    loop.add(llm, "r")
    ahead = [loop.next_output() for _ in range(MAX_STEPS_AHEAD)]
    assert all(out.samples for out in ahead)
    assert not loop.outputs.poll(0.3)          # no acknowledgement: the core waits instead of stepping
    steps = loop.core.num_steps
    loop.abort("r")
    idle = loop.next_output()
    assert [a.steps for a in idle.aborts] == [0] and idle.aborts[0].seconds < 1.0
    assert idle.stats.num_free_blocks == idle.stats.num_blocks and idle.stats.num_requests_running == 0
    assert loop.core.num_steps == steps


def test_one_acknowledgement_of_several_messages_lets_the_core_run_as_many_steps_on(llm, loop):
    loop.add(llm, "r")
    for _ in range(MAX_STEPS_AHEAD):
        loop.next_output()
    assert not loop.outputs.poll(0.3)
    loop.send(b"K%d" % MAX_STEPS_AHEAD)
    for _ in range(MAX_STEPS_AHEAD):
        assert loop.next_output().samples
    assert not loop.outputs.poll(0.3)          # and no further
    loop.abort("r")
    loop.next_output()


def client_on_pipes() -> tuple[EngineCoreClient, Any, Any]:
    """An :class:`EngineCoreClient`'s pipe ends and sender thread without a core process: the client, the
    core's reading end of its input pipe and the core's writing end of its output pipe."""
    client = EngineCoreClient.__new__(EngineCoreClient)
    core_in, client._in = multiprocessing.Pipe(duplex=False)
    client._out, core_out = multiprocessing.Pipe(duplex=False)
    client._start_pipes()
    return client, core_in, core_out


def stop_sender(client: EngineCoreClient) -> None:
    """End the sender thread: from then on only a message written in place reaches the pipe."""
    client._sends.put(None)
    client._sender.join(5)


def test_a_small_message_is_written_at_once_unless_the_sender_is_writing():
    client, core_in, _ = client_on_pipes()
    try:
        stop_sender(client)
        client.ack(2)
        client.abort("r", 0)
        assert core_in.poll(5) and core_in.recv_bytes() == b"K2"
        assert core_in.recv_bytes() == b'B["r", 0]'
        with client._writing:                  # as while the sender writes a large request
            client.ack()
        assert not core_in.poll(0.2)           # queued behind it, not interleaved with it
        assert client._sends.get_nowait() == b"K1"
    finally:
        client._in.close()


def test_a_message_over_one_atomic_pipe_write_goes_through_the_sender_and_keeps_its_place():
    client, core_in, _ = client_on_pipes()
    try:
        long_prompt = EngineCoreRequest("r", [30000 + i for i in range(select.PIPE_BUF)], SamplingParams(), 16,
                                        None, time.monotonic())
        with client._writing:                  # the sender holds the long request until released
            client.add_request(long_prompt)
            client.abort("r")                  # small, but behind the queued one: queued as well
        assert core_in.poll(5) and decode(core_in.recv_bytes()[1:], EngineCoreRequest) == long_prompt
        assert core_in.recv_bytes() == b'B["r", null]'
        deadline = time.monotonic() + 5
        while client._written < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        client.ack()                           # nothing queued any more: in place again
        assert core_in.recv_bytes() == b"K1"
        assert client._queued == client._written == 2
    finally:
        stop_sender(client)
        client._in.close()


def test_a_full_pipe_queues_a_small_message_instead_of_blocking_the_caller():
    client, core_in, _ = client_on_pipes()
    try:
        stop_sender(client)
        filler = b"A" + b"x" * 1000
        while client._writable.poll(0):        # the core does not read: fill the pipe by direct writes
            client._send(filler)
        client.ack()                           # returns: queued, not written
        assert client._sends.get_nowait() == b"K1"
        assert client._queued == 1 and client._written == 0
    finally:
        client._in.close()


def test_receive_all_reads_every_message_already_waiting_up_to_the_core_s_lead():
    client, _, core_out = client_on_pipes()
    try:
        for step in range(MAX_STEPS_AHEAD + 1):
            core_out.send_bytes(b"O" + encode(EngineCoreOutputs(num_scheduled_tokens=step + 1)))
        assert [m.num_scheduled_tokens for m in client.receive_all()] == list(range(1, MAX_STEPS_AHEAD + 1))
        assert [m.num_scheduled_tokens for m in client.receive_all()] == [MAX_STEPS_AHEAD + 1]
    finally:
        stop_sender(client)
        client._in.close()


def hold_first_step(core: EngineCore, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The first step waits, once it has begun, until ``release`` is set (``in_step`` says it has begun)."""
    execute = core.executor.execute_model
    in_step, release = threading.Event(), threading.Event()

    def held_step(scheduler_output):
        in_step.set()
        assert release.wait(30)
        return execute(scheduler_output)

    monkeypatch.setattr(core.executor, "execute_model", held_step)
    return in_step, release


def abort_during_the_first_step(llm: LLM, loop: LoopUnderTest, monkeypatch) -> int:
    """Add a request and abort it while its first step runs; the core's steps before that step."""
    in_step, release = hold_first_step(loop.core, monkeypatch)
    loop.add(llm, "r")
    assert in_step.wait(30)
    steps = loop.core.num_steps                # the step in flight is not finished yet
    loop.abort("r")
    release.set()
    return steps


def test_an_abort_during_a_step_is_applied_right_after_it(llm, loop, monkeypatch):
    steps = abort_during_the_first_step(llm, loop, monkeypatch)
    first = loop.next_output()
    assert first.samples and not first.aborts   # the step in flight reports its token
    idle = loop.next_output()
    assert [a.steps for a in idle.aborts] == [1]
    assert idle.stats.num_free_blocks == idle.stats.num_blocks
    assert loop.core.num_steps == steps + 1     # nothing computed for the request after that step


def test_a_core_that_stops_aborted_requests_a_step_late_reports_two_steps(llm, loop, monkeypatch):
    core = loop.core
    abort, step = core.abort, core.step
    late: list[tuple[str, int | None]] = []

    def late_step():
        pending = late[:]
        late.clear()
        outputs = step()
        for request_id, index in pending:
            abort(request_id, index)
        return outputs

    monkeypatch.setattr(core, "abort", lambda request_id, index=None: late.append((request_id, index)))
    monkeypatch.setattr(core, "step", late_step)
    steps = abort_during_the_first_step(llm, loop, monkeypatch)
    outputs = [loop.next_output() for _ in range(2)]
    assert [a.steps for out in outputs for a in out.aborts] == [2]
    assert core.num_steps == steps + 2          # the request ran in the step after the one in flight


def test_the_core_process_builds_its_core_without_a_tokenizer(llama_dir, monkeypatch):
    import transformers

    config = EngineConfig(model=str(llama_dir), kv_cache_memory_bytes="32MiB")
    front_end = input_processor.ModelInfo(copy.deepcopy(config))

    def refuse(*args, **kwargs):
        raise AssertionError("the engine core loaded a tokenizer")

    monkeypatch.setattr(input_processor, "load_tokenizer", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    core = build_engine_core(config)
    try:
        assert core.scheduler.max_model_len == front_end.max_model_len
        assert core.scheduler.max_num_batched_tokens == front_end.max_num_batched_tokens
        assert config.dtype == front_end.config.dtype
    finally:
        core.shutdown()
