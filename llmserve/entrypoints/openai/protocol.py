"""Request bodies of the OpenAI-compatible API (pydantic). Their JSON schema is the OpenAPI document's, so
every bound the server enforces without knowing the model is declared on the field; what depends on the
model (token ids below the vocabulary size, prompt + ``max_tokens`` within the context) or on a server
flag (``n`` up to ``--max-n``, set in the document at startup) is said in the field's description.

A field that would change what a request means but is not implemented (``suffix``, OpenAI's deprecated
``functions``) is declared with only its no-op values allowed, and anything else is refused with a 400
naming it. Chat messages and tools are in :mod:`chat_protocol`. Unknown fields are
ignored, as OpenAI's own API does, and logged once per name.

Structured outputs come as OpenAI's ``response_format``, vLLM's ``structured_outputs`` object or vLLM's
legacy ``guided_*`` fields (at most one of them); :meth:`_SamplingRequest.structured_output_spec` maps them
onto one :class:`StructuredOutputSpec` and has the grammar library check it, naming the field at fault.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from llmserve.entrypoints.openai.chat_protocol import MAX_TOOLS, ChatMessage, ChatTool, ToolRequest
from llmserve.entrypoints.openai.request_base import RequestModel
from llmserve.sampling_params import INT64_MAX, INT64_MIN, SamplingParams
from llmserve.structured_output import StructuredOutputError, StructuredOutputSpec

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_TOP_LOGPROBS = 20

TokenId = Annotated[int, Field(ge=0, le=INT64_MAX, description="below the model's vocabulary size")]
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]

# field -> (is the value a no-op?, why anything else is refused)
_DEPRECATED = "OpenAI's deprecated function calling is not supported; use tools and tool_choice"
NOT_SUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (lambda v: v == [], f"{_DEPRECATED}; only an empty list is accepted"),
    "function_call": (lambda v: v == "none", f"{_DEPRECATED}; only \"none\" is accepted"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported"),
    "continuous_usage_stats": (lambda v: v is False, "usage in every chunk is not supported; the last chunk "
                                                     "has it (include_usage)"),
    # vLLM's request extras this server does not implement: refused, never accepted and ignored
    "allowed_token_ids": (lambda v: v is None, "allowed_token_ids is not supported; logit_bias or a structured "
                                               "output (structured_outputs.choice / regex) restricts the tokens"),
    "bad_words": (lambda v: not v, "bad_words is not supported"),
    "return_tokens_as_token_ids": (lambda v: v is False, "return_tokens_as_token_ids is not supported"),
    "prompt_logprobs": (lambda v: v is None, "prompt_logprobs is not supported here; on /v1/completions, echo with "
                                             "logprobs returns the prompt's logprobs"),
    "use_beam_search": (lambda v: v is False, "beam search is not supported"),
    "logits_processors": (lambda v: not v, "logits_processors are not supported"),
    "priority": (lambda v: v == 0, "priority scheduling is not supported (requests are served first come, first "
                                   "served)"),
    "chat_template": (lambda v: v is None, "a chat template per request is not accepted; the server's is set with "
                                           "--chat-template"),
    "documents": (lambda v: v is None, "documents are not supported"),
    "echo": (lambda v: v is False, "echo is not supported on chat completions"),
    # OpenAI's chat fields for what this server does not do: only the value that asks for nothing passes
    "store": (lambda v: v is False, "completions are not stored; send store: false or leave it out"),
    "modalities": (lambda v: v == ["text"], "only text output is supported: modalities [\"text\"]"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not supported (no reasoning parser)"),
    "service_tier": (lambda v: v in ("auto", "default"), "service tiers are not supported; send \"auto\" or "
                                                          "\"default\""),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    # vLLM extras for what this server does not do
    "guided_decoding_backend": (lambda v: v in ("", "auto", "guidance", "llguidance"),
                                "structured outputs are enforced with llguidance (vLLM's \"guidance\"); other "
                                "backends are not supported"),
    "guided_whitespace_pattern": (lambda v: v is None, "a whitespace pattern is not supported; "
                                                       "structured_outputs.disable_any_whitespace gives compact JSON"),
    "length_penalty": (lambda v: v == 1, "length_penalty applies to beam search, which is not supported"),
    "early_stopping": (lambda v: v is False, "early_stopping applies to beam search, which is not supported"),
    "return_token_ids": (lambda v: v is False, "return_token_ids is not supported"),
    "prompt_embeds": (lambda v: v is None, "prompt embeddings are not supported"),
    "mm_processor_kwargs": (lambda v: v is None, "multimodal inputs are not supported"),
    "vllm_xargs": (lambda v: v is None, "vllm_xargs (custom logits processors' arguments) is not supported"),
}


def refuse_unless_noop(value: Any, info: ValidationInfo) -> Any:
    """Before validation: a value other than the field's no-op is a 400 naming the field."""
    is_noop, why = NOT_SUPPORTED[info.field_name]
    if value is not None and not is_noop(value):
        raise PydanticCustomError("not_supported", why)
    return value


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: Literal[False] = Field(default=False, description="vLLM's; true is not supported (400)")

    _refuse_continuous_usage = field_validator("continuous_usage_stats", mode="before")(refuse_unless_noop)


