"""The offline Python API: ``LLM(model).generate(prompts, SamplingParams(...))`` and ``LLM(model).embed(prompts)``."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence as SequenceABC
from typing import Any, TypeVar, Union

from llmserve.config import EngineConfig
from llmserve.entrypoints.chat_template_renderer import renderer_parameters
from llmserve.engine.llm_engine import LLMEngine, OutputKind
from llmserve.engine.output_processor import AnyRequestOutput
from llmserve.errors import InvalidRequestError
from llmserve.lora.request import LoRARequest
from llmserve.outputs import EmbeddingRequestOutput, RequestOutput
from llmserve.pooling_params import PoolingParams
from llmserve.sampling_params import SamplingParams

# A prompt is text, a list of token ids, or vLLM's dict forms {"prompt": ...} / {"prompt_token_ids": [...]}.
PromptType = Union[str, list[int], dict[str, Any]]
Params = TypeVar("Params", SamplingParams, PoolingParams)

logger = logging.getLogger(__name__)


class LLM:
    """Generate for many prompts at once with continuous batching on a paged KV cache.

    ``model`` is a local Hugging Face checkpoint folder or a Hub id; ``None`` uses the built-in demo
    model (random weights). Keyword arguments are :class:`EngineConfig` fields, named as vLLM's
    (``max_model_len``, ``block_size``, ``kv_cache_memory_bytes``, ``max_num_seqs``, ``pooler_config``, ...).
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        config = EngineConfig(model=model, **engine_args)
        if config.stream_interval != 1:
            logger.warning("stream_interval %d: no effect here, LLM returns each request once it has finished (it "
                           "spaces streamed outputs: the server's, or LLMEngine's DELTA outputs)",
                           config.stream_interval)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the worker processes (tensor / pipeline parallel runs); in process there is nothing to stop."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | SequenceABC[PromptType],
                 sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
                 lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of ``prompts``. ``lora_request``
        (``enable_lora=True``): one adapter for every prompt, or one per prompt (None: the base model).
        ``use_tqdm``: a progress bar of the prompts done, on stderr (as vLLM's).

        If any prompt is refused, none of them runs and the error names the prompt's index.
        """
        return self._run_all(prompts, sampling_params, SamplingParams, lora_request,   # type: ignore[return-value]
                             use_tqdm)

    def embed(self, prompts: PromptType | SequenceABC[PromptType],
              pooling_params: PoolingParams | SequenceABC[PoolingParams] | None = None,
              lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None, use_tqdm: bool = True
              ) -> list[EmbeddingRequestOutput]:
        """Pool each prompt's final hidden states into one vector (``outputs.embedding``), as ``--pooler-config``
        says (default: the last token's, L2-normalised); in the order of ``prompts``. Pooling requests are
        scheduled with any others (prefill only), so a long prompt is computed in chunks.

        If any prompt is refused, none of them runs and the error names the prompt's index.
        """
        return self._run_all(prompts, pooling_params, PoolingParams, lora_request,   # type: ignore[return-value]
                             use_tqdm)

    def _run_all(self, prompts: PromptType | SequenceABC[PromptType], params: Params | SequenceABC[Params] | None,
                 kind: type[Params], lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
                 use_tqdm: bool = True) -> list[AnyRequestOutput]:
        """Queue every prompt with its params and adapter (one for all, or one each), then run them all to
        completion."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _one_each(params or kind() if params is None or isinstance(params, kind) else params,
                                kind, len(prompt_list), kind.__name__)
        loras = _one_each(lora_request, LoRARequest, len(prompt_list), "LoRARequest")
        request_ids: list[str] = []
        try:
            for i, (prompt, one_params, lora) in enumerate(zip(prompt_list, params_list, loras)):
                request_id = str(next(self._ids))
                try:
                    self.engine.add_request(request_id, _prompt_value(prompt), one_params,
                                            output_kind=OutputKind.FINAL_ONLY, cache_salt=_cache_salt(prompt),
                                            lora_request=lora)
                except InvalidRequestError as exc:
                    raise InvalidRequestError(f"prompt {i}: {exc}", exc.param) from None
                request_ids.append(request_id)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None,
             lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (or ``chat_template``) to one conversation or a list of them and
        generate. Messages as OpenAI's (content a string or text parts, joined with newlines as the server does).
        ``tools`` (OpenAI's function tools) are passed to the template, as vLLM's ``LLM.chat`` does; the calls in
        the output are the model's text (the server's ``--tool-call-parser`` is what reads them).
        ``continue_final_message`` (with ``add_generation_prompt=False``): the model continues the last message.
        ``chat_template_kwargs``: the template's own variables."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt=False")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": _apply_chat_template(
            self.engine.tokenizer, [_template_message(m, f"conversation {i} message {j}") for j, m in enumerate(conv)],
            chat_template, add_generation_prompt, tools, continue_final_message, chat_template_kwargs)}
            for i, conv in enumerate(conversations)]
        return self.generate(prompts, sampling_params, lora_request, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[AnyRequestOutput]:
        from tqdm.auto import tqdm

        finished: dict[str, AnyRequestOutput] = {}
        wanted = set(request_ids)
        with tqdm(total=len(wanted), desc="Processed prompts", disable=not use_tqdm) as progress:
            try:
                while len(finished) < len(wanted):
                    for output in self.engine.step():
                        if output.finished and output.request_id in wanted:
                            finished[output.request_id] = output
                            progress.update(1)
            except BaseException:
                for request_id in wanted - finished.keys():
                    self.engine.abort_request(request_id)
                raise
        return [finished[r] for r in request_ids]


def _apply_chat_template(tokenizer: Any, conversation: list[dict[str, Any]], chat_template: str | None,
                         add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None,
                         continue_final_message: bool = False,
                         template_kwargs: dict[str, Any] | None = None) -> list[int]:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass chat_template")
    clash = sorted(renderer_parameters(tokenizer) & set(template_kwargs or ()))
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {clash[0]!r}: it is a parameter of apply_chat_template, "
                         "not a template variable")
    ids = tokenizer.apply_chat_template(conversation, tools=tools, chat_template=chat_template, tokenize=True,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message, **(template_kwargs or {}))
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _template_message(message: Any, where: str) -> dict[str, Any]:
    """A message as the template takes it: a dict with a string ``role``; OpenAI's text parts joined."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InvalidRequestError(f"{where} must be a dict with a 'role' (a string)", "messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise InvalidRequestError(f"{where}: only text content parts ({{\"type\": \"text\", \"text\": ...}}) "
                                      "are supported", "messages")
        message = {**message, "content": "\n".join(p["text"] for p in content)}
    return message


def _one_each(value: Any, kind: type, count: int, what: str) -> list[Any]:
    """``value`` for every prompt (one object or None), or the sequence of one per prompt (each ``kind`` or None)."""
    if value is None or isinstance(value, kind):
        return [value] * count
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, SequenceABC):
        raise TypeError(f"expected a {what}, or a list of one per prompt; got {type(value).__name__}")
    values = list(value)
    if len(values) != count:
        raise ValueError(f"got {count} prompts but {len(values)} {what} objects")
    for i, one in enumerate(values):
        if one is not None and not isinstance(one, kind):
            raise TypeError(f"{what} {i} is a {type(one).__name__}, not a {what}")
    return values


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, SequenceABC):
        raise TypeError(f"prompts must be a string, a prompt dict, token ids or a list of them; got "
                        f"{type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]   # one prompt given as token ids
    return prompts


_PROMPT_KEYS = ("prompt", "prompt_token_ids", "cache_salt")


def _cache_salt(prompt: PromptType) -> str | None:
    """A prompt dict's ``cache_salt`` (vLLM's TextPrompt / TokensPrompt key): its blocks are shared only with
    prompts of the same salt."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise InvalidRequestError(f"cache_salt must be a non-empty string, got {salt!r}", "cache_salt")
    return salt


def _prompt_value(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - set(_PROMPT_KEYS))
        if unknown:
            raise InvalidRequestError(f"a prompt dict takes {', '.join(_PROMPT_KEYS)}; not {', '.join(unknown)}",
                                      "prompt")
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if isinstance(ids, (str, bytes)) or not isinstance(ids, SequenceABC):
                raise InvalidRequestError(f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}",
                                          "prompt_token_ids")
            return list(ids)
        if "prompt" in prompt:
            if not isinstance(prompt["prompt"], str):
                raise InvalidRequestError(f"a prompt dict's 'prompt' is text; got {type(prompt['prompt']).__name__} "
                                          "(token ids go under 'prompt_token_ids')", "prompt")
            return prompt["prompt"]
        raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompt")
    return prompt
