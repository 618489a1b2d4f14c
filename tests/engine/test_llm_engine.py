"""The engine core on the tiny Llama checkpoint: admission, aborts, stop conditions and outputs.

Specified:

* Admission refuses a bad request with :class:`InvalidRequestError` naming the offending field
  (``param``) and queues nothing of it: an empty prompt, an out-of-range token id, a prompt that
  leaves no room or a completion that overruns ``max_model_len`` (vLLM's "This model's maximum
  context length is ..." message), a request needing more KV blocks than the whole cache, a
  duplicate request id, too many logprobs, out-of-vocabulary ids in sampling parameters.
  After any refusal the engine goes on serving the requests it holds, with unchanged outputs.
* ``abort_request`` stops a waiting or running request at once and frees its blocks; it returns
  False for an unknown or finished request. Nothing leaks: after every request has finished, been
  aborted or been refused, every KV block is free.
* Stop conditions follow vLLM: ``max_tokens`` (``None`` fills the context), EOS (unless
  ``ignore_eos``), ``stop_token_ids`` (``stop_reason`` is the id), stop strings, even spanning
  several tokens (text cut before the string, ``stop_reason`` the string), and ``min_tokens``
  holding back EOS and stop tokens. The EOS or stop token is in ``token_ids`` but its text is not
  in ``text`` unless ``include_stop_str_in_output``.
* Outputs: ``n`` completions with indices 0..n-1, ordered timing metrics, cumulative outputs that
  only grow, and ``stats()`` that moves while requests run and returns to idle.
"""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams
from llmserve.engine.llm_engine import LLMEngine, OutputKind
from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import SamplingParamsError

MAX_MODEL_LEN = 64
PROMPT = "Hello world, this is"
OTHER = "The quick brown fox"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), kv_cache_memory_bytes="32MiB", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def engine(llm) -> LLMEngine:
    return llm.engine


@pytest.fixture(autouse=True)
def starts_and_ends_idle(request):
    """Every test starts from an idle engine and leaves it idle: no request, no block in use."""
    if "engine" not in request.fixturenames:
        yield
        return
    engine = request.getfixturevalue("engine")
    assert_idle(engine)
    yield
    assert_idle(engine)


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_unfinished == 0
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    assert sorted(bm.free_blocks) == list(range(bm.num_blocks))
    assert all(rc == 0 for rc in bm.ref_counts)


def drain(engine: LLMEngine, max_steps: int = 10_000) -> dict:
    """Step until no request is left; the final output of each request, by id."""
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished, "a request finished twice"
                finished[out.request_id] = out
    raise AssertionError("the engine made no progress")


def run_one(engine: LLMEngine, prompt, params: SamplingParams):
    engine.add_request("one", prompt, params)
    return drain(engine)["one"]


@pytest.fixture(scope="module")
def greedy_reference(engine):
    """Greedy outputs of PROMPT and OTHER, run alone."""
    return {p: run_one(engine, p, GREEDY).outputs[0].token_ids for p in (PROMPT, OTHER)}


def block_bytes(engine: LLMEngine) -> int:
    return engine.runner.kv_cache_bytes_per_block()


# ------------------------------------------------------------------ admission


@pytest.mark.parametrize("prompt, params, param, fragment", [
    ("", GREEDY, "prompt", "empty"),
    ([], GREEDY, "prompt", "empty"),
    ([1, 2, 2000], GREEDY, "prompt", "out of range"),
    ([1, -1], GREEDY, "prompt", "out of range"),
    ([1, True], GREEDY, "prompt", "integers"),
    ("hi", SamplingParams(logprobs=21), "logprobs", "at most 20"),
    ("hi", SamplingParams(prompt_logprobs=21), "prompt_logprobs", "at most 20"),
    ("hi", SamplingParams(logit_bias={2000: 1.0}), "logit_bias", "2000"),
    ("hi", SamplingParams(stop_token_ids=[5, 2000]), "stop_token_ids", "2000"),
])
def test_bad_requests_are_refused(engine, prompt, params, param, fragment):
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.param == param
    assert "bad" not in engine.requests


def test_model_dependent_sampling_errors_are_sampling_params_errors(engine):
    with pytest.raises(SamplingParamsError):
        engine.add_request("bad", "hi", SamplingParams(logprobs=100))


