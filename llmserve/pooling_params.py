"""Per-request pooling parameters (vLLM's ``PoolingParams``): what an embedding request may change of the
engine's ``--pooler-config``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmserve.config import PoolerConfig
from llmserve.errors import InvalidRequestError


@dataclass(kw_only=True)
class PoolingParams:
    """``normalize``: L2-normalise the pooled vector (None: as ``--pooler-config`` says). The pooling type is
    the engine's ``--pooler-config`` alone, as in vLLM, where it belongs to the model."""

    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InvalidRequestError(f"normalize must be a boolean, got {self.normalize!r}", "normalize")

    def resolve(self, config: PoolerConfig) -> PoolerConfig:
        """The pooling this request gets: the engine's, with this request's overrides."""
        if self.normalize is None or self.normalize == config.normalize:
            return config
        return dataclasses.replace(config, normalize=self.normalize)
