"""One chat request's tool calling: what ``tool_choice`` makes of the request and of its output.

- ``none``: the tools are still shown to the template (as vLLM does), the output is plain content;
- ``auto``: the model decides; the server's ``--tool-call-parser`` reads calls out of its text; with a
  ``strict`` tool a grammar in the parser's format holds every call to the tools' names and the strict tools'
  schemas, the text around the calls free (``tool_parsers/strict.py``); with a JSON output constraint the same
  grammar holds an answer without calls to it;
- ``required``: the grammar forces a JSON array of one or more calls, each valid under its tool's schema;
- a named function: the grammar forces that function's arguments object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmserve.entrypoints.openai.chat_protocol import NamedToolChoice, ToolRequest
from llmserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS, ToolCallParser
from llmserve.entrypoints.openai.tool_parsers.base import final_parse
from llmserve.entrypoints.openai.tool_parsers.forced import (
    NamedToolParser, RequiredToolParser, named_schema, required_schema)
from llmserve.entrypoints.openai.tool_parsers.streaming import ToolCallStream, new_tool_call_id, tool_call_json
from llmserve.entrypoints.openai.tool_parsers.strict import Vocabulary, answer_rule
from llmserve.errors import InvalidRequestError
from llmserve.structured_output import StructuredOutputError, StructuredOutputSpec

AUTO_NEEDS_FLAGS = "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set"


@dataclass
class ToolCalling:
    parser: ToolCallParser | None         # None: the output is plain content
    constraint: StructuredOutputSpec | None
    max_calls: int | None                 # 1 with parallel_tool_calls=false
    finishes_as_tool_calls: bool          # OpenAI's finish_reason for a forced named call stays "stop"

    @classmethod
    def for_request(cls, request: ToolRequest, tools: list[dict[str, Any]], auto_parser: type[ToolCallParser] | None,
                    vocabulary: Vocabulary, answer: StructuredOutputSpec | None) -> ToolCalling:
        """``vocabulary``: the tokenizer's added tokens, for a strict tool's grammar (its markers may be tokens);
        ``answer``: the request's own constraint (``response_format``, ``structured_outputs``, ``guided_*``),
        which :attr:`constraint` holds too."""
        choice = request.effective_tool_choice
        max_calls = None if request.parallel_tool_calls else 1
        if choice == "none":
            return cls(None, answer, None, False)
        if choice == "auto":
            if auto_parser is None:
                raise InvalidRequestError(AUTO_NEEDS_FLAGS, "tool_choice")
            parser = auto_parser()
            return cls(parser, _auto_constraint(parser, tools, max_calls, vocabulary, answer), max_calls, True)
        if answer is not None:
            raise InvalidRequestError("tool_choice \"required\" or a named function constrains the output to calls; "
                                      "it cannot be combined with response_format, structured_outputs or guided_*",
                                      "tool_choice")
        if isinstance(choice, NamedToolChoice):
            tool = next(t for t in tools if t["function"]["name"] == choice.function.name)
            return cls(NamedToolParser(choice.function.name), _constraint("json", json.dumps(named_schema(tool))),
                       None, False)
        required = required_schema(tools, request.parallel_tool_calls)
        return cls(RequiredToolParser(), _constraint("json", json.dumps(required)), max_calls, True)

    @property
    def needs_special_tokens(self) -> bool:
        return self.parser is not None and self.parser.needs_special_tokens

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A finished choice's ``message`` and ``finish_reason``."""
        if self.parser is None:
            return {"role": "assistant", "content": text}, finish_reason
        parsed = final_parse(self.parser, text, self.max_calls)
        calls = parsed.calls
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or (None if calls else "")}
        if calls:
            message["tool_calls"] = [tool_call_json(call, new_tool_call_id()) for call in calls]
        return message, self.finish_reason(finish_reason, bool(calls))

    def stream(self) -> ToolCallStream | None:
        return None if self.parser is None else ToolCallStream(self.parser, self.max_calls)

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" and self.finishes_as_tool_calls else reason


def _auto_constraint(parser: ToolCallParser, tools: list[dict[str, Any]], max_calls: int | None,
                     vocabulary: Vocabulary, answer: StructuredOutputSpec | None) -> StructuredOutputSpec | None:
    """``auto``: with strict tools or a JSON answer, the format's grammar (calls to the tools, and an answer without
    calls in the JSON asked for); a constraint the format cannot hold beside calls holds the whole output, as
    without tools, unless a tool is strict (a 400: the client asked for both)."""
    strict = any(tool["function"].get("strict") for tool in tools)
    name = _parser_name(type(parser))
    if answer is not None and answer.kind not in ("json", "json_object"):
        if strict:
            raise InvalidRequestError(f"strict function schemas with tool_choice \"auto\" combine with a JSON "
                                      f"output constraint only, not with a {answer.kind} one", "tools")
        return answer
    if answer is None and not strict:
        return None
    rule = None if answer is None else answer_rule(answer.value if answer.kind == "json" else '{"type": "object"}',
                                                   answer.any_whitespace)
    grammar = parser.strict_grammar(tools, max_calls, vocabulary, rule)
    if grammar is not None:
        return _constraint("grammar", grammar, with_answer=rule is not None)
    if not strict:
        return answer
    if answer is None or parser.strict_grammar(tools, max_calls, vocabulary) is None:
        raise InvalidRequestError(f"strict function schemas are not enforced with tool_choice \"auto\" in the {name} "
                                  f"format; use tool_choice \"required\" or a named function, or leave strict unset",
                                  "tools")
    raise InvalidRequestError(f"strict function schemas with tool_choice \"auto\" cannot be combined with a JSON "
                              f"output constraint in the {name} format, whose calls are JSON answers themselves; "
                              f"leave strict unset or drop the output constraint", "tools")


def _parser_name(parser: type[ToolCallParser]) -> str:
    return next((name for name, cls in TOOL_CALL_PARSERS.items() if cls is parser), parser.__name__)


def _constraint(kind: str, value: str, with_answer: bool = False) -> StructuredOutputSpec:
    """The grammar of forced or strict calls (``with_answer``: and of the request's JSON answer); a schema the
    grammar library cannot compile is the client's 400."""
    try:
        spec = StructuredOutputSpec(kind=kind, value=value)
        spec.validate()
    except StructuredOutputError as exc:
        what = "the tools' parameters schemas and the output's JSON schema" if with_answer else \
            "a tool's parameters schema"
        raise InvalidRequestError(f"{what} cannot be enforced: {exc}", "tools") from None
    except ImportError as exc:   # llguidance is an optional extra
        raise InvalidRequestError(f"tool_choice \"required\", a named function or a strict tool needs the grammar "
                                  f"library: {exc}", "tool_choice") from None
    return spec
