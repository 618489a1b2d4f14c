"""POST /v1/embeddings: each input is a pooling request, scheduled with every other request (prefill only),
and answered with its pooled vector as ``--pooler-config`` says (default: the last token's final hidden
state, L2-normalised), as floats or as base64 of the float32 little-endian bytes (what OpenAI's client
decodes). Admission, the queue limit, the timeout and the disconnect watch are the completions' own."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from llmserve.entrypoints.openai.embedding_protocol import EmbeddingRequest
from llmserve.entrypoints.openai.errors import APIError
from llmserve.entrypoints.openai.serving_base import OpenAIServing
from llmserve.errors import InvalidRequestError
from llmserve.outputs import EmbeddingRequestOutput
from llmserve.pooling_params import PoolingParams


class OpenAIServingEmbedding(OpenAIServing):
    async def create(self, body: EmbeddingRequest, raw: Request, header_request_id: str | None) -> JSONResponse:
        lora = self.check_model(body.model)
        try:
            params = PoolingParams(normalize=body.normalize, truncate_prompt_tokens=body.truncate_prompt_tokens)
            prompts = self.with_special_tokens(body.prompts(), body.add_special_tokens, "input")
            submitted = self.submit("embd", prompts, params, header_request_id, body.cache_salt, lora)
        except InvalidRequestError as exc:   # the engine names the prompt; this API calls it input
            raise APIError(400, str(exc), "input" if exc.param == "prompt" else exc.param) from None
        outputs = await self.collect(raw, submitted)
        data = [{"object": "embedding", "index": index, "embedding": _encode(output, body.encoding_format)}
                for index, output in enumerate(outputs)]
        prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
        return JSONResponse({"id": submitted.request_id, "object": "list", "created": submitted.created,
                             "model": submitted.model, "data": data,
                             "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})


def _encode(output: EmbeddingRequestOutput, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(output.outputs.embedding, dtype="<f4").tobytes()).decode()
    return output.outputs.embedding
