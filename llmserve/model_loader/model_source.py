"""Where a model comes from, told without reading it. Light to import: the server's entry point asks before
torch loads, so it can start the engine core on a local checkpoint at once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmserve.config import EngineConfig


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def local_model_path(model: str | None) -> Path | None:
    """``model`` as a checkpoint folder or ``.gguf`` file on this machine; None when it must be fetched or
    generated first (a Hub id, an ``s3://`` prefix, the demo model)."""
    if model is None:
        return None
    path = Path(model).expanduser()
    return path if path.is_dir() or is_gguf(path) else None


def fill_in_default_model(config: EngineConfig) -> None:
    """No ``--model``: the demo checkpoint, generated on first use."""
    if config.model is None:
        from llmserve.testing.checkpoints import demo_model_path

        config.model = str(demo_model_path())
