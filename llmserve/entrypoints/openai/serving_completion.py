"""POST /v1/completions: prompts as text, token ids or lists of either; streaming or not.

``echo`` puts the prompt in front of each choice's text (streamed: in its first chunk), and with
``logprobs`` the prompt tokens' logprobs in front of the generated ones (the first prompt token has
none: ``null``). ``max_tokens: 0`` with ``echo`` and ``logprobs`` is the legacy scoring call of
evaluation harnesses: the prompt and its logprobs, nothing generated.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from llmserve.entrypoints.openai.errors import APIError
from llmserve.entrypoints.openai.event_stream import EventStream, SSEResponse
from llmserve.entrypoints.openai.protocol import CompletionRequest
from llmserve.entrypoints.openai.serving_base import OpenAIServing, Submitted, usage
from llmserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput

DEFAULT_MAX_TOKENS = 16   # OpenAI's default for completions


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, body: CompletionRequest, raw: Request, header_request_id: str | None
                     ) -> JSONResponse | SSEResponse:
        lora = self.check_model(body.model)
        self.check_n(body.n)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (or be omitted): llmserve returns every sample it "
                           "generates and does not rank extra ones", "best_of")
        max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = body.sampling_params(max_tokens, body.logprobs,
                                      prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None
                                      else None)
        prompts = self.with_special_tokens(body.prompts(), body.add_special_tokens, "prompt")
        submitted = self.submit("cmpl", prompts, params, header_request_id, body.cache_salt, lora, body.request_id)
        n = body.n
        if body.stream:
            include_usage = body.include_usage_in_stream
            offsets: dict[int, int] = {}   # choice -> text_offset after what it has streamed (present once started)
            prompt_logprobs: dict[int, list[PositionLogprobs | None]] = {}   # streamed once per prompt

            def render(index: int, output: RequestOutput) -> list[dict]:
                if output.prompt_logprobs is not None:
                    prompt_logprobs[index] = output.prompt_logprobs
                chunks = []
                for c in output.outputs:   # one choice per chunk, as OpenAI and vLLM stream them
                    if not c.text and not c.finish_reason and not c.token_ids:
                        continue
                    key = index * n + c.index
                    choice, offsets[key] = self._choice(body, key, output, c, body.echo and key not in offsets,
                                                        offsets.get(key, 0), prompt_logprobs.get(index))
                    chunk = self._chunk(submitted, [choice])
                    if include_usage:
                        chunk["usage"] = None   # OpenAI: every chunk but the last has "usage": null
                    chunks.append(chunk)
                return chunks

            def finish(outputs: list[RequestOutput]) -> list[dict]:
                if not include_usage:
                    return []
                return [dict(self._chunk(submitted, []), usage=usage(outputs))]

            return SSEResponse(self, EventStream(submitted, render, finish))
        outputs = await self.collect(raw, submitted)
        choices = [self._choice(body, index * n + c.index, output, c, body.echo, 0, output.prompt_logprobs)[0]
                   for index, output in enumerate(outputs) for c in output.outputs]
        return JSONResponse({"id": submitted.request_id, "object": "text_completion", "created": submitted.created,
                             "model": submitted.model, "choices": choices, "usage": usage(outputs)})

    def _choice(self, body: CompletionRequest, index: int, output: RequestOutput, c: CompletionOutput, echo: bool,
                offset: int, prompt_logprobs: list[PositionLogprobs | None] | None) -> tuple[dict, int]:
        """A choice, or a streamed piece of one, whose text starts at ``offset`` of the choice's whole text;
        with ``echo`` the prompt (and its logprobs) come first. Returns it and the offset after it."""
        text, token_ids, positions = c.text, c.token_ids, c.logprobs or []
        if echo:
            prompt_ids = output.prompt_token_ids
            # A token-id prompt's text follows skip_special_tokens, as generated text does.
            text = (output.prompt or self.tokenizer.decode(prompt_ids, skip_special_tokens=body.skip_special_tokens)
                    ) + text
            token_ids = list(prompt_ids) + token_ids
            positions = list(prompt_logprobs or [None] * len(prompt_ids)) + positions
        logprobs = None
        if body.logprobs is not None:
            logprobs, offset = self._logprobs(token_ids, positions, body.logprobs, offset)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}, offset

    def _chunk(self, submitted: Submitted, choices: list[dict]) -> dict:
        return {"id": submitted.request_id, "object": "text_completion", "created": submitted.created,
                "model": submitted.model, "choices": choices}

    def _logprobs(self, token_ids: list[int], positions: list[PositionLogprobs | None], k: int,
                  offset: int) -> tuple[dict[str, Any], int]:
        """OpenAI's legacy completions logprobs object, its ``text_offset`` counted from ``offset``; and the
        offset after its last token. ``top_logprobs[i]`` maps the ``k`` most likely tokens' texts to their
        logprobs, plus the chosen token's (so up to k + 1 entries, as OpenAI); ``null`` where a position has
        no logprobs (the first prompt token)."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, position in zip(token_ids, positions):
            text = self.token_text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if position is None:
                token_logprobs.append(None)
                top.append(None)
                continue
            chosen = position[token_id].logprob
            token_logprobs.append(chosen)
            ranked = sorted((item for item in position.items() if item[1].rank is not None
                             and item[1].rank <= k), key=lambda item: item[1].rank)
            entries = {self.token_text(t): lp.logprob for t, lp in ranked}
            entries.setdefault(text, chosen)
            top.append(entries)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": offsets}, offset
