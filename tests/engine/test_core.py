"""The engine core's prefix-cache keys of a request: besides its tokens, its cache salt, KV variant and adapter,
each part tagged and length-prefixed, so that no client-chosen salt spells another request's keys."""

from __future__ import annotations

from llmserve.engine.core import extra_hash_keys
from llmserve.engine.messages import EngineCoreRequest
from llmserve.lora.request import LoRARequest
from llmserve.sampling_params import SamplingParams


def _request(**fields) -> EngineCoreRequest:
    return EngineCoreRequest("r", [1, 2, 3], SamplingParams(), 4, None, 0.0, **fields)


def test_a_request_without_salt_variant_or_adapter_adds_nothing():
    assert extra_hash_keys(_request()) == b""


def test_a_salt_spelling_an_adapters_key_is_still_a_salt():
    """A base-model request whose salt is the bytes an adapter's request would be keyed by (its key once
    length-prefixed behind an empty salt, as this was built before) must not share that adapter's blocks."""
    adapter = LoRARequest("a", 1, "/adapters/a")
    keyed = extra_hash_keys(_request(lora_request=adapter))
    for salt in (adapter.hash_key().decode(), "0:" + adapter.hash_key().decode(), keyed.decode()):
        assert extra_hash_keys(_request(cache_salt=salt)) != keyed


def test_every_part_changes_the_keys():
    keys = {extra_hash_keys(_request(**fields)) for fields in (
        {}, {"cache_salt": "t1"}, {"cache_salt": "t2"}, {"kv_variant": "longrope:long"},
        {"cache_salt": "longrope:long"}, {"lora_request": LoRARequest("a", 1, "/adapters/a")},
        {"lora_request": LoRARequest("a", 1, "/adapters/b")}, {"lora_request": LoRARequest("a", 2, "/adapters/a")},
        {"cache_salt": "t1", "lora_request": LoRARequest("a", 1, "/adapters/a")})}
    assert len(keys) == 9
