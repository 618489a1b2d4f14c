"""What a request asks its output to match: a JSON schema, any JSON object, a regex, one of a list of
strings, or a grammar.

:class:`StructuredOutputSpec` is plain data (a frozen msgspec struct of strings), so it can be a field
of ``SamplingParams``, cross process boundaries as msgpack, and key the compile cache (equal specs hash
equal). Its constructor checks what can be checked without the grammar library (the schema is JSON, the
choice list is not empty, ...); :meth:`StructuredOutputSpec.validate` asks the library whether it
compiles. The two ``from_*`` constructors map the request fields of the OpenAI API (``response_format``)
and of vLLM (``structured_outputs``) onto a spec, refusing whatever they cannot honour.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import msgspec

from llmserve.errors import InvalidRequestError

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = get_args(Kind)

# vLLM's structured_outputs keys that each name a constraint; a request sets exactly one of them.
_CONSTRAINT_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# vLLM's option keys and whether we honour them: refusing the others beats ignoring them silently.
_SUPPORTED_OPTIONS = {"disable_any_whitespace", "disable_fallback"}
_UNSUPPORTED_OPTIONS = {"disable_additional_properties", "whitespace_pattern", "backend"}


class StructuredOutputError(InvalidRequestError):
    """A structured-output constraint that is malformed or that the grammar library cannot compile.

    A ``ValueError`` (through :class:`InvalidRequestError`) whose message names the problem; ``param``
    names the request field when it is known, for the API's 400 response.
    """


class StructuredOutputSpec(msgspec.Struct, frozen=True, array_like=True):
    """One request's output constraint.

    ``value`` is the JSON schema as JSON text (kind ``json``; key order is kept, since it is the order
    the output's properties follow), the pattern (``regex``) or the EBNF/GBNF or Lark text
    (``grammar``); ``choices`` the allowed outputs (``choice``). ``any_whitespace`` lets JSON output
    put any whitespace between tokens (vLLM's default; ``False`` is vLLM's ``disable_any_whitespace``:
    compact JSON, which keeps weak models from looping on whitespace).
    """

    kind: Kind
    value: str = ""
    choices: tuple[str, ...] = ()
    any_whitespace: bool = True

    def __post_init__(self) -> None:
        # msgspec type-checks on decode only, so constructed specs are checked here (decoded ones again).
        if self.kind not in KINDS:
            raise StructuredOutputError(
                f"unknown structured output kind {self.kind!r}; expected one of {', '.join(KINDS)}."
            )
        if not isinstance(self.value, str):
            raise StructuredOutputError(f"{self.kind} value must be a string, got {type(self.value).__name__}.")
        if not isinstance(self.choices, tuple):
            raise StructuredOutputError(f"choices must be a tuple, got {type(self.choices).__name__}.")
        if not isinstance(self.any_whitespace, bool):
            raise StructuredOutputError(
                f"any_whitespace must be a boolean, got {type(self.any_whitespace).__name__}."
            )
        if self.kind != "choice" and self.choices:
            raise StructuredOutputError(f"a {self.kind} constraint takes no choices.")
        getattr(self, f"_check_{self.kind}")()

    def _check_json(self) -> None:
        try:
            schema = json.loads(self.value)
        except ValueError as exc:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {exc}.") from None
        if not isinstance(schema, (dict, bool)):
            raise StructuredOutputError(
                f"the JSON schema must be a JSON object (or a boolean), got {_json_type(schema)}."
            )

    def _check_json_object(self) -> None:
        if self.value:
            raise StructuredOutputError("a json_object constraint takes no value.")

    def _check_regex(self) -> None:
        if not self.value:
            raise StructuredOutputError("the regex must not be empty.")

    def _check_grammar(self) -> None:
        if not self.value.strip():
            raise StructuredOutputError("the grammar must not be empty.")

    def _check_choice(self) -> None:
        if self.value:
            raise StructuredOutputError("a choice constraint lists its options in choices, not value.")
        if not self.choices:
            raise StructuredOutputError("choice must list at least one option.")
        for option in self.choices:
            if not isinstance(option, str):
                raise StructuredOutputError(
                    f"choice options must be strings, got {type(option).__name__} {option!r}."
                )

    # -- constructors --------------------------------------------------------------------------------

    @classmethod
    def json_schema(
        cls, schema: Mapping[str, Any] | bool | str, *, any_whitespace: bool = True
    ) -> StructuredOutputSpec:
        """Output is JSON valid under ``schema`` (a dict, a boolean, or its JSON text)."""
        if isinstance(schema, str):
            text = schema
        else:
            try:
                text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise StructuredOutputError(f"the JSON schema cannot be serialised as JSON: {exc}.") from None
        return cls("json", text, any_whitespace=any_whitespace)

    @classmethod
    def json_object(cls, *, any_whitespace: bool = True) -> StructuredOutputSpec:
        """Output is any JSON object (OpenAI's ``json_object`` mode)."""
        return cls("json_object", any_whitespace=any_whitespace)

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutputSpec:
        """Output matches ``pattern`` as a whole (Rust ``regex`` syntax, which Python's shares for common patterns)."""
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredOutputSpec:
        """Output is exactly one of ``options``."""
        if isinstance(options, str) or not isinstance(options, Sequence):
            raise StructuredOutputError(f"choice must be a list of strings, got {type(options).__name__}.")
        return cls("choice", choices=tuple(options))

    @classmethod
    def grammar(cls, text: str) -> StructuredOutputSpec:
        """Output is derived from the grammar's start rule (GBNF/EBNF ``root ::= ...`` or Lark ``start: ...``)."""
        return cls("grammar", text)

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> StructuredOutputSpec | None:
        """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``.

        ``json_schema.strict`` changes nothing: the schema is always enforced exactly. A missing
        ``json_schema.schema`` means any JSON value, as in the OpenAI API.
        """
        if response_format is None:
            return None
        param = "response_format"
        if not isinstance(response_format, Mapping):
            raise StructuredOutputError(f"{param} must be an object.", param)
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind != "json_schema":
            raise StructuredOutputError(
                f"{param}.type must be one of text, json_object, json_schema; got {kind!r}.", f"{param}.type"
            )
        body = response_format.get("json_schema")
        if not isinstance(body, Mapping):
            raise StructuredOutputError(f"{param}.json_schema must be an object.", f"{param}.json_schema")
        strict = body.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise StructuredOutputError(
                f"{param}.json_schema.strict must be a boolean.", f"{param}.json_schema.strict"
            )
        schema = body.get("schema", {})
        if not isinstance(schema, (Mapping, bool)):
            raise StructuredOutputError(
                f"{param}.json_schema.schema must be a JSON object, got {_json_type(schema)}.",
                f"{param}.json_schema.schema",
            )
        return _with_param(lambda: cls.json_schema(schema), f"{param}.json_schema.schema")

    @classmethod
    def from_structured_outputs(cls, params: Mapping[str, Any] | None) -> StructuredOutputSpec | None:
        """vLLM's ``structured_outputs`` object: exactly one of ``json``, ``regex``, ``choice``, ``grammar``,
        ``json_object``, plus ``disable_any_whitespace``. Options this server cannot honour are refused."""
        if params is None:
            return None
        param = "structured_outputs"
        if not isinstance(params, Mapping):
            raise StructuredOutputError(f"{param} must be an object.", param)
        unknown = set(params) - set(_CONSTRAINT_KEYS) - _SUPPORTED_OPTIONS - _UNSUPPORTED_OPTIONS
        if unknown:
            raise StructuredOutputError(f"{param} has unknown fields: {', '.join(sorted(unknown))}.", param)
        for option in sorted(_UNSUPPORTED_OPTIONS):
            if params.get(option) not in (None, False, ""):
                raise StructuredOutputError(f"{param}.{option} is not supported.", f"{param}.{option}")
        given = [key for key in _CONSTRAINT_KEYS if params.get(key) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputError(
                f"{param} must set exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(given) or 'none'}.",
                param,
            )
        key = given[0]
        value = params[key]
        any_whitespace = not params.get("disable_any_whitespace", False)
        if key == "structural_tag":
            raise StructuredOutputError(f"{param}.structural_tag is not supported.", f"{param}.structural_tag")
        if key == "json_object":
            if value is not True:
                raise StructuredOutputError(f"{param}.json_object must be true.", f"{param}.json_object")
            return cls.json_object(any_whitespace=any_whitespace)
        if key == "json":
            if not isinstance(value, (Mapping, bool, str)):
                raise StructuredOutputError(
                    f"{param}.json must be a JSON schema (an object or its JSON text), got {_json_type(value)}.",
                    f"{param}.json",
                )
            return _with_param(lambda: cls.json_schema(value, any_whitespace=any_whitespace), f"{param}.json")
        if key == "choice":
            return _with_param(lambda: cls.choice(value), f"{param}.choice")
        if not isinstance(value, str):
            raise StructuredOutputError(f"{param}.{key} must be a string.", f"{param}.{key}")
        return _with_param(lambda: cls(key, value), f"{param}.{key}")

    def validate(self) -> None:
        """Raise :class:`StructuredOutputError` naming the problem unless the grammar library compiles this
        spec. Needs no tokenizer, so the API server can answer 400 before the request is admitted.

        Imports the library lazily: a spec is plain data that processes without it can carry.
        """
        _validate(self)


@functools.lru_cache(maxsize=256)
def _validate(spec: StructuredOutputSpec) -> None:
    """Cached when it passes: the server validates a request's spec to name its field, and admission validates
    every spec again (for the offline API); clients also repeat their schemas."""
    from llmserve.structured_output import import_backend

    import_backend("compiler").validate_spec(spec)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _with_param(build: Callable[[], StructuredOutputSpec], param: str) -> StructuredOutputSpec:
    """Run a constructor, labelling its error with the request field it came from."""
    try:
        return build()
    except StructuredOutputError as exc:
        raise StructuredOutputError(str(exc), exc.param or param) from None
