"""The front end's half of admission: what it knows of the model, and turning a prompt into a core request.

:class:`ModelInfo` reads the checkpoint's config and tokenizer (no weights), so a front end in its own
process knows the vocabulary, the context length and the EOS ids without loading the model. The engine core
needs only the config's half (:class:`ModelConfigInfo`: dtype, context length, batch budget), so it never
loads (or fetches) a tokenizer.
:class:`InputProcessor` tokenises and validates a request and names the field of anything wrong with it
(:class:`~llmserve.errors.InvalidRequestError`), before anything is queued.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from llmserve.config import EngineConfig, resolve_dtype_and_reason
from llmserve.distributed.model_fit import check_parallel_fit
from llmserve.engine.block_manager import most_blocks_held
from llmserve.engine.messages import EngineCoreRequest
from llmserve.errors import InvalidRequestError
from llmserve.layers.longrope import longrope_prompt_key, longrope_switch_of
from llmserve.lora.fit import AdapterChecker
from llmserve.lora.peft import LoRAAdapterError
from llmserve.lora.request import LoRARequest
from llmserve.model_loader.loader import checkpoint_dtype, load_config, resolve_model_path
from llmserve.model_loader.model_source import fill_in_default_model
from llmserve.models.registry import resolve_model_class
from llmserve.pooling_params import PoolingParams
from llmserve.quantization.registry import checkpoint_quantization
from llmserve.sampling_params import SamplingParams
from llmserve.structured_output import StructuredOutputError, import_backend
from llmserve.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


class ModelConfigInfo:
    """The checkpoint's config and the limits derived from it (``config.model`` is resolved in place)."""

    def __init__(self, config: EngineConfig, model_path: Path | None = None) -> None:
        """``model_path``: ``config.model`` already resolved (fetched) by the caller."""
        fill_in_default_model(config)
        self.config = config
        self.device = config.torch_device
        path = model_path or resolve_model_path(config.model, config.revision, config.download_dir)
        self.model_path = path
        self.hf_config = load_config(path, config.trust_remote_code, config.revision)
        resolve_model_class(self.hf_config)   # fail on an unsupported architecture before anything heavy
        check_parallel_fit(self.hf_config, config.tensor_parallel_size, config.pipeline_parallel_size)
        self.dtype, self.dtype_reason = resolve_dtype_and_reason(
            config.dtype, checkpoint_dtype(self.hf_config), self.device,
            quantized=config.quantization is not None or checkpoint_quantization(self.hf_config) is not None)
        # Resolved once, here: every worker (in this process or another) then loads the same dtype.
        config.dtype = str(self.dtype).removeprefix("torch.")
        self.vocab_size = int(self.hf_config.vocab_size)
        self.max_model_len = self._max_model_len()
        self.longrope_switch = longrope_switch_of(self.hf_config)
        self.max_num_batched_tokens = config.max_num_batched_tokens or (
            DEFAULT_MAX_NUM_BATCHED_TOKENS if config.enable_chunked_prefill
            else max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_model_len))
        if not config.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) is smaller than "
                             f"--max-model-len ({self.max_model_len}) with chunked prefill disabled: "
                             "long prompts could never be scheduled")

    def log_dtype_choice(self) -> None:
        """Log what ``--dtype auto`` chose on CPU and why; called once the engine core has started, so that a
        configuration error is the only line a failed start prints."""
        if self.dtype_reason is not None:
            logger.info("--dtype auto: %s on this CPU: %s", self.config.dtype, self.dtype_reason)

    def _max_model_len(self) -> int:
        # ALiBi models (BLOOM) have no position table: their configs give the trained length as seq_length.
        derived = int(getattr(self.hf_config, "max_position_embeddings", 0)
                      or getattr(self.hf_config, "seq_length", 0) or 0) or None
        requested = self.config.max_model_len
        if requested is None:
            if derived is None:
                raise ValueError("config.json has neither max_position_embeddings nor seq_length: pass "
                                 "--max-model-len")
            return derived
        if derived is not None and requested > derived:
            raise ValueError(f"--max-model-len {requested} is larger than the model's maximum context "
                             f"length ({derived} tokens)")
        return requested


