"""Per-request sampling parameters, validated once at request construction.

The fields and their meaning follow vLLM's ``SamplingParams`` so that the
OpenAI-compatible front end can map request fields one to one. Everything that
can be checked without knowing the model is checked in ``__post_init__``; the
model-dependent limits (vocabulary size, maximum number of logprobs) are
checked by :meth:`SamplingParams.verify`, which the engine calls at admission,
and so is whether the grammar library compiles a structured-output constraint.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from llmserve.errors import InvalidRequestError
from llmserve.structured_output.spec import StructuredOutputSpec

# Temperatures below this are treated as greedy: dividing logits by such a
# value overflows float32 and the distribution is an argmax anyway.
SAMPLING_EPS = 1e-5

_LOGIT_BIAS_LIMIT = 100.0

# Every integer crosses process boundaries as msgpack: it must fit in 64 bits.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class SamplingParamsError(InvalidRequestError):
    """Invalid sampling parameter; ``param`` names the offending field.

    The API server uses ``param`` to fill the ``param`` field of an
    OpenAI-style error response.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param)


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass, but `n=True` is a client bug, not a count.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingParamsError(
            name, f"{name} must be an integer, got {type(value).__name__} {value!r}."
        )
    if not INT64_MIN <= value <= INT64_MAX:
        raise SamplingParamsError(name, f"{name} must fit in a signed 64-bit integer, got {value}.")
    return int(value)


def _check_optional_int(name: str, value: object) -> int | None:
    return None if value is None else _check_int(name, value)


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsError(
            name, f"{name} must be a number, got {type(value).__name__} {value!r}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise SamplingParamsError(name, f"{name} must be finite, got {value}.")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsError(
            name, f"{name} must be a boolean, got {type(value).__name__} {value!r}."
        )
    return value


