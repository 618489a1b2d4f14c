"""A draft model for the draft-model tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.testing.checkpoints import write_checkpoint


@pytest.fixture(scope="session")
def small_draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer, narrower Llama (other random weights) with the tiny Llama's tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("draft") / "m", family="llama", size="tiny-draft", seed=1)
