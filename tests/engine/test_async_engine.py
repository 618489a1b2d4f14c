"""The API server's engine builds the front end's grammar checker ahead of the first constrained request, off
the event loop and from its own tokenizer instance (the loop encodes prompts with the other one; fast
tokenizers are not thread-safe); without the grammar library nothing is built and nothing fails."""

from __future__ import annotations

import pytest

from llmserve.config import EngineConfig
from llmserve.engine import async_engine
from llmserve.engine.input_processor import InputProcessor, ModelInfo
from llmserve.structured_output import StructuredOutputSpec


@pytest.fixture
def inputs(checkpoint_dir) -> InputProcessor:
    info = ModelInfo(EngineConfig(model=str(checkpoint_dir("llama"))))
    return InputProcessor(info, num_kv_blocks=64, block_size=16)


def test_the_grammar_checker_is_built_once_from_its_own_tokenizer(inputs, monkeypatch):
    pytest.importorskip("llguidance")
    loaded = []
    original = inputs.info.load_tokenizer
    monkeypatch.setattr(inputs.info, "load_tokenizer", lambda: loaded.append(original()) or loaded[-1])
    async_engine._build_grammar_validator(inputs)
    assert len(loaded) == 1 and loaded[0] is not inputs.tokenizer
    validator = inputs.grammar_validator()
    assert validator is not None and inputs.grammar_validator() is validator   # the first request finds it built
    validator.validate(StructuredOutputSpec(kind="regex", value="[ab]+"))


def test_without_the_grammar_library_nothing_is_built(inputs, monkeypatch):
    def missing(module: str):
        raise ImportError("structured outputs need the llguidance package")

    monkeypatch.setattr("llmserve.engine.input_processor.import_backend", missing)
    async_engine._build_grammar_validator(inputs)   # no error at start-up
    with pytest.raises(ImportError, match="llguidance"):   # the constrained request says what is missing
        inputs.grammar_validator()