def test_completion_past_the_context_is_refused(engine):
    prompt = [5] * 60
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", prompt, SamplingParams(max_tokens=5))
    assert str(info.value).startswith("This model's maximum context length is 64 tokens")
    assert "65" in str(info.value)       # the total asked for
    assert info.value.param == "max_tokens"
    engine.add_request("ok", prompt, SamplingParams(max_tokens=4, ignore_eos=True))   # exactly 64: fine
    out = drain(engine)["ok"].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


@pytest.mark.parametrize("length", [MAX_MODEL_LEN, MAX_MODEL_LEN + 10])
def test_prompt_filling_the_context_is_refused(engine, length):
    for max_tokens in (None, 1):
        with pytest.raises(InvalidRequestError) as info:
            engine.add_request("bad", [5] * length, SamplingParams(max_tokens=max_tokens))
        assert str(info.value).startswith("This model's maximum context length is 64 tokens")
        assert info.value.param == "prompt"


def test_a_prompt_alone_may_fill_the_context(engine):
    """max_tokens=0 generates nothing, so a prompt of exactly the context length is scored; one longer is not."""
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("long", [5] * (MAX_MODEL_LEN + 1), SamplingParams(max_tokens=0))
    assert info.value.param == "prompt"
    engine.add_request("full", [5] * MAX_MODEL_LEN, SamplingParams(max_tokens=0, prompt_logprobs=0))
    out = drain(engine)["full"]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert len(out.prompt_logprobs) == MAX_MODEL_LEN and out.prompt_logprobs[0] is None


def test_duplicate_request_id_is_refused_and_the_first_keeps_running(engine, greedy_reference):
    engine.add_request("dup", PROMPT, GREEDY)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("dup", OTHER, GREEDY)
    assert info.value.param == "request_id"
    out = drain(engine)["dup"]
    assert out.prompt == PROMPT and out.outputs[0].token_ids == greedy_reference[PROMPT]
    engine.add_request("dup", OTHER, GREEDY)      # a finished id may be used again
    assert drain(engine)["dup"].outputs[0].token_ids == greedy_reference[OTHER]


def test_request_larger_than_the_whole_cache_is_refused(llama_dir, llm):
    """4 blocks x 4 tokens: 10 + 6 tokens fit exactly, 10 + 7 could never run. Without max_tokens a request
    runs to what the cache holds (6 here), not to the context's end it could never reach; a prompt the cache
    cannot hold with one token more is refused."""
    small = LLM(str(llama_dir), block_size=4, kv_cache_memory_bytes=4 * 4 * block_bytes(llm.engine) // 16,
                max_model_len=MAX_MODEL_LEN)
    engine = small.engine
    assert engine.block_manager.num_blocks == 4
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("big", [5] * 10, SamplingParams(max_tokens=7))
    assert info.value.param == "max_tokens" and "4" in str(info.value)
    with pytest.raises(InvalidRequestError):
        engine.add_request("big", [5] * 16, SamplingParams(max_tokens=None))
    engine.add_request("fits", [5] * 10, SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(drain(engine)["fits"].outputs[0].token_ids) == 6
    engine.add_request("open", [5] * 10, SamplingParams(max_tokens=None, ignore_eos=True))   # not 54 tokens
    out = drain(engine)["open"].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    assert_idle(engine)


def test_refusals_do_not_disturb_queued_and_running_requests(engine, greedy_reference):
    bad_requests = [
        ("", GREEDY), ([], GREEDY), ([99999], GREEDY), ([5] * 64, GREEDY),
        ([5] * 60, SamplingParams(max_tokens=10)), ("x", SamplingParams(logprobs=50)),
        ("x", SamplingParams(logit_bias={5000: 1})),
    ]
    engine.add_request("a", PROMPT, GREEDY)
    engine.add_request("b", OTHER, GREEDY)
    for i, (prompt, params) in enumerate(bad_requests):          # while both are queued
        with pytest.raises(InvalidRequestError):
            engine.add_request(f"bad{i}", prompt, params)
        with pytest.raises(InvalidRequestError):
            engine.add_request("a", OTHER, GREEDY)
    engine.step()
    engine.step()
    for i, (prompt, params) in enumerate(bad_requests):          # while both are running
        with pytest.raises(InvalidRequestError):
            engine.add_request(f"bad{i}", prompt, params)
    assert set(engine.requests) == {"a", "b"}
    outputs = drain(engine)
    assert set(outputs) == {"a", "b"}
    assert outputs["a"].outputs[0].token_ids == greedy_reference[PROMPT]
    assert outputs["b"].outputs[0].token_ids == greedy_reference[OTHER]
    assert engine.stats()["num_free_blocks"] == engine.block_manager.num_blocks


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0),
    ("max_tokens", -1), ("min_tokens", -1), ("presence_penalty", 3.0), ("repetition_penalty", 0.0),
    ("logprobs", -1), ("stop", [""]), ("logit_bias", {1: 200.0}),
])
def test_bad_sampling_params_are_invalid_request_errors(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, SamplingParamsError)
    assert info.value.param == field