def truncation_problem(value: object) -> str | None:
    """What is wrong with a ``truncate_prompt_tokens`` (vLLM's): None keeps the prompt, -1 keeps its last
    --max-model-len tokens, k >= 1 its last k."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1):
        return f"truncate_prompt_tokens must be -1 or at least 1, got {value!r}."
    return None


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample the completion(s) of one request.

    ``top_k`` of 0 or -1 disables top-k (-1 is normalised to 0). ``stop`` and
    ``stop_token_ids`` are normalised to lists, and ``logit_bias`` keys to
    ``int`` (JSON object keys arrive as strings).

    ``structured_outputs`` constrains the output to a JSON schema, a regex, a
    choice or a grammar: a :class:`StructuredOutputSpec`, or a dict in the shape
    of vLLM's ``StructuredOutputsParams`` (``{"json": schema}``, ``{"regex": ...}``,
    ``{"choice": [...]}``, ``{"grammar": ...}``), converted to one.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputSpec | None = None
    truncate_prompt_tokens: int | None = None   # keep the prompt's last k tokens (-1: --max-model-len)

    def __post_init__(self) -> None:
        self._normalise_types()
        self._check_ranges()

    def _normalise_types(self) -> None:
        self.n = _check_int("n", self.n)
        for name in (
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "temperature",
            "top_p",
            "min_p",
        ):
            setattr(self, name, _check_float(name, getattr(self, name)))
        self.top_k = _check_int("top_k", self.top_k)
        self.seed = _check_optional_int("seed", self.seed)
        if self.seed == -1:
            self.seed = None   # vLLM's "no seed"
        self.max_tokens = _check_optional_int("max_tokens", self.max_tokens)
        self.min_tokens = _check_int("min_tokens", self.min_tokens)
        self.logprobs = _check_optional_int("logprobs", self.logprobs)
        self.prompt_logprobs = _check_optional_int("prompt_logprobs", self.prompt_logprobs)
        for name in (
            "ignore_eos",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            _check_bool(name, getattr(self, name))
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        self.logit_bias = self._normalise_logit_bias(self.logit_bias)
        self.structured_outputs = self._normalise_structured_outputs(self.structured_outputs)

    @staticmethod
    def _normalise_structured_outputs(value: object) -> StructuredOutputSpec | None:
        if value is None or isinstance(value, StructuredOutputSpec):
            return value
        if isinstance(value, Mapping):
            return StructuredOutputSpec.from_structured_outputs(value)   # its errors name the key
        raise SamplingParamsError(
            "structured_outputs",
            "structured_outputs must be a StructuredOutputSpec or a dict such as {\"json\": schema}, "
            f"got {type(value).__name__}.",
        )

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise SamplingParamsError(
                "stop", f"stop must be a string or a list of strings, got {stop!r}."
            )
        if any(not s for s in stop):
            raise SamplingParamsError("stop", "stop cannot contain an empty string.")
        return list(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise SamplingParamsError(
                "stop_token_ids",
                f"stop_token_ids must be a list of integers, got {type(ids).__name__}.",
            )
        out = [_check_int("stop_token_ids", i) for i in ids]
        if any(i < 0 for i in out):
            raise SamplingParamsError(
                "stop_token_ids", f"stop_token_ids must be non-negative, got {out}."
            )
        return out

    @staticmethod
    def _normalise_logit_bias(bias: object) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise SamplingParamsError(
                "logit_bias",
                f"logit_bias must map token ids to numbers, got {type(bias).__name__}.",
            )
        out: dict[int, float] = {}
        for key, value in bias.items():
            if isinstance(key, str):
                try:
                    token_id = int(key)
                except ValueError:
                    raise SamplingParamsError(
                        "logit_bias", f"logit_bias keys must be token ids, got {key!r}."
                    ) from None
            else:
                token_id = _check_int("logit_bias", key)
            if token_id < 0:
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias token ids must be non-negative, got {token_id}."
                )
            value = _check_float("logit_bias", value)
            if not -_LOGIT_BIAS_LIMIT <= value <= _LOGIT_BIAS_LIMIT:
                raise SamplingParamsError(
                    "logit_bias",
                    f"logit_bias values must be in [-100, 100], got {value} for token {token_id}.",
                )
            out[token_id] = value
        return out

    def _check_ranges(self) -> None:
        def fail(param: str, message: str) -> None:
            raise SamplingParamsError(param, message)

        if self.n < 1:
            fail("n", f"n must be at least 1, got {self.n}.")
        problem = truncation_problem(self.truncate_prompt_tokens)
        if problem is not None:
            fail("truncate_prompt_tokens", problem)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                fail(name, f"{name} must be in [-2, 2], got {value}.")
        if self.repetition_penalty <= 0.0:
            fail(
                "repetition_penalty",
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.",
            )
        if self.temperature < 0.0:
            fail("temperature", f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            fail("top_k", f"top_k must be -1 or 0 (disable), or at least 1, got {self.top_k}.")
        if self.top_k == -1:
            self.top_k = 0
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        # 0 generates nothing: the prompt alone is computed (scoring it with prompt_logprobs).
        if self.max_tokens is not None and self.max_tokens < 0:
            fail("max_tokens", f"max_tokens must be at least 0, got {self.max_tokens}.")
        if self.min_tokens < 0:
            fail(
                "min_tokens",
                f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.",
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(
                "min_tokens",
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}.",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                fail(name, f"{name} must be non-negative, got {value}.")
        if self.structured_outputs is not None and self.ignore_eos:
            # Past its end a grammar allows nothing but EOS: there is no output to keep generating.
            fail("ignore_eos", "ignore_eos cannot be combined with structured outputs: the grammar decides "
                               "where the output ends.")

    def verify(self, vocab_size: int, max_logprobs: int) -> None:
        """Check the model-dependent limits; the engine calls this at admission.

        Out-of-range token ids would index past the logits row (a device-side
        assert on CUDA), so they must be rejected before a request is batched.
        """
        for token_id in self.logit_bias or ():
            if token_id >= vocab_size:
                raise SamplingParamsError(
                    "logit_bias",
                    f"logit_bias token id must be in [0, {vocab_size}), got {token_id}.",
                )
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise SamplingParamsError(
                    "stop_token_ids",
                    f"stop_token_ids must be in [0, {vocab_size}), got {token_id}.",
                )
        limit = min(max_logprobs, vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > limit:
                raise SamplingParamsError(
                    name, f"{name} must be at most {limit}, got {value}."
                )

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (the sampler skips the random path)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def clone(self) -> SamplingParams:
        """Deep copy, so per-sample edits (e.g. of ``n > 1`` fan-out) don't alias lists."""
        return copy.deepcopy(self)
