"""Structured outputs through the whole engine (offline ``LLM`` on the tiny Llama checkpoint, random weights).

Specified:

* ``SamplingParams(structured_outputs=...)`` (a :class:`StructuredOutputSpec` or a dict in vLLM's shape)
  constrains generation to a JSON schema (nested object, bounded strings and integers, an array of enums),
  any JSON object, a regex, a choice or a GBNF grammar: the text parses / validates / matches, and
  ``finish_reason`` is ``"stop"`` (the grammar's end, EOS, which the grammar allows only there).
* Unconstrained requests batched with constrained ones get exactly the tokens they get alone (greedy).
* ``n`` samples each follow their own grammar state; a sequence preempted and recomputed, and a step that
  fails after sampling and is run again, continue exactly where they were (same tokens as an undisturbed run).
* ``max_tokens`` cuts a constrained output early (``"length"``); ``min_tokens`` holds back EOS only while the
  grammar allows more; ``logprobs`` and ``prompt_logprobs`` work for constrained rows.
* A constraint the grammar library cannot compile is refused at admission, naming ``structured_outputs``.
* ``structured_outputs_config={"disable_any_whitespace": True}`` makes JSON compact for every request.
"""

from __future__ import annotations

import json
import re

import pytest

from llmserve import LLM, SamplingParams
from llmserve.errors import InvalidRequestError
from llmserve.structured_output import StructuredOutputSpec

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from tests.engine.test_llm_engine import assert_idle, block_bytes  # noqa: E402

MAX_MODEL_LEN = 256
PROMPTS = ["Hello world, this is", "The quick brown fox", "def f(x):"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "address", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe not"]
GRAMMAR = 'root ::= "[" num ("," num)? "]"\nnum ::= [0-9] | [1-9] [0-9]'


def greedy(spec, max_tokens: int = 120, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=spec, **kwargs)


def check_valid(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES
    else:
        assert re.fullmatch(r"\[(0|[1-9][0-9]?)(,(0|[1-9][0-9]?))?\]", text), text


SPECS = {
    "json": StructuredOutputSpec.json_schema(SCHEMA, any_whitespace=False),
    "json_object": {"json_object": True, "disable_any_whitespace": True},
    "regex": {"regex": REGEX},
    "choice": StructuredOutputSpec.choice(CHOICES),
    "grammar": {"grammar": GRAMMAR},
}


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), kv_cache_memory_bytes="32MiB", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def close_brace(llm) -> int:
    """The token of "}": biased up so that any-JSON-object output closes at once instead of rambling."""
    return llm.get_tokenizer().convert_tokens_to_ids("}")


@pytest.mark.parametrize("kind", list(SPECS))
def test_each_kind_of_constraint_gives_valid_output_that_stops(llm, close_brace, kind):
    extra = {"logit_bias": {close_brace: 20.0}} if kind == "json_object" else {}
    outs = llm.generate(PROMPTS, greedy(SPECS[kind], **extra))
    for out in outs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion
        assert completion.token_ids[-1] == llm.engine.eos_token_id
        check_valid(kind, completion.text)
    assert_idle(llm.engine)


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(llm):
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS, free)
    mixed = llm.generate(PROMPTS * 2, [free] * 3 + [greedy(SPECS[k]) for k in ("json", "regex", "choice")])
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]
    for out, kind in zip(mixed[3:], ("json", "regex", "choice")):
        check_valid(kind, out.outputs[0].text)


def test_parallel_samples_each_follow_their_grammar(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=60, structured_outputs={"regex": REGEX})
    out = llm.generate(PROMPTS[0], params)[0]
    assert sorted(c.index for c in out.outputs) == [0, 1, 2, 3]
    for completion in out.outputs:
        assert completion.finish_reason == "stop"
        check_valid("regex", completion.text)
    assert len({c.text for c in out.outputs}) > 1, "the samples should differ"


def test_preempted_sequences_resume_their_grammar(llama_dir, llm):
    small = LLM(str(llama_dir), block_size=4, kv_cache_memory_bytes=12 * 4 * block_bytes(llm.engine) // 16,
                max_model_len=64)
    params = greedy({"regex": "[a-z]{20,30}"}, max_tokens=34)   # 30 tokens at most, then EOS
    outs = small.generate(PROMPTS + ["A"], params)
    assert small.engine.stats()["num_preemptions"] > 0
    expected = llm.generate(PROMPTS + ["A"], params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    for out in outs:
        assert re.fullmatch("[a-z]{20,30}", out.outputs[0].text) and out.outputs[0].finish_reason == "stop"
    assert_idle(small.engine)


def test_a_step_failing_after_sampling_is_rerun_with_consistent_grammars(llm, monkeypatch):
    """The matchers had taken the failed step's tokens; the scheduler resends the sequences, and each gets a
    fresh matcher replaying only the tokens it committed."""
    params = [greedy(SPECS[k]) for k in ("json", "regex", "grammar")]
    expected = llm.generate(PROMPTS, params)
    runner = llm.engine.runner
    real = runner._sample
    calls = []

    def failing(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("after sampling")

    monkeypatch.setattr(runner, "_sample", failing)
    outs = llm.generate(PROMPTS, params)
    assert len(calls) > 4 and all(o.error is None for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert_idle(llm.engine)


def test_max_tokens_cuts_the_output_early(llm):
    out = llm.generate(PROMPTS[0], greedy({"regex": "[a-z]{30}"}, max_tokens=4))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert re.fullmatch("[a-z]+", out.text)


def test_min_tokens_holds_back_eos_only_while_the_grammar_allows_more(llm):
    eos = llm.engine.eos_token_id
    # EOS strongly favoured: held back for 10 tokens while letters are allowed, then taken at once
    out = llm.generate(PROMPTS[0], greedy({"regex": "[a-z]{2,200}"}, min_tokens=10, logit_bias={eos: 50.0}))[0]
    out = out.outputs[0]
    assert len(out.token_ids) == 11 and out.finish_reason == "stop" and re.fullmatch("[a-z]+", out.text)
    # a choice ends after a token or three: the grammar's end wins over min_tokens
    out = llm.generate(PROMPTS[0], greedy(SPECS["choice"], min_tokens=20))[0].outputs[0]
    assert out.text in CHOICES and out.finish_reason == "stop" and len(out.token_ids) < 20


def test_logprobs_and_prompt_logprobs_of_constrained_requests(llm):
    out = llm.generate(PROMPTS[0], greedy(SPECS["choice"], logprobs=2, prompt_logprobs=1))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids)
    for token, position in zip(completion.token_ids, completion.logprobs):
        assert token in position and position[token].logprob <= 0.0
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)


@pytest.mark.parametrize("spec, fragment", [
    ({"regex": "(a|b"}, "regex cannot be compiled"),
    ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"grammar": "root ::= item"}, "grammar cannot be compiled"),
])
def test_a_constraint_that_does_not_compile_is_refused(llm, spec, fragment):
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        llm.generate(PROMPTS[0], greedy(spec))
    assert info.value.param == "structured_outputs"
    assert_idle(llm.engine)


def test_disable_any_whitespace_in_the_engine_config(llama_dir):
    compact = LLM(str(llama_dir), kv_cache_memory_bytes="16MiB", max_model_len=MAX_MODEL_LEN,
                  structured_outputs_config={"backend": "guidance", "disable_any_whitespace": True})
    outs = compact.generate(PROMPTS, greedy(StructuredOutputSpec.json_schema(SCHEMA)))
    for out in outs:
        text = out.outputs[0].text
        jsonschema.validate(json.loads(text), SCHEMA)
        assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
