"""``--speculative-config``, vLLM's flag, and the older ``--speculative-model`` / ``--num-speculative-tokens``.

Three proposers are built: ``ngram`` (prompt lookup) and ``suffix`` (suffix decoding over the request and
recent requests), which run in the engine core, and ``draft_model`` (a smaller model sharing the target's
tokenizer), which runs in the worker beside the target. As in vLLM, a ``model`` given without a method means a
draft model (``[ngram]`` excepted, the older spelling of prompt lookup). A method vLLM has but llmserve does
not (EAGLE, MTP, ...) is refused at start-up naming what is supported, never run as something else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

METHODS = ("ngram", "suffix", "draft_model")
# vLLM's methods that llmserve does not build yet, named in the error rather than called unknown.
_VLLM_METHODS = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp")
# vLLM's keys that only matter to methods not built here.
_VLLM_ONLY = ("quantization", "max_model_len", "revision",
              "code_revision", "disable_by_batch_size", "disable_padded_drafter_batch", "speculative_token_tree")
_SUFFIX_KEYS = ("suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests",
                "suffix_decoding_max_spec_factor", "suffix_decoding_min_token_prob")
_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
         "draft_tensor_parallel_size", "adaptive", *_SUFFIX_KEYS)
_NGRAM_MODEL_NAMES = ("[ngram]", "ngram")
# vLLM's default n-gram size when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5



def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    """An int or float that is not a bool, NaN or infinite (JSON text may hold Infinity and NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_suffix_depth(value: object) -> None:
    if not _is_int(value) or value < 2:
        raise ValueError(f"--speculative-config: suffix_decoding_max_tree_depth must be an integer >= 2, got {value!r}")

@dataclass(frozen=True)
class SpeculativeConfig:
    """How many tokens a proposer drafts per step (``num_speculative_tokens``); for ``ngram``, the n-gram
    sizes it looks up (``prompt_lookup_min`` to ``prompt_lookup_max``, longest first); for ``suffix``, vLLM's
    ``suffix_decoding_*`` settings (:mod:`llmserve.spec_decode.suffix_proposer`). vLLM keeps up to 10000
    requests in the global tree (in C++); this tree is Python objects, so its default keeps 64. For
    ``draft_model``, the draft checkpoint (``model``) and its tensor-parallel size: the target's (the default, as
    vLLM's), so each rank holds its share of the draft's heads and weights beside its share of the target's,
    and the draft's K/V heads split over the ranks as the target's do, in the same pool. ``adaptive`` (llmserve's, off by default): the drafts each sequence checks
    per step are chosen from its measured acceptance and a step-cost model measured at start-up, down to none
    (:mod:`llmserve.spec_decode.adaptive`)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 64
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    model: str | None = None
    draft_tensor_parallel_size: int | None = None   # None: the target's (see for_target)
    adaptive: bool = False

    @property
    def num_lookahead_slots(self) -> int:
        """Slots after a step's tokens whose K/V the proposer writes, reserved with the step: a draft model's ``k``
        drafting forwards (the new token and ``k - 1`` drafts); the other methods write nothing ahead."""
        return self.num_speculative_tokens if self.method == "draft_model" else 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            kind = "is vLLM's but not built in llmserve" if self.method in _VLLM_METHODS else "is not known"
            raise ValueError(f"--speculative-config: method {self.method!r} {kind}; supported: "
                             f"{', '.join(METHODS)}")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("--speculative-config: method draft_model needs a model (the draft checkpoint)"
                             if self.model is None else
                             f"--speculative-config: model {self.model!r} is for method draft_model, not "
                             f"{self.method!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"--speculative-config: adaptive must be true or false, got {self.adaptive!r}")
        if self.draft_tensor_parallel_size is not None:
            if self.method != "draft_model":
                raise ValueError(f"--speculative-config: draft_tensor_parallel_size is for method draft_model, not "
                                 f"supported with {self.method!r}")
            value = self.draft_tensor_parallel_size
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--speculative-config: draft_tensor_parallel_size must be an integer >= 1, got "
                                 f"{value!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--speculative-config: {name} must be an integer >= 1, got {value!r}")
        _check_suffix_depth(self.suffix_decoding_max_tree_depth)
        if not _is_int(self.suffix_decoding_max_cached_requests) or self.suffix_decoding_max_cached_requests < 0:
            raise ValueError(f"--speculative-config: suffix_decoding_max_cached_requests must be an integer >= 0, "
                             f"got {self.suffix_decoding_max_cached_requests!r}")
        if not _is_finite_number(self.suffix_decoding_max_spec_factor) or self.suffix_decoding_max_spec_factor <= 0:
            raise ValueError(f"--speculative-config: suffix_decoding_max_spec_factor must be a finite number > 0, "
                             f"got {self.suffix_decoding_max_spec_factor!r}")
        if not _is_finite_number(self.suffix_decoding_min_token_prob) or not \
                0 <= self.suffix_decoding_min_token_prob <= 1:
            raise ValueError(f"--speculative-config: suffix_decoding_min_token_prob must be in [0, 1], got "
                             f"{self.suffix_decoding_min_token_prob!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"--speculative-config: prompt_lookup_min ({self.prompt_lookup_min}) is above "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")

    def for_target(self, tensor_parallel_size: int, pipeline_parallel_size: int) -> SpeculativeConfig:
        """This config for a target on ``tensor_parallel_size x pipeline_parallel_size`` ranks: a draft model is
        sharded like the target (``draft_tensor_parallel_size`` left out means the target's size). vLLM also runs
        a draft whole on one rank (size 1 under a larger target) and llmserve does not, so that is refused, as is
        a draft under pipeline parallelism (its layers would have to be split into the target's stages)."""
        if self.method != "draft_model":
            return self
        if pipeline_parallel_size > 1:
            raise ValueError(f"--speculative-config: a draft model runs with pipeline parallel size 1, got "
                             f"{pipeline_parallel_size} (tensor parallelism is supported)")
        size = self.draft_tensor_parallel_size
        if size is not None and size != tensor_parallel_size:
            raise ValueError(f"--speculative-config: draft_tensor_parallel_size {size} with the target on "
                             f"{tensor_parallel_size} tensor-parallel rank(s): the draft is sharded like the target, "
                             f"so it must be {tensor_parallel_size} (or left out)")
        return replace(self, draft_tensor_parallel_size=tensor_parallel_size)

    @classmethod
    def resolve(cls, value: SpeculativeConfig | Mapping[str, Any] | str | None, speculative_model: str | None,
                num_speculative_tokens: int | None) -> SpeculativeConfig | None:
        """The JSON flag (or a dict, for ``LLM(speculative_config=...)``) merged with the legacy flags; None
        when speculation is off. ``speculative_model`` (or the JSON's ``model``) ``[ngram]`` or ``ngram``
        means the n-gram proposer, as in older vLLM; any other model is a draft model."""
        if isinstance(value, cls):
            if speculative_model is not None or num_speculative_tokens is not None:
                raise ValueError("give speculation either as --speculative-config or as --speculative-model / "
                                 "--num-speculative-tokens, not both")
            return value
        from llmserve.config import _json_object_flag   # config imports this module

        fields = _json_object_flag("--speculative-config", value,
                                   '{"method": "ngram", "num_speculative_tokens": 4}', _KEYS, _VLLM_ONLY)
        model = fields.pop("model", None)
        if model is not None and speculative_model is not None:
            raise ValueError("--speculative-model is also given as --speculative-config's model; give it once")
        speculative_model = speculative_model if model is None else model
        if speculative_model in _NGRAM_MODEL_NAMES:
            if fields.get("method", "ngram") != "ngram":
                raise ValueError(f"--speculative-model {speculative_model!r} means n-gram lookup, but the "
                                 f"method is {fields['method']!r}")
            fields["method"] = "ngram"
        elif speculative_model is not None:
            if fields.get("method", "draft_model") != "draft_model":
                raise ValueError(f"speculative model {speculative_model!r} is a draft model: the method must be "
                                 f"draft_model, got {fields['method']!r}")
            fields["method"], fields["model"] = "draft_model", speculative_model
        if num_speculative_tokens is not None:
            if "num_speculative_tokens" in fields:
                raise ValueError("--num-speculative-tokens is also in --speculative-config; give it once")
            fields["num_speculative_tokens"] = num_speculative_tokens
        if not fields:
            return None
        if "method" not in fields:
            raise ValueError("--speculative-config needs a method (supported: ngram, suffix, draft_model), or "
                             "--speculative-model (a draft model, or [ngram])")
        if fields["method"] != "suffix" and any(key in fields for key in _SUFFIX_KEYS):
            raise ValueError(f"--speculative-config: the suffix_decoding_* keys are for method suffix, not "
                             f"{fields['method']!r}")
        if fields["method"] != "ngram" and ("prompt_lookup_min" in fields or "prompt_lookup_max" in fields):
            raise ValueError(f"--speculative-config: prompt_lookup_min / prompt_lookup_max are for method ngram, not "
                             f"{fields['method']!r}")
        if fields["method"] == "suffix":   # vLLM: the tree depth bounds the drafts unless told otherwise
            if "suffix_decoding_max_tree_depth" in fields:
                _check_suffix_depth(fields["suffix_decoding_max_tree_depth"])   # named before it is copied
            fields.setdefault("num_speculative_tokens", fields.get("suffix_decoding_max_tree_depth",
                                                                        cls.suffix_decoding_max_tree_depth))
        if "num_speculative_tokens" not in fields:
            raise ValueError("speculative decoding needs num_speculative_tokens (in --speculative-config or as "
                             "--num-speculative-tokens)")
        low, high = fields.pop("prompt_lookup_min", None), fields.pop("prompt_lookup_max", None)
        low = high if low is None else low
        high = low if high is None else high
        if low is None:
            low = high = DEFAULT_PROMPT_LOOKUP
        return cls(prompt_lookup_min=low, prompt_lookup_max=high, **fields)