# ------------------------------------------------------------------ abort


def test_abort_a_waiting_request(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="32MiB", max_model_len=MAX_MODEL_LEN, max_num_seqs=1)
    engine = llm.engine
    engine.add_request("running", PROMPT, GREEDY)
    engine.add_request("waiting", OTHER, GREEDY)
    engine.step()
    assert [s.request_id for s in engine.scheduler.waiting] == ["waiting"]
    assert engine.abort_request("waiting") is True
    assert engine.abort_request("waiting") is False
    assert len(engine.scheduler.waiting) == 0
    outputs = drain(engine)
    assert set(outputs) == {"running"}
    assert len(outputs["running"].outputs[0].token_ids) == 8
    assert_idle(engine)


def test_abort_a_running_request_mid_decode(engine, greedy_reference):
    engine.add_request("victim", PROMPT, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("survivor", OTHER, GREEDY)
    for _ in range(4):
        engine.step()
    victim_seq = engine.core.requests["victim"][0]   # the engine core's sequence
    assert victim_seq.block_table and len(victim_seq.output_token_ids) == 4
    free_before = engine.block_manager.num_free_blocks
    assert engine.abort_request("victim") is True
    assert victim_seq.is_finished and victim_seq.finish_reason == "abort" and victim_seq.block_table == []
    assert engine.block_manager.num_free_blocks > free_before
    outputs = drain(engine)
    assert set(outputs) == {"survivor"}
    assert outputs["survivor"].outputs[0].token_ids == greedy_reference[OTHER]


def test_abort_unknown_or_finished_is_false(engine):
    assert engine.abort_request("never-seen") is False
    engine.add_request("done", PROMPT, SamplingParams(max_tokens=2))
    drain(engine)
    assert engine.abort_request("done") is False


def test_abort_every_sample_of_a_parallel_request(engine):
    engine.add_request("par", PROMPT, SamplingParams(n=3, max_tokens=20, seed=1, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.abort_request("par") is True
    assert drain(engine) == {}


def test_abort_before_any_step_and_in_random_order(engine):
    ids = [f"r{i}" for i in range(6)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [5 + i] * (3 + i), SamplingParams(max_tokens=10 + i, ignore_eos=True))
    assert engine.abort_request("r3")
    engine.step()
    assert engine.abort_request("r0") and engine.abort_request("r5")
    engine.step()
    engine.step()
    assert engine.abort_request("r1")
    outputs = drain(engine)
    assert set(outputs) == {"r2", "r4"}


def test_transient_model_failure_is_isolated_and_retried(llm, engine, monkeypatch, greedy_reference):
    """A step that fails once commits nothing; its requests then run one at a time in ordinary steps until
    each has a step of its own that succeeds, so every request still gets its exact output."""
    model = engine.runner.model
    real = model.forward
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    outs = llm.generate([PROMPT, OTHER], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [greedy_reference[PROMPT], greedy_reference[OTHER]]
    assert all(o.error is None for o in outs)
    assert_idle(engine)


def test_model_failure_on_one_request_fails_only_that_request(llm, engine, monkeypatch, greedy_reference):
    """The model fails whenever a poisoned token is computed: that request finishes with finish_reason
    "error" and a message; the other request is unaffected and nothing leaks. No step is re-run per
    sequence: the failed step's requests are isolated by the scheduler in the following steps."""
    model = engine.runner.model
    real = model.forward
    poison = engine.tokenizer.encode(OTHER)[-1]
    sizes = []

    def failing(input_ids, *args, **kwargs):
        sizes.append(len(input_ids))
        if poison in input_ids.tolist():
            raise RuntimeError("injected fault")
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    good, bad = llm.generate([PROMPT, OTHER], GREEDY)
    assert good.outputs[0].token_ids == greedy_reference[PROMPT]
    assert good.error is None and good.outputs[0].finish_reason == "length"
    assert bad.outputs[0].finish_reason == "error"
    assert "injected fault" in bad.error
    assert_idle(engine)
    monkeypatch.setattr(model, "forward", real)
    assert llm.generate([OTHER], GREEDY)[0].outputs[0].token_ids == greedy_reference[OTHER]


# ------------------------------------------------------------------ stop conditions


def test_max_tokens_is_exact(engine, greedy_reference):
    out = run_one(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)).outputs[0]
    assert out.token_ids == greedy_reference[PROMPT][:3]
    assert out.finish_reason == "length" and out.stop_reason is None


def test_max_tokens_none_fills_the_context(engine):
    out = run_one(engine, PROMPT, SamplingParams(max_tokens=None, ignore_eos=True, seed=0))
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == MAX_MODEL_LEN
    assert out.outputs[0].finish_reason == "length"


def test_eos_stops_and_its_text_is_not_in_the_output(engine):
    eos = engine.eos_token_id
    for skip_special_tokens in (True, False):
        params = SamplingParams(max_tokens=10, logit_bias={eos: 100.0}, skip_special_tokens=skip_special_tokens)
        out = run_one(engine, PROMPT, params).outputs[0]
        assert out.token_ids == [eos]
        assert out.text == ""
        assert out.finish_reason == "stop" and out.stop_reason is None


def test_eos_after_some_tokens(engine, greedy_reference):
    """EOS is allowed only from the 4th token (min_tokens=3): the text is that of the 3 tokens before it."""
    eos = engine.eos_token_id
    params = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={eos: 100.0}, min_tokens=3)
    out = run_one(engine, PROMPT, params).outputs[0]
    assert out.token_ids == greedy_reference[PROMPT][:3] + [eos]
    three = run_one(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=3)).outputs[0]
    assert out.text == three.text and out.finish_reason == "stop"


def test_ignore_eos_keeps_going(engine):
    eos = engine.eos_token_id
    out = run_one(engine, PROMPT, SamplingParams(max_tokens=5, logit_bias={eos: 100.0}, ignore_eos=True))
    assert out.outputs[0].token_ids == [eos] * 5
    assert out.outputs[0].finish_reason == "length"


def test_min_tokens_holds_back_eos(engine):
    eos = engine.eos_token_id
    out = run_one(engine, PROMPT, SamplingParams(max_tokens=10, logit_bias={eos: 100.0}, min_tokens=5))
    ids = out.outputs[0].token_ids
    assert len(ids) == 6 and eos not in ids[:5] and ids[5] == eos
    assert out.outputs[0].finish_reason == "stop"


def test_stop_token_id(engine, greedy_reference):
    ref = greedy_reference[PROMPT]
    i = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    params = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[ref[i]])
    out = run_one(engine, PROMPT, params).outputs[0]
    assert out.token_ids == ref[:i + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ref[i]
    before = run_one(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=i)).outputs[0].text
    through = run_one(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=i + 1)).outputs[0].text
    assert before != through
    assert out.text == before, "the stop token's text must not be in the output"
    kept = run_one(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[ref[i]],
                                                  include_stop_str_in_output=True)).outputs[0]
    assert kept.token_ids == ref[:i + 1] and kept.text == through


