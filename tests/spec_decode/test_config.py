"""``--speculative-config`` as vLLM takes it, the older ``--speculative-model [ngram]`` /
``--num-speculative-tokens``, the same through ``LLM(speculative_config=...)``; ``suffix`` with vLLM's
``suffix_decoding_*`` keys; ``draft_model`` with its ``model`` (also vLLM's shorthand: a model without a
method, and ``--speculative-model PATH``); methods not built are refused naming what is."""

from __future__ import annotations

import argparse

import pytest

from llmserve.config import EngineConfig
from llmserve.entrypoints.cli_args import add_engine_args, engine_config_from_args
from llmserve.spec_decode.config import SpeculativeConfig


def from_cli(*argv: str) -> EngineConfig:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_config_from_args(parser.parse_args(list(argv)))


def test_json_flag_and_dict_give_the_same_config():
    text = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
    expected = SpeculativeConfig("ngram", 3, prompt_lookup_min=2, prompt_lookup_max=4)
    assert from_cli("--speculative-config", text).speculative_config == expected
    assert EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                            "prompt_lookup_min": 2, "prompt_lookup_max": 4}).speculative_config == expected


def test_lookup_bounds_default_as_vllm_does():
    assert EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2}).speculative_config == \
        SpeculativeConfig("ngram", 2, 5, 5)
    one = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    assert (one.speculative_config.prompt_lookup_min, one.speculative_config.prompt_lookup_max) == (3, 3)


def test_legacy_flags_mean_ngram():
    config = from_cli("--speculative-model", "[ngram]", "--num-speculative-tokens", "4").speculative_config
    assert config == SpeculativeConfig("ngram", 4, 5, 5)
    assert EngineConfig(speculative_config='{"model": "[ngram]", "num_speculative_tokens": 2}').speculative_config \
        == SpeculativeConfig("ngram", 2, 5, 5)
    mixed = from_cli("--speculative-config", '{"method": "ngram", "prompt_lookup_max": 2}',
                     "--num-speculative-tokens", "3")
    assert mixed.speculative_config == SpeculativeConfig("ngram", 3, 2, 2)


def test_draft_model_in_every_spelling():
    expected = SpeculativeConfig("draft_model", 3, model="/models/draft", draft_tensor_parallel_size=1)   # the target's
    assert from_cli("--speculative-config", '{"method": "draft_model", "model": "/models/draft", '
                    '"num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}').speculative_config == expected
    assert EngineConfig(speculative_config={"model": "/models/draft", "num_speculative_tokens": 3}) \
        .speculative_config == expected   # vLLM: a model without a method is a draft model
    assert from_cli("--speculative-model", "/models/draft", "--num-speculative-tokens", "3").speculative_config \
        == expected
    adaptive = from_cli("--speculative-config", '{"model": "/models/draft", "num_speculative_tokens": 3, '
                        '"adaptive": true}').speculative_config
    assert adaptive.adaptive and not expected.adaptive   # off unless asked for


def test_off_by_default():
    assert from_cli().speculative_config is None
    assert EngineConfig().speculative_config is None


@pytest.mark.parametrize("kwargs, message", [
    ({"speculative_config": {"method": "eagle", "num_speculative_tokens": 2}}, "'eagle' is vLLM's but not built"),
    ({"speculative_config": {"method": "draft_model", "num_speculative_tokens": 2}}, "draft_model needs a model"),
    ({"speculative_config": {"method": "suffix", "model": "/models/draft"}}, "is a draft model: the method must be draft_model"),
    ({"speculative_config": {"model": "/models/draft", "num_speculative_tokens": 2,
                             "draft_tensor_parallel_size": 2}}, "draft_tensor_parallel_size 2 with the target on 1"),
    ({"speculative_config": {"model": "/models/draft", "num_speculative_tokens": 2,
                             "draft_tensor_parallel_size": 0}}, "draft_tensor_parallel_size must be an integer >= 1"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}},
     "draft_tensor_parallel_size is for method draft_model"),
    ({"speculative_model": "/models/draft", "num_speculative_tokens": 2, "pipeline_parallel_size": 2,
      "distributed_executor_backend": "mp"}, "a draft model runs with pipeline parallel size 1"),
    ({"speculative_config": {"method": "ngram"}}, "needs num_speculative_tokens"),
    ({"num_speculative_tokens": 2}, "needs a method"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 0}}, "num_speculative_tokens must be"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                             "prompt_lookup_max": 2}}, "prompt_lookup_min (4) is above"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "quantization": "fp8"}},
     "'quantization' is vLLM's but not supported"),
    ({"speculative_config": "ngram"}, "must be a JSON object"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}},
     "adaptive must be true or false"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}, "num_speculative_tokens": 3},
     "give it once"),
])
def test_refused_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match="supported|built|needs|must|above|once") as info:
        EngineConfig(**kwargs)
    assert message in str(info.value)


def test_suffix_method_takes_vllms_suffix_keys():
    config = EngineConfig(speculative_config={"method": "suffix", "suffix_decoding_max_tree_depth": 16,
                                              "suffix_decoding_min_token_prob": 0.2}).speculative_config
    assert (config.method, config.num_speculative_tokens, config.suffix_decoding_max_tree_depth) == ("suffix", 16, 16)
    assert config.suffix_decoding_min_token_prob == 0.2 and config.suffix_decoding_max_cached_requests == 64
    for bad, message in [({"method": "ngram", "num_speculative_tokens": 2, "suffix_decoding_max_tree_depth": 8},
                          "are for method suffix"),
                         ({"method": "suffix", "prompt_lookup_max": 3}, "are for method ngram"),
                         ({"method": "suffix", "suffix_decoding_min_token_prob": 2}, "must be in [0, 1]"),
                         ({"method": "suffix", "suffix_decoding_max_tree_depth": 1}, "must be an integer >= 2"),
                         # the key at fault named, not num_speculative_tokens (which the depth sets)
                         ({"method": "suffix", "suffix_decoding_max_tree_depth": 0},
                          "suffix_decoding_max_tree_depth must be an integer >= 2"),
                         ({"method": "suffix", "suffix_decoding_max_tree_depth": "8"},
                          "suffix_decoding_max_tree_depth must be an integer >= 2"),
                         # JSON text may hold Infinity and NaN: the proposer would die on them mid-run
                         ({"method": "suffix", "suffix_decoding_max_spec_factor": float("inf")}, "a finite number"),
                         ({"method": "suffix", "suffix_decoding_max_spec_factor": float("nan")}, "a finite number"),
                         ({"method": "suffix", "suffix_decoding_max_spec_factor": True}, "a finite number"),
                         ({"method": "suffix", "suffix_decoding_max_cached_requests": True}, "integer >= 0"),
                         ({"method": "suffix", "suffix_decoding_min_token_prob": True}, "must be in [0, 1]"),
                         ({"method": "draft_model", "model": "/models/draft", "num_speculative_tokens": 2,
                           "prompt_lookup_max": 3}, "are for method ngram, not 'draft_model'")]:
        with pytest.raises(ValueError) as info:
            EngineConfig(speculative_config=bad)
        assert message in str(info.value)
