"""Per-request pooling parameters (vLLM's ``PoolingParams``): what an embedding request may change of the
engine's ``--pooler-config``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmserve.config import PoolerConfig
from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import truncation_problem


@dataclass(kw_only=True)
class PoolingParams:
    """``normalize``: L2-normalise the pooled vector (None: as ``--pooler-config`` says). The pooling type is
    the engine's ``--pooler-config`` alone, as in vLLM, where it belongs to the model."""

    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None   # as SamplingParams': keep the prompt's last k tokens

    def __post_init__(self) -> None:
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InvalidRequestError(f"normalize must be a boolean, got {self.normalize!r}", "normalize")
        problem = truncation_problem(self.truncate_prompt_tokens)
        if problem is not None:
            raise InvalidRequestError(problem, "truncate_prompt_tokens")

    def resolve(self, config: PoolerConfig) -> PoolerConfig:
        """The pooling this request gets: the engine's, with this request's overrides."""
        if self.normalize is None or self.normalize == config.normalize:
            return config
        return dataclasses.replace(config, normalize=self.normalize)
