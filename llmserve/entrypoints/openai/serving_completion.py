"""POST /v1/completions: prompts as text, token ids or lists of either; streaming or not."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from llmserve.entrypoints.openai.errors import APIError
from llmserve.entrypoints.openai.protocol import CompletionRequest
from llmserve.entrypoints.openai.serving_base import OpenAIServing, usage
from llmserve.outputs import PositionLogprobs, RequestOutput

DEFAULT_MAX_TOKENS = 16   # OpenAI's default for completions


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, body: CompletionRequest, raw: Request, header_request_id: str | None
                     ) -> JSONResponse | StreamingResponse:
        self.check_model(body.model)
        self.check_n(body.n)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (or be omitted): llmserve returns every sample it "
                           "generates and does not rank extra ones", "best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt")
        max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = body.sampling_params(max_tokens, body.logprobs,
                                      prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None
                                      else None)
        submitted = self.submit("cmpl", prompts, params, header_request_id, body.cache_salt)
        n = body.n
        if body.stream:
            def render(index: int, output: RequestOutput) -> list[dict]:
                choices = []
                for c in output.outputs:
                    if not c.text and not c.finish_reason and not c.token_ids:
                        continue
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = self._logprobs(c.token_ids, c.logprobs or [], body.logprobs)
                    choices.append({"index": index * n + c.index, "text": c.text, "logprobs": logprobs,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                if not choices:
                    return []
                chunk = self._chunk(submitted.request_id, submitted.created, choices)
                if body.include_usage_in_stream:
                    chunk["usage"] = None   # OpenAI: every chunk but the last has "usage": null
                return [chunk]

            def finish(outputs: list[RequestOutput]) -> list[dict]:
                if not body.include_usage_in_stream:
                    return []
                return [dict(self._chunk(submitted.request_id, submitted.created, []), usage=usage(outputs))]

            events = self.stream_events(submitted, self._with_echo(body, render), finish)
            return StreamingResponse(events, media_type="text/event-stream")
        outputs = await self.collect(raw, submitted)
        choices = []
        for index, output in enumerate(outputs):
            for c in output.outputs:
                text, logprobs = c.text, None
                token_ids, token_logprobs = list(c.token_ids), list(c.logprobs or [])
                if body.echo:
                    text = (output.prompt or self.tokenizer.decode(output.prompt_token_ids)) + text
                if body.logprobs is not None:
                    if body.echo:
                        token_ids = list(output.prompt_token_ids) + token_ids
                        token_logprobs = list(output.prompt_logprobs or [None] * len(output.prompt_token_ids)) \
                            + token_logprobs
                    logprobs = self._logprobs(token_ids, token_logprobs, body.logprobs)
                choices.append({"index": index * n + c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({"id": submitted.request_id, "object": "text_completion", "created": submitted.created,
                             "model": self.model_name, "choices": choices, "usage": usage(outputs)})

    def _with_echo(self, body: CompletionRequest, render):  # noqa: ANN001, ANN202
        """Streaming echo: the prompt (and its logprobs) goes out in each choice's first chunk."""
        if not body.echo:
            return render
        echoed: set[tuple[int, int]] = set()

        def with_echo(index: int, output: RequestOutput) -> list[dict]:
            chunks = render(index, output)
            for chunk in chunks:
                for choice in chunk["choices"]:
                    key = (index, choice["index"])
                    if key in echoed:
                        continue
                    echoed.add(key)
                    choice["text"] = (output.prompt or self.tokenizer.decode(output.prompt_token_ids)) + choice["text"]
                    if body.logprobs is not None and choice["logprobs"] is not None:
                        prompt = self._logprobs(output.prompt_token_ids,
                                                list(output.prompt_logprobs or [None] * len(output.prompt_token_ids)),
                                                body.logprobs)
                        for key_name in ("tokens", "token_logprobs", "top_logprobs"):
                            choice["logprobs"][key_name] = prompt[key_name] + choice["logprobs"][key_name]
                        choice["logprobs"]["text_offset"] = _offsets(choice["logprobs"]["tokens"])
            return chunks

        return with_echo

    def _chunk(self, request_id: str, created: int, choices: list[dict]) -> dict:
        return {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices}

    def _logprobs(self, token_ids: list[int], positions: list[PositionLogprobs | None], k: int) -> dict[str, Any]:
        """OpenAI's legacy completions logprobs object."""
        tokens, token_logprobs, top = [], [], []
        for token_id, position in zip(token_ids, positions):
            tokens.append(self.token_text(token_id))
            if position is None:
                token_logprobs.append(None)
                top.append(None)
                continue
            token_logprobs.append(position[token_id].logprob if token_id in position else None)
            ranked = sorted((item for item in position.items() if item[1].rank is not None
                             and item[1].rank <= k), key=lambda item: item[1].rank)
            top.append({self.token_text(t): lp.logprob for t, lp in ranked})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": _offsets(tokens)}


def _offsets(tokens: list[str]) -> list[int]:
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return offsets
