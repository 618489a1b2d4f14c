"""POST /v1/chat/completions: messages (and tools) through the chat template, streaming or not; the output
split into content and tool calls by :class:`ToolCalling`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from llmserve.engine.async_engine import AsyncLLMEngine
from llmserve.entrypoints.chat_template_renderer import ChatTemplateError, ChatTemplateRenderer, renderer_parameters
from llmserve.entrypoints.openai.errors import APIError
from llmserve.entrypoints.openai.event_stream import EventStream, SSEResponse
from llmserve.entrypoints.openai.chat_protocol import ChatMessage
from llmserve.entrypoints.openai.protocol import ChatCompletionRequest
from llmserve.entrypoints.openai.serving_base import OpenAIServing, ServerLimits, Submitted, usage
from llmserve.entrypoints.openai.serving_models import OpenAIServingModels
from llmserve.entrypoints.openai.tool_calling import ToolCalling
from llmserve.entrypoints.openai.tool_parsers.strict import Vocabulary
from llmserve.entrypoints.openai.tool_parsers import ToolCallParser
from llmserve.outputs import PositionLogprobs, RequestOutput
from llmserve.sampling_params import SamplingParams


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLMEngine, models: OpenAIServingModels, limits: ServerLimits,
                 chat_template: str | None, auto_tool_parser: type[ToolCallParser] | None = None) -> None:
        super().__init__(engine, models, limits)
        self.chat_template = chat_template
        info = engine.info   # the template runs bounded, in a process of its own that loads the same tokenizer
        self.renderer = ChatTemplateRenderer(info.tokenizer_path, info.config.tokenizer_revision,
                                             info.config.trust_remote_code, type(self.tokenizer))
        self.auto_tool_parser = auto_tool_parser   # set by --enable-auto-tool-choice --tool-call-parser
        self.vocabulary = Vocabulary.of(self.tokenizer, info.eos_token_ids)   # for strict tools' grammars
        # chat_template_kwargs are the template's variables, never the renderer's own parameters
        self.renderer_params = renderer_parameters(self.tokenizer)

    async def render_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                            template_kwargs: dict[str, Any] | None = None, add_special_tokens: bool = False,
                            tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False
                            ) -> list[int]:
        """Messages -> token ids through ``--chat-template`` or the tokenizer's template (which writes BOS
        itself where the model wants one; ``add_special_tokens`` adds the tokenizer's on top)."""
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; start the server with --chat-template", "messages")
        clash = sorted(self.renderer_params & set(template_kwargs or ()))
        if clash:
            raise APIError(400, f"chat_template_kwargs may not set {clash[0]!r}: it is a parameter of the "
                           "renderer, not a template variable", "chat_template_kwargs")
        conversation = [m.for_template() for m in messages]
        try:
            text = await asyncio.to_thread(self.renderer.render, conversation, tools or None, self.chat_template,
                                           add_generation_prompt, template_kwargs, continue_final_message)
        except ChatTemplateError as exc:   # the client's messages, or the template itself
            raise APIError(400, f"the chat template could not render these messages: {exc}", "messages") from None
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def prepare(self, body: ChatCompletionRequest, max_tokens: int | None, logprobs: int | None
                      ) -> tuple[list[int], SamplingParams, ToolCalling]:
        """A chat request's prompt, sampling parameters and tool calling (shared with /v1/responses)."""
        tools = body.checked_tools()
        answer = body.structured_output_spec()   # the server's whitespace rule too: tools' grammars may hold it
        if answer is not None:
            answer = self.engine.info.config.structured_outputs_config.applied_to(answer)
        tool_calling = ToolCalling.for_request(body, tools, self.auto_tool_parser, self.vocabulary, answer)
        prompt_ids = await self.render_prompt(body.messages, body.add_generation_prompt, body.chat_template_kwargs,
                                              body.add_special_tokens, tools=tools,
                                              continue_final_message=body.continue_final_message)
        if not prompt_ids:
            raise APIError(400, "the chat template renders these messages as no tokens at all", "messages")
        params = body.sampling_params(max_tokens, logprobs, constraint=tool_calling.constraint)
        if tool_calling.needs_special_tokens:
            params.skip_special_tokens = False   # the format's markers are special tokens
        return prompt_ids, params, tool_calling

    async def create(self, body: ChatCompletionRequest, raw: Request, header_request_id: str | None
                     ) -> JSONResponse | SSEResponse:
        lora = self.check_model(body.model)
        self.check_n(body.n)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_ids, params, tool_calling = await self.prepare(body, body.max_completion_tokens or body.max_tokens, logprobs)
        submitted = self.submit("chatcmpl", [prompt_ids], params, header_request_id, body.cache_salt, lora,
                                body.request_id)
        if body.stream:
            return SSEResponse(self, self.event_stream(body, submitted, tool_calling))
        output = (await self.collect(raw, submitted))[0]
        choices = []
        for c in output.outputs:
            message, finish_reason = tool_calling.message(c.text, c.finish_reason)
            choices.append({
                "index": c.index,
                "message": message,
                "logprobs": {"content": self._logprobs(c.token_ids, c.logprobs or [], logprobs or 0)}
                if body.logprobs else None,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            })
        return JSONResponse({"id": submitted.request_id, "object": "chat.completion", "created": submitted.created,
                             "model": submitted.model, "choices": choices, "usage": usage([output])})

    def event_stream(self, body: ChatCompletionRequest, submitted: Submitted, tool_calling: ToolCalling
                     ) -> EventStream:
        """OpenAI's chat chunks: a role chunk first for each choice, then its content and tool-call deltas."""
        include_usage = body.include_usage_in_stream
        top = (body.top_logprobs or 0) if body.logprobs else 0
        started: set[int] = set()
        tool_streams: dict[int, Any] = {}   # choice index -> its ToolCallStream (tool calling only)

        def chunk(choices: list[dict]) -> dict:
            data = {"id": submitted.request_id, "object": "chat.completion.chunk", "created": submitted.created,
                    "model": submitted.model, "choices": choices}
            if include_usage:
                data["usage"] = None
            return data

        def render(_: int, output: RequestOutput) -> list[dict]:
            chunks = []
            for c in output.outputs:
                if c.index not in started:   # OpenAI's first chunk of a choice carries only the role
                    started.add(c.index)
                    tool_streams[c.index] = tool_calling.stream()
                    chunks.append(chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]))
                tool_stream = tool_streams[c.index]
                content, calls = (c.text, []) if tool_stream is None else \
                    tool_stream.feed(c.text, final=c.finish_reason is not None)
                if content or calls or c.token_ids and body.logprobs:
                    delta: dict[str, Any] = {"tool_calls": calls} if calls else {}
                    if content or not calls:
                        delta["content"] = content
                    chunks.append(chunk([{
                        "index": c.index, "delta": delta,
                        "logprobs": {"content": self._logprobs(c.token_ids, c.logprobs or [], top)}
                        if body.logprobs else None,
                        "finish_reason": None}]))
                if c.finish_reason is not None:
                    called = tool_stream is not None and tool_stream.called
                    chunks.append(chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                          "finish_reason": tool_calling.finish_reason(c.finish_reason, called),
                                          "stop_reason": c.stop_reason}]))
            return chunks

        def finish(outputs: list[RequestOutput]) -> list[dict]:
            if not include_usage:
                return []
            return [{"id": submitted.request_id, "object": "chat.completion.chunk", "created": submitted.created,
                     "model": submitted.model, "choices": [], "usage": usage(outputs)}]

        return EventStream(submitted, render, finish)

    def _logprobs(self, token_ids: list[int], positions: list[PositionLogprobs], k: int) -> list[dict]:
        """OpenAI's chat logprobs: one entry per token with its top-k alternatives."""
        content = []
        for token_id, position in zip(token_ids, positions):
            text = self.token_text(token_id)
            ranked = sorted((item for item in position.items() if item[1].rank is not None and item[1].rank <= k),
                            key=lambda item: item[1].rank)
            content.append({
                "token": text, "logprob": position[token_id].logprob, "bytes": self.token_text.raw_bytes(token_id),
                "top_logprobs": [{"token": self.token_text(tid), "logprob": lp.logprob,
                                  "bytes": self.token_text.raw_bytes(tid)} for tid, lp in ranked],
            })
        return content