def test_min_tokens_holds_back_stop_token_ids(engine):
    out = run_one(engine, PROMPT, SamplingParams(max_tokens=10, logit_bias={7: 100.0}, stop_token_ids=[7],
                                                 min_tokens=3)).outputs[0]
    assert len(out.token_ids) == 4 and 7 not in out.token_ids[:3] and out.token_ids[3] == 7
    assert out.stop_reason == 7


def greedy_text_offsets(engine, prompt, num_tokens):
    """Greedy text of ``prompt`` and the text length after each generated token."""
    engine.add_request("offsets", prompt, SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True),
                       output_kind=OutputKind.CUMULATIVE)
    lengths, out = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            lengths.append(len(out.outputs[0].text))
    return out.outputs[0].text, out.outputs[0].token_ids, lengths


def test_stop_string_spanning_several_tokens(engine):
    text, ids, lengths = greedy_text_offsets(engine, OTHER, 24)
    # A stop string that starts inside one token and ends inside a later one, printable, first occurrence.
    for start in range(1, len(text) - 6):
        end = start + 6
        stop = text[start:end]
        first = next(k for k, n in enumerate(lengths) if n > start)     # token holding stop's first char
        last = next(k for k, n in enumerate(lengths) if n >= end)       # token completing it
        if (stop.isprintable() and "\ufffd" not in stop and text.find(stop) == start and last > first
                and lengths[first - 1 if first else 0] < start):
            break
    else:
        pytest.fail("no suitable stop string in the greedy output")

    params = SamplingParams(temperature=0.0, max_tokens=24, stop=["no such string", stop])
    out = run_one(engine, OTHER, params).outputs[0]
    assert out.text == text[:start]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == ids[:last + 1]

    params = SamplingParams(temperature=0.0, max_tokens=24, stop=stop, include_stop_str_in_output=True)
    out = run_one(engine, OTHER, params).outputs[0]
    assert out.text == text[:end] and out.stop_reason == stop
    assert out.token_ids == ids[:last + 1]