JsonSchema = Annotated[dict[str, Any] | StrictBool, Field(description="a JSON schema (an object, or true / false)")]


class JsonSchemaResponseFormat(RequestModel):
    """OpenAI's ``response_format.json_schema``."""

    name: str = Field(description="required, as in OpenAI's API (and vLLM's); not used")
    description: str | None = None
    schema_: JsonSchema | None = Field(default=None, alias="schema", description="absent: any JSON value")
    strict: bool | None = Field(default=None, description="the schema is always enforced exactly, strict or not")


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaResponseFormat | None = Field(default=None, description="required with type json_schema")


class StructuredOutputsParams(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of ``json``, ``regex``, ``choice``, ``grammar``, ``json_object``.
    vLLM's other options (``whitespace_pattern``, ``structural_tag``, ...) are refused."""

    model_config = ConfigDict(extra="forbid")
    json_: JsonSchema | str | None = Field(default=None, alias="json", description="a JSON schema or its JSON text")
    regex: str | None = Field(default=None, min_length=1, description="Rust regex syntax; the whole output matches")
    choice: list[str] | None = Field(default=None, min_length=1, description="the output is one of these")
    grammar: str | None = Field(default=None, min_length=1, description="GBNF / EBNF (root ::= ...) or Lark")
    json_object: bool | None = Field(default=None, description="true: any JSON object")
    disable_any_whitespace: bool | None = Field(default=None, description="true: compact JSON")
    disable_fallback: bool | None = Field(default=None, description="one backend: never falls back, as true asks")


def _field_error(field: str, exc: StructuredOutputError, path: str) -> StructuredOutputError:
    """``param`` is the request's top-level field, as in every other 400; the message says where in it."""
    message = str(exc)
    return StructuredOutputError(message if message.startswith(path) else f"{path}: {message}", field)


def _one_ending(continue_final_message: bool, info: ValidationInfo) -> bool:
    """The prompt ends either with an opened assistant turn or inside the last message, not both (as vLLM)."""
    if continue_final_message and info.data.get("add_generation_prompt", True):
        raise PydanticCustomError("both_endings", "continue_final_message needs add_generation_prompt to be false "
                                  "(the prompt cannot both continue the last message and start a new turn)")
    return continue_final_message


class _SamplingRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX,
                                   description="prompt + max_tokens must fit the model's context length")
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=INT64_MAX, description="at most --max-n")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (below the vocabulary size) -> bias in [-100, 100]",
        json_schema_extra={"maxProperties": MAX_LOGIT_BIAS_ENTRIES, "propertyNames": {"pattern": "^[0-9]+$"},
                           "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None
    response_format: ResponseFormat | None = Field(
        default=None, description="json_object or json_schema constrain the output (not with structured_outputs "
                                  "or guided_*)")
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1, le=INT64_MAX, description="0 or -1: disabled")
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int = Field(default=0, ge=0, le=INT64_MAX, description="at most max_tokens")
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # prefix-cache blocks are shared only between requests with the same salt (multi-tenant isolation)
    cache_salt: str | None = Field(default=None, min_length=1)
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's legacy forms of structured_outputs.json / regex / choice / grammar
    guided_json: JsonSchema | str | None = Field(default=None, description="as structured_outputs.json")
    guided_regex: str | None = Field(default=None, min_length=1, description="as structured_outputs.regex")
    guided_choice: list[str] | None = Field(default=None, min_length=1, description="as structured_outputs.choice")
    guided_grammar: str | None = Field(default=None, min_length=1, description="as structured_outputs.grammar")
    spaces_between_special_tokens: bool = Field(default=True, description="when special tokens are kept in the "
                                                                          "text (skip_special_tokens false)")
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, description=(
        "vLLM's: keep only the prompt's last k tokens (-1: the model's context length); not 0"))
    # vLLM extras that are not implemented: a value other than the no-op is a 400 naming the field
    allowed_token_ids: list[int] | None = Field(default=None, description="not supported (400 unless null)")
    bad_words: list[str] | None = Field(default=None, description="not supported (400 unless empty)")
    return_tokens_as_token_ids: bool | None = Field(default=None, description="not supported (400 if true)")
    prompt_logprobs: int | None = Field(default=None, description="not supported (400 unless null)")
    use_beam_search: bool | None = Field(default=None, description="not supported (400 if true)")
    logits_processors: list[Any] | None = Field(default=None, description="not supported (400 unless empty)")
    priority: int | None = Field(default=None, description="not supported (400 unless 0)")
    guided_decoding_backend: str | None = Field(default=None, description="auto, guidance or llguidance (400 "
                                                                           "otherwise)")
    guided_whitespace_pattern: str | None = Field(default=None, description="not supported (400 unless null)")
    length_penalty: float | None = Field(default=None, description="beam search's: 400 unless 1")
    early_stopping: bool | None = Field(default=None, description="beam search's: 400 if true")
    return_token_ids: bool | None = Field(default=None, description="not supported (400 if true)")
    prompt_embeds: Any = Field(default=None, description="not supported (400 unless null)")
    mm_processor_kwargs: dict[str, Any] | None = Field(default=None, description="not supported (400 unless null)")
    vllm_xargs: dict[str, Any] | None = Field(default=None, description="not supported (400 unless null)")
    request_id: str | None = Field(default=None, min_length=1, max_length=256, description=(
        "vLLM's: names the response (cmpl-<id>, chatcmpl-<id>) and, without X-Request-Id, its log lines"))

    _refuse_vllm_extras = field_validator(
        "allowed_token_ids", "bad_words", "return_tokens_as_token_ids", "prompt_logprobs", "use_beam_search",
        "logits_processors", "priority", "guided_decoding_backend", "guided_whitespace_pattern", "length_penalty",
        "early_stopping", "return_token_ids", "prompt_embeds", "mm_processor_kwargs", "vllm_xargs",
        mode="before")(refuse_unless_noop)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):   # OpenAI and vLLM refuse it too
            raise PydanticCustomError("stream_options_without_stream", "stream_options is only allowed with "
                                      "stream: true")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bound_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries")
        for key in value or ():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return value

    def structured_output_spec(self) -> StructuredOutputSpec | None:
        """The output constraint asked for, checked by the grammar library; a :class:`StructuredOutputError`
        (a 400) names the field at fault, and the request may use only one of the three forms."""
        given = [name for name in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                                   "guided_choice", "guided_grammar") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")   # no constraint
        if not given:
            return None
        if len(given) > 1:
            raise StructuredOutputError(f"give at most one of response_format (json_object, json_schema), "
                                        f"structured_outputs and guided_*; got {', '.join(given)}", given[1])
        field = given[0]
        try:
            spec = self._spec_from(field)
        except StructuredOutputError as exc:
            # guided_* goes through structured_outputs' mapping, whose paths are not this request's
            raise _field_error(field, exc, field if field.startswith("guided_") else exc.param or field) from None
        assert spec is not None   # response_format "text" was left out above
        try:
            spec.validate()
        except StructuredOutputError as exc:
            where = {"response_format": "response_format.json_schema.schema" if spec.kind == "json" else field,
                     "structured_outputs": f"structured_outputs.{spec.kind}"}.get(field, field)
            raise _field_error(field, exc, where) from None
        except ImportError as exc:   # llguidance is an optional extra
            raise StructuredOutputError(str(exc), field) from None
        return spec

    def _spec_from(self, field: str) -> StructuredOutputSpec | None:
        if field == "response_format":
            assert self.response_format is not None
            return StructuredOutputSpec.from_response_format(
                self.response_format.model_dump(by_alias=True, exclude_none=True))
        if field == "structured_outputs":
            assert self.structured_outputs is not None
            return StructuredOutputSpec.from_structured_outputs(
                self.structured_outputs.model_dump(by_alias=True, exclude_none=True))
        return StructuredOutputSpec.from_structured_outputs({field.removeprefix("guided_"): getattr(self, field)})

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        constraint: StructuredOutputSpec | None = None) -> SamplingParams:
        """Map the request onto SamplingParams (which validates ranges and names the field). ``constraint``
        is the endpoint's (tool calling's), which already holds the request's own where the two combine."""
        spec = constraint or self.structured_output_spec()
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0, repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            structured_outputs=spec,
        )

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# OpenAI's four prompt shapes (completions' ``prompt``, embeddings' ``input``); none of them empty.
PromptInput = NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | TokenIds | Annotated[
    list[TokenIds], Field(min_length=1)]


