import copy

import pytest

from llmserve.engine.messages import EngineCoreRequest, decode, encode
from llmserve.sampling_params import SamplingParams, SamplingParamsError
from llmserve.structured_output import StructuredOutputError, StructuredOutputSpec


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert SamplingParams(seed=-1).seed is None   # vLLM's "no seed"


def test_keyword_only():
    with pytest.raises(TypeError):
        SamplingParams(2)  # type: ignore[misc]


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("n", 0, "at least 1"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("presence_penalty", -2.01, "[-2, 2]"),
        ("frequency_penalty", 3, "[-2, 2]"),
        ("repetition_penalty", 0.0, "greater than zero"),
        ("temperature", -1.0, "non-negative"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, "at least 1"),
        ("min_p", 1.1, "[0, 1]"),
        ("min_p", -0.1, "[0, 1]"),
        ("max_tokens", -1, "at least 0"),
        ("min_tokens", -1, "greater than or equal to 0"),
        ("logprobs", -1, "non-negative"),
        ("prompt_logprobs", -1, "non-negative"),
        ("logit_bias", {5: 101.0}, "[-100, 100]"),
        ("logit_bias", {"abc": 1.0}, "token ids"),
        ("logit_bias", {-1: 1.0}, "non-negative"),
        ("stop", ["ok", ""], "empty string"),
        ("stop", [1], "strings"),
        ("stop_token_ids", [-3], "non-negative"),
        ("stop_token_ids", 7, "list"),
        # type errors
        ("temperature", "hot", "number"),
        ("temperature", float("nan"), "finite"),
        ("top_p", None, "number"),
        ("n", 1.5, "integer"),
        ("n", True, "integer"),
        ("top_k", 2.0, "integer"),
        ("max_tokens", "16", "integer"),
        ("seed", False, "integer"),
        ("logprobs", True, "integer"),
        ("ignore_eos", 1, "boolean"),
        ("skip_special_tokens", "yes", "boolean"),
        ("stop_token_ids", [1.0], "integer"),
        # integers cross processes as msgpack: 64 bits
        ("seed", 2**63, "64-bit"),
        ("top_k", -(2**63) - 1, "64-bit"),
    ],
)
def test_invalid_field(field, value, fragment):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert field in str(info.value)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_max_tokens_zero_asks_for_the_prompt_alone():
    """Nothing is generated: the prompt is computed (for its prompt_logprobs); min_tokens cannot exceed it."""
    assert SamplingParams(max_tokens=0, prompt_logprobs=1).max_tokens == 0
    with pytest.raises(SamplingParamsError, match="min_tokens"):
        SamplingParams(max_tokens=0, min_tokens=1)


def test_min_tokens_above_max_tokens():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(min_tokens=10, max_tokens=5)
    assert info.value.param == "min_tokens"
    assert "max_tokens=5" in str(info.value)
    assert SamplingParams(min_tokens=10, max_tokens=None).min_tokens == 10


def test_normalisation():
    p = SamplingParams(
        stop="###", stop_token_ids=(3, 4), logit_bias={"12": 5, 7: -1.5},
        temperature=1, top_k=-1,
    )
    assert p.stop == ["###"]
    assert p.stop_token_ids == [3, 4]
    assert p.logit_bias == {12: 5.0, 7: -1.5}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert type(p.temperature) is float
    assert p.top_k == 0


def test_stop_list_is_copied():
    stop = ["a"]
    p = SamplingParams(stop=stop)
    stop.append("b")
    assert p.stop == ["a"]


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    assert not SamplingParams().is_greedy


def test_verify():
    p = SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[5], logprobs=5, prompt_logprobs=3)
    p.verify(vocab_size=100, max_logprobs=5)
    cases = [
        (SamplingParams(logit_bias={100: 1.0}), "logit_bias"),
        (SamplingParams(stop_token_ids=[100]), "stop_token_ids"),
        (SamplingParams(logprobs=6), "logprobs"),
        (SamplingParams(prompt_logprobs=6), "prompt_logprobs"),
    ]
    for params, field in cases:
        with pytest.raises(SamplingParamsError) as info:
            params.verify(vocab_size=100, max_logprobs=5)
        assert info.value.param == field and field in str(info.value)
    with pytest.raises(SamplingParamsError, match="at most 10"):
        SamplingParams(logprobs=20).verify(vocab_size=10, max_logprobs=50)


def test_clone_is_deep():
    p = SamplingParams(stop=["x"], logit_bias={1: 2.0}, seed=3)
    q = p.clone()
    assert q == p
    q.stop.append("y")
    q.logit_bias[2] = 1.0
    assert p.stop == ["x"] and p.logit_bias == {1: 2.0}


# ------------------------------------------------------------------ structured outputs


def test_structured_outputs_take_a_spec_or_a_dict_in_vllms_shape():
    spec = StructuredOutputSpec.regex("[a-z]+")
    assert SamplingParams().structured_outputs is None
    assert SamplingParams(structured_outputs=spec).structured_outputs is spec
    assert SamplingParams(structured_outputs={"regex": "[a-z]+"}).structured_outputs == spec
    compact = SamplingParams(structured_outputs={"json": {"type": "object"}, "disable_any_whitespace": True})
    assert compact.structured_outputs == StructuredOutputSpec.json_schema({"type": "object"}, any_whitespace=False)


@pytest.mark.parametrize("value, param, fragment", [
    ("[a-z]+", "structured_outputs", "StructuredOutputSpec or a dict"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs", "exactly one of"),
    ({"choice": []}, "structured_outputs.choice", "at least one option"),
    ({"regex": "a", "whitespace_pattern": " "}, "structured_outputs.whitespace_pattern", "not supported"),
])
def test_bad_structured_outputs_name_the_field(value, param, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        SamplingParams(structured_outputs=value)
    assert info.value.param == param


def test_ignore_eos_cannot_be_combined_with_structured_outputs():
    """Past its end a grammar allows only EOS: there is nothing to keep generating."""
    with pytest.raises(SamplingParamsError, match="ignore_eos") as info:
        SamplingParams(structured_outputs={"choice": ["a"]}, ignore_eos=True)
    assert info.value.param == "ignore_eos"


def test_structured_outputs_cross_processes_and_clone_unchanged():
    params = SamplingParams(structured_outputs=StructuredOutputSpec.json_schema({"type": "object"}), max_tokens=5)
    request = EngineCoreRequest("r", [1, 2], params, 5, 2, 0.0)
    assert decode(encode(request), EngineCoreRequest) == request
    assert params.clone() == params and copy.deepcopy(params).structured_outputs == params.structured_outputs
    assert issubclass(StructuredOutputError, ValueError)
