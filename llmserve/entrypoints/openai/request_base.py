"""The base of every request body: OpenAI's explicit nulls mean "absent", unknown fields are ignored and
logged once per name (as OpenAI's API and vLLM do)."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger("llmserve.api")

MAX_LOGGED_UNKNOWN_FIELDS = 256   # distinct unknown names logged; a client cannot grow the set without bound

_logged_unknown: set[str] = set()


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_and_unknown_fields(cls, data: Any) -> Any:
        """OpenAI's optional parameters are "X or null", and clients do send ``"n": null``,
        ``"stream": null``...: an explicit null means the default, as if the field were absent. Unknown
        fields are logged (once per name) and ignored."""
        if not isinstance(data, dict):
            return data
        known = {field.alias or name for name, field in cls.model_fields.items()}
        for name in data.keys() - known - _logged_unknown:
            if len(_logged_unknown) < MAX_LOGGED_UNKNOWN_FIELDS and isinstance(name, str):
                _logged_unknown.add(name)
                logger.warning("request field %r is not a field llmserve knows; it is ignored (logged once)",
                               name[:100])
        return {key: value for key, value in data.items() if value is not None}