def refuse_empty_prompts(value: Any) -> Any:
    """Before validation: one 400 that says a prompt is empty, rather than one error per shape of the union."""
    if value == "" or value == [] or (isinstance(value, list) and any(p == "" or p == [] for p in value)):
        raise PydanticCustomError("empty_prompt", "a prompt must not be empty")
    return value


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """Normalise the four prompt shapes OpenAI accepts to a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]   # type: ignore[arg-type]
    return list(prompt)   # type: ignore[arg-type]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput = Field(description="a string, a list of strings, token ids or a list of token-id lists; "
                                            "none of them empty")
    max_tokens: int | None = Field(
        default=None, ge=0, le=INT64_MAX,
        description="default 16; 0 generates nothing (with echo: the prompt and its logprobs, to score it); prompt + "
                    "max_tokens must fit the model's context length")
    best_of: int | None = Field(default=None, ge=1, le=INT64_MAX, description="must equal n")
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = Field(default=None, max_length=0, description="not supported (400) unless empty")
    add_special_tokens: bool = Field(default=True, description="vLLM's: add the tokenizer's special tokens (BOS) to "
                                                               "a text prompt")

    _refuse_suffix = field_validator("suffix", mode="before")(refuse_unless_noop)
    _not_empty = field_validator("prompt", mode="before")(refuse_empty_prompts)

    def prompts(self) -> list[str | list[int]]:
        return prompt_list(self.prompt)


class ChatCompletionRequest(ToolRequest, _SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX, description="wins over max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs: true")
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(default=False, description=(
        "the prompt ends with the last message's content, open for the model to continue (with "
        "add_generation_prompt false)"))
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="extra variables for the chat template (not its own parameters such as tokenize)")
    functions: list[dict[str, Any]] | None = Field(default=None, max_length=0,
                                                   description="deprecated by OpenAI (400) unless empty; use tools")
    function_call: Literal["none"] | None = Field(default=None,
                                                  description="deprecated by OpenAI (400) unless \"none\"")
    chat_template: str | None = Field(default=None, description="not accepted per request (400); --chat-template")
    documents: list[Any] | None = Field(default=None, description="not supported (400 unless null)")
    echo: bool | None = Field(default=None, description="vLLM's chat echo: not supported (400 if true)")
    add_special_tokens: bool = Field(default=False, description=(
        "vLLM's: add the tokenizer's special tokens (BOS) on top of the rendered template, which writes its own"))
    store: bool | None = Field(default=None, description="completions are not stored: 400 if true")
    metadata: dict[str, str] | None = Field(default=None, max_length=16, description=(
        "accepted; OpenAI keeps it with stored completions, and nothing is stored here"))
    modalities: list[str] | None = Field(default=None, description="[\"text\"] only (400 otherwise)")
    audio: dict[str, Any] | None = Field(default=None, description="not supported (400 unless null)")
    reasoning_effort: str | None = Field(default=None, description="not supported (400 unless null)")
    service_tier: str | None = Field(default=None, description="auto or default (400 otherwise)")
    prediction: dict[str, Any] | None = Field(default=None, description="not supported (400 unless null)")
    web_search_options: dict[str, Any] | None = Field(default=None, description="not supported (400 unless null)")

    _refuse_functions = field_validator("functions", "function_call", "chat_template", "documents", "echo",
                                        "store", "modalities", "audio", "reasoning_effort", "service_tier",
                                        "prediction", "web_search_options", mode="before")(refuse_unless_noop)
    _check_ending = field_validator("continue_final_message")(_one_ending)


class TokenizeRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: str | None = None
    prompt: str | None = Field(default=None, description="give exactly one of prompt and messages")
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = Field(
        default=None, description="add the tokenizer's special tokens (BOS); default true for a prompt, false for "
                                  "messages (the chat template writes its own)")
    add_generation_prompt: bool = Field(default=True, description="messages only")
    continue_final_message: bool = Field(default=False, description="messages only, as on chat completions")
    tools: list[ChatTool] | None = Field(default=None, max_length=MAX_TOOLS,
                                         description="messages only: rendered by the template, as on chat")
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="messages only, as on chat")

    _check_ending = field_validator("continue_final_message")(_one_ending)


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId]