def test_earliest_stop_string_wins(engine):
    text, _, _ = greedy_text_offsets(engine, OTHER, 24)
    early, late = text[3:6], text[12:16]
    assert text.find(early) == 3 and text.find(late) == 12
    out = run_one(engine, OTHER, SamplingParams(temperature=0.0, max_tokens=24, stop=[late, early])).outputs[0]
    assert out.text == text[:3] and out.stop_reason == early


# ------------------------------------------------------------------ outputs


def test_n_completions(engine):
    out = run_one(engine, PROMPT, SamplingParams(n=3, max_tokens=6, seed=11, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3, "the samples must differ"
    assert out.finished


def test_parallel_samples_finish_independently(engine):
    """Each sample stops on its own; the request finishes (once) when the last sample does."""
    params = SamplingParams(n=3, max_tokens=12, seed=5, ignore_eos=True)
    free = run_one(engine, PROMPT, params).outputs
    stop = free[0].token_ids[2]
    expected = [c.token_ids[:c.token_ids.index(stop) + 1] if stop in c.token_ids else c.token_ids for c in free]
    assert len({len(e) for e in expected}) > 1, "pick a case where the samples stop at different steps"
    engine.add_request("par", PROMPT, SamplingParams(n=3, max_tokens=12, seed=5, ignore_eos=True,
                                                      stop_token_ids=[stop]))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    final = outputs[-1]
    assert final.finished and not any(o.finished for o in outputs[:-1])
    assert [c.token_ids for c in final.outputs] == expected
    for c, e in zip(final.outputs, expected):
        assert c.finish_reason == ("stop" if e[-1] == stop else "length")
    # While running, a finished sample already reports its finish reason, the others none.
    shortest = min(len(e) for e in expected)
    partial = outputs[shortest - 1].outputs
    assert sorted(c.finish_reason is None for c in partial) != [True] * 3


def test_metrics_are_ordered(engine):
    engine.add_request("m1", PROMPT, SamplingParams(max_tokens=5))
    engine.add_request("m2", OTHER, SamplingParams(max_tokens=3))
    for out in drain(engine).values():
        m = out.metrics
        assert None not in (m.first_scheduled_time, m.first_token_time, m.last_token_time, m.finished_time)
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
        assert m.last_token_time <= m.finished_time
        assert m.time_to_first_token >= 0 and m.queue_time >= 0


def test_cumulative_outputs_grow_and_final_only_reports_once(engine):
    engine.add_request("cum", PROMPT, SamplingParams(max_tokens=5, ignore_eos=True), output_kind=OutputKind.CUMULATIVE)
    engine.add_request("fin", OTHER, SamplingParams(max_tokens=5, ignore_eos=True), output_kind=OutputKind.FINAL_ONLY)
    seen = {"cum": [], "fin": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    cum = [o.outputs[0].token_ids for o in seen["cum"]]
    assert [len(ids) for ids in cum] == [1, 2, 3, 4, 5]
    assert all(cum[k] == cum[-1][:k + 1] for k in range(5))
    assert [o.finished for o in seen["cum"]] == [False] * 4 + [True]
    assert [o.outputs[0].finish_reason for o in seen["cum"]] == [None] * 4 + ["length"]
    assert len(seen["fin"]) == 1 and seen["fin"][0].finished and len(seen["fin"][0].outputs[0].token_ids) == 5


def test_request_output_describes_the_request(engine):
    out = run_one(engine, PROMPT, SamplingParams(max_tokens=2))
    assert out.request_id == "one" and out.prompt == PROMPT
    assert out.prompt_token_ids == engine.tokenizer.encode(PROMPT)
    ids_out = run_one(engine, out.prompt_token_ids, SamplingParams(max_tokens=2))
    assert ids_out.prompt is None and ids_out.prompt_token_ids == out.prompt_token_ids


def test_stats_move_and_return_to_idle(engine):
    before = engine.stats()
    assert before["num_requests_running"] == before["num_requests_waiting"] == 0
    assert before["kv_cache_usage"] == 0.0 and before["num_free_blocks"] == before["num_blocks"]
    engine.add_request("s1", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("s2", OTHER, SamplingParams(n=2, max_tokens=3, ignore_eos=True, seed=3))
    queued = engine.stats()
    assert queued["num_requests_waiting"] == 2 and queued["num_requests_running"] == 0   # requests, not samples
    num_prompt = len(engine.tokenizer.encode(PROMPT)) + len(engine.tokenizer.encode(OTHER))
    assert queued["prompt_tokens"] == before["prompt_tokens"] + num_prompt
    engine.step()
    running = engine.stats()
    assert running["num_requests_running"] == 2 and running["num_requests_waiting"] == 0
    assert running["kv_cache_usage"] > 0 and running["num_free_blocks"] < running["num_blocks"]
    assert running["generation_tokens"] == before["generation_tokens"] + 3
    drain(engine)
    after = engine.stats()
    assert after["num_requests_running"] == after["num_requests_waiting"] == 0
    assert after["kv_cache_usage"] == 0.0 and after["num_free_blocks"] == after["num_blocks"]
    assert after["generation_tokens"] == before["generation_tokens"] + 4 + 2 * 3


def test_preemptions_are_counted_and_nothing_leaks(llama_dir, llm):
    small = LLM(str(llama_dir), block_size=4, kv_cache_memory_bytes=12 * 4 * block_bytes(llm.engine) // 16,
                max_model_len=MAX_MODEL_LEN)
    engine = small.engine
    reference = LLM(str(llama_dir), kv_cache_memory_bytes="32MiB", max_model_len=MAX_MODEL_LEN)
    prompts = [PROMPT, OTHER, "A", "def f(x):"]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = small.generate(prompts, params)
    assert engine.stats()["num_preemptions"] > 0
    assert sum(o.num_preemptions for o in outs) == engine.stats()["num_preemptions"]
    expected = reference.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert_idle(engine)


def test_generation_config_eos_ids_also_stop(checkpoint_dir):
    """Qwen's generation_config.json lists <|endoftext|> besides the tokenizer's <|im_end|>: both end a request."""
    llm = LLM(str(checkpoint_dir("qwen2")), kv_cache_memory_bytes="32MiB", max_model_len=MAX_MODEL_LEN)
    engine, tok = llm.engine, llm.get_tokenizer()
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert engine.eos_token_id == im_end
    params = SamplingParams(max_tokens=5, logit_bias={endoftext: 100.0})
    out = llm.generate("hi", params)[0].outputs[0]
    assert out.token_ids == [endoftext] and out.text == ""
    assert out.finish_reason == "stop" and out.stop_reason == endoftext
    assert params.stop_token_ids == [], "the caller's SamplingParams must not change"
    out = llm.generate("hi", SamplingParams(max_tokens=5, logit_bias={endoftext: 100.0}, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == [endoftext] * 5 and out.outputs[0].finish_reason == "length"
    out = llm.generate("hi", SamplingParams(max_tokens=5, logit_bias={endoftext: 100.0}, min_tokens=2))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].token_ids[2] == endoftext
    assert_idle(engine)


def test_min_tokens_holds_back_stop_strings(engine):
    text, ids, lengths = greedy_text_offsets(engine, PROMPT, 12)
    stop = text[1:4]                         # completed by the first or second token
    assert text.find(stop) == 1 and lengths[1] < len(text)
    out = run_one(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=12, stop=stop, min_tokens=6))
    assert len(out.outputs[0].token_ids) >= 6