class ModelInfo(ModelConfigInfo):
    """:class:`ModelConfigInfo` and the tokenizer with the EOS ids: what a front end needs to admit requests."""

    def __init__(self, config: EngineConfig, model_path: Path | None = None) -> None:
        super().__init__(config, model_path)
        self.tokenizer_path: Path | str = self.model_path
        if config.tokenizer:
            self.tokenizer_path = resolve_model_path(config.tokenizer, config.tokenizer_revision, config.download_dir)
        self.tokenizer = self.load_tokenizer()
        self.eos_token_id = self._eos_token_id()
        self.extra_eos_token_ids = self._extra_eos_token_ids(self.model_path)
        self.adapters = AdapterChecker(self.model_path, config.max_lora_rank)   # LoRA adapters, read once each

    def load_tokenizer(self) -> Any:
        """A new tokenizer instance (one per thread that uses it: fast tokenizers are not thread-safe)."""
        return load_tokenizer(self.tokenizer_path, self.config.tokenizer_revision, self.config.trust_remote_code)

    def _eos_token_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.hf_config, "eos_token_id", None)
            if isinstance(eos, list):
                eos = eos[0] if eos else None
        return eos

    def _extra_eos_token_ids(self, path: Path) -> list[int]:
        """EOS ids of config.json / generation_config.json other than the tokenizer's (Qwen's <|endoftext|>,
        Llama 3's <|end_of_text|>); like vLLM, every request gets them as stop_token_ids unless ignore_eos."""
        sources = [getattr(self.hf_config, "eos_token_id", None)]
        generation_config = path / "generation_config.json"
        if generation_config.is_file():
            sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
        ids: list[int] = []
        for eos in sources:
            for token in (eos if isinstance(eos, list) else [eos]):
                if isinstance(token, int) and token != self.eos_token_id and token not in ids:
                    ids.append(token)
        return ids

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a request unless ``ignore_eos``: where a grammar may end, it allows exactly these."""
        return ([] if self.eos_token_id is None else [self.eos_token_id]) + self.extra_eos_token_ids


class InputProcessor:
    """Tokenises and validates requests against the model and the engine core's KV-cache size."""

    def __init__(self, info: ModelInfo, num_kv_blocks: int, block_size: int,
                 group_windows: list[int | None] | None = None) -> None:
        """``group_windows``: the block manager's, each KV-cache group's window (None: full attention; a
        sliding group holds only its window's blocks of a request, however long it gets)."""
        self.info = info
        self.tokenizer = info.tokenizer
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.group_windows = group_windows or [None]
        self._grammar_validator: Any = None   # checks constraints against the vocabulary (needs the grammar library)
        self._grammar_lock = threading.Lock()

    def grammar_validator(self, tokenizer: Any = None) -> Any:
        """The checker of constraints against this model's vocabulary, built at the first call from
        ``tokenizer`` (default: this processor's; another thread passes its own instance). It reads the whole
        vocabulary: the server builds it at start-up, off its event loop. ImportError without the grammar
        library."""
        with self._grammar_lock:
            if self._grammar_validator is None:
                self._grammar_validator = import_backend("compiler").GrammarValidator(
                    tokenizer or self.tokenizer, self.info.vocab_size, self.info.eos_token_ids)
            return self._grammar_validator

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams | PoolingParams | None,
                arrival_time: float | None, cache_salt: str | None,
                lora_request: LoRARequest | None = None) -> tuple[str | None, EngineCoreRequest]:
        """The prompt's text (None for token ids) and the request for the core (a pooling request with
        :class:`PoolingParams`); raises :class:`InvalidRequestError` naming the field."""
        params = params or SamplingParams()
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError("cache_salt must be a non-empty string", "cache_salt")
        if lora_request is not None:
            self._check_lora(lora_request)
        prompt_text, prompt_ids = self._tokenize(prompt)
        keep = params.truncate_prompt_tokens
        keep = self.info.max_model_len if keep == -1 else keep
        if keep is not None and len(prompt_ids) > keep:   # vLLM's left truncation: the prompt's last tokens
            prompt_text, prompt_ids = None, prompt_ids[-keep:]
        arrival = time.monotonic() if arrival_time is None else arrival_time
        if isinstance(params, PoolingParams):
            request = self._pooling_request(request_id, prompt_ids, params, arrival, cache_salt)
            request.lora_request = lora_request
            return prompt_text, request
        params.verify(self.info.vocab_size, self.info.config.max_logprobs)
        if params.structured_outputs is not None:
            params = self._check_structured_outputs(params)
        extra_eos = [t for t in self.info.extra_eos_token_ids if t not in params.stop_token_ids]
        if extra_eos and not params.ignore_eos:
            params = params.clone()   # the caller's object is not changed
            params.stop_token_ids = params.stop_token_ids + extra_eos
        max_tokens = self._resolve_max_tokens(len(prompt_ids), params.max_tokens)
        needed = self._blocks_held(len(prompt_ids), len(prompt_ids) + max_tokens)
        if needed > self.num_kv_blocks:
            raise InvalidRequestError(
                f"this request needs {needed} KV-cache blocks ({len(prompt_ids)} prompt + {max_tokens} completion "
                f"tokens) but the whole cache holds {self.num_kv_blocks}; lower max_tokens or give the "
                "cache more memory (--kv-cache-memory-bytes)", "max_tokens")
        return prompt_text, EngineCoreRequest(request_id, prompt_ids, params, max_tokens, self.info.eos_token_id,
                                              arrival, cache_salt, kv_variant=self._kv_variant(prompt_ids),
                                              lora_request=lora_request)

    def _check_lora(self, lora_request: LoRARequest) -> None:
        """LoRA must be on and the adapter readable, within --max-lora-rank and fitting the base model's modules
        (:class:`~llmserve.lora.fit.AdapterChecker`, shared with the server, which checks an adapter when it
        registers it); read once per adapter, before anything runs."""
        if not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError("lora_request must be a llmserve.lora.request.LoRARequest", "lora_request")
        if not self.info.config.enable_lora:
            raise InvalidRequestError(f"LoRA adapter {lora_request.lora_name!r} requested but LoRA is not enabled: "
                                      "start the engine with --enable-lora (LLM(enable_lora=True))", "lora_request")
        try:
            self.info.adapters.check(lora_request.lora_path, lora_request.lora_name)
        except LoRAAdapterError as exc:
            raise InvalidRequestError(str(exc), "lora_request") from None

    def _pooling_request(self, request_id: str, prompt_ids: list[int], params: PoolingParams, arrival: float,
                         cache_salt: str | None) -> EngineCoreRequest:
        """A prompt to pool: it must fit the context and the KV cache, as a prompt to complete must. It
        samples nothing, so its sampling params are the defaults with ``max_tokens`` 0."""
        limit = self.info.max_model_len
        if len(prompt_ids) > limit:
            raise InvalidRequestError(f"This model's maximum context length is {limit} tokens. However, the input "
                                      f"has {len(prompt_ids)} tokens. Please reduce the length of the input.",
                                      "prompt")
        needed = self._blocks_held(len(prompt_ids), len(prompt_ids))
        if needed > self.num_kv_blocks:
            raise InvalidRequestError(f"this input needs {needed} KV-cache blocks ({len(prompt_ids)} tokens) but the "
                                      f"whole cache holds {self.num_kv_blocks}; give the cache more memory "
                                      "(--kv-cache-memory-bytes)", "prompt")
        return EngineCoreRequest(request_id, prompt_ids, SamplingParams(max_tokens=0), 0, None, arrival, cache_salt,
                                 params.resolve(self.info.config.pooler_config), self._kv_variant(prompt_ids))

    def _fitting_max_tokens(self, prompt_len: int, most: int) -> int:
        """A request without ``max_tokens`` may run to the context's end, or to the most tokens the whole KV
        cache can hold beside its prompt where that is fewer (a cache smaller than one --max-model-len
        sequence would otherwise refuse every such request); ``most`` if even one token does not fit (the
        caller's check then refuses the prompt)."""
        if self._blocks_held(prompt_len, prompt_len + most) <= self.num_kv_blocks:
            return most
        low, high = 0, most   # blocks held grow with the tokens: the largest count that fits
        while low < high:
            mid = (low + high + 1) // 2
            if self._blocks_held(prompt_len, prompt_len + mid) <= self.num_kv_blocks:
                low = mid
            else:
                high = mid - 1
        return low or most

    def _blocks_held(self, num_prompt_tokens: int, num_tokens: int) -> int:
        spec = self.info.config.speculative_config
        return most_blocks_held(self.block_size, self.group_windows, num_prompt_tokens, num_tokens,
                                self.info.max_num_batched_tokens, self.info.config.enable_chunked_prefill,
                                spec.num_lookahead_slots if spec is not None else 0)

    def _kv_variant(self, prompt_ids: list[int]) -> str | None:
        """What besides its tokens decides the keys a prompt's blocks hold (see ``EngineCoreRequest.kv_variant``)."""
        return longrope_prompt_key(self.info.longrope_switch, len(prompt_ids))

    def _check_structured_outputs(self, params: SamplingParams) -> SamplingParams:
        """Refuse a constraint the grammar library cannot compile (the server has already named its own field;
        this covers the offline API) and apply ``--structured-outputs-config``'s ``disable_any_whitespace``."""
        spec = params.structured_outputs
        assert spec is not None
        if not self.info.eos_token_ids:
            raise InvalidRequestError("structured outputs need a model with an EOS token to end the output",
                                      "structured_outputs")
        try:
            spec.validate()
            self.grammar_validator().validate(spec)
        except StructuredOutputError as exc:
            raise StructuredOutputError(str(exc), exc.param or "structured_outputs") from None
        applied = self.info.config.structured_outputs_config.applied_to(spec)
        if applied is not spec:
            params = params.clone()   # the caller's object is not changed
            params.structured_outputs = applied
        return params

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", "prompt")
            ids = list(self.tokenizer.encode(prompt))
            if not ids:
                raise InvalidRequestError("prompt has no tokens once tokenised", "prompt")
            return prompt, ids
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("prompt must be a string or a list of token ids (integers)", "prompt")
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        bad = [t for t in prompt if not 0 <= t < self.info.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is out of range [0, {self.info.vocab_size})",
                                      "prompt")
        return None, list(prompt)

    def _resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        limit = self.info.max_model_len
        if max_tokens == 0 and prompt_len <= limit:
            return 0   # the prompt alone (scoring it): it may fill the context
        if prompt_len >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_len} "
                "tokens, which leaves no room for a completion. Please reduce the length of the prompt.", "prompt")
        if max_tokens is None:
            return self._fitting_max_tokens(prompt_len, limit - prompt_len)
        if prompt_len + max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or completion.", "max_tokens")
        return max_tokens
