"""Fixtures: the real tokenizers of generated checkpoints, a compiler per tokenizer, and a random "model".

The model is random logits from a seeded generator, sampled under the grammar's bitmask: it knows
nothing, so whatever structure its output has comes from the grammar alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch
from transformers import AutoTokenizer

if TYPE_CHECKING:   # llguidance is imported by the tests that need it (the spec's do not)
    from llmserve.structured_output import CompiledGrammar

# Both tokenizer kinds the project generates: sentencepiece-style BPE with byte fallback, and byte-level BPE.
FAMILIES = ["llama", "qwen2"]
# The model's vocabulary is padded past the tokenizer's, as real checkpoints often are.
VOCAB_PADDING = 48
MAX_TOKENS = 1500


@pytest.fixture(scope="session")
def tokenizers(checkpoint_dir):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = AutoTokenizer.from_pretrained(checkpoint_dir(family))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def compilers(tokenizers):
    from llmserve.structured_output import GrammarCompiler

    cache: dict[str, GrammarCompiler] = {}

    def get(family: str) -> GrammarCompiler:
        if family not in cache:
            tokenizer = tokenizers(family)
            cache[family] = GrammarCompiler(tokenizer, vocab_size=len(tokenizer) + VOCAB_PADDING)
        return cache[family]

    yield get
    for compiler in cache.values():
        compiler.shutdown()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@dataclass
class Generation:
    token_ids: list[int]    # the stop token included, when the grammar ended
    text: str               # the output text before the stop token, decoded as the engine would
    terminated: bool


def generate(grammar: CompiledGrammar, tokenizer, seed: int, max_tokens: int = MAX_TOKENS) -> Generation:
    """Sample from random logits under ``grammar`` until it terminates (or ``max_tokens``)."""
    from llmserve.structured_output import GrammarBitmask

    generator = torch.Generator().manual_seed(seed)
    bitmask = GrammarBitmask(1, grammar.vocab_size, num_threads=1)
    matcher = grammar.matcher()
    tokens: list[int] = []
    while not matcher.is_terminated() and len(tokens) < max_tokens:
        logits = torch.randn(1, grammar.vocab_size, generator=generator) * 2
        bitmask.apply(logits, bitmask.fill([matcher]))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        assert matcher.accept_tokens([token]), f"the grammar refused token {token} that its own mask allowed"
        tokens.append(token)
    body = tokens[:-1] if matcher.is_terminated() else tokens
    return Generation(tokens, decode(tokenizer, body), matcher.is_terminated())


def decode(tokenizer, token_ids: list[int]) -> str:
    """The output's text after a prompt, as the engine's detokenizer defines it (a sentencepiece
    tokenizer drops the leading space of a sequence's first token, not of a continuation's)."""
    prompt = tokenizer.encode("Answer:")
    full = tokenizer.decode(prompt + token_ids, skip_special_tokens=True)
    return full[len(tokenizer.decode(prompt, skip_special_tokens=True)):]
