"""A matcher follows one sequence through its grammar and is never left in a state it cannot leave:
refused tokens change nothing, rollback and reset restore earlier masks exactly, and a terminated
matcher allows only stop tokens."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llguidance")

from llmserve.structured_output import (
    GrammarBitmask,
    GrammarCompiler,
    StructuredOutputSpec,
)

from .conftest import generate

SCHEMA = StructuredOutputSpec.json_schema({
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
})


def _mask(matcher) -> torch.Tensor:
    bitmask = GrammarBitmask(1, matcher.grammar.vocab_size, num_threads=1)
    bitmask.fill([matcher])
    return bitmask.bitmask[0].clone()


def _allowed(mask: torch.Tensor) -> set[int]:
    return {t for t in range(mask.shape[0] * 32) if (int(mask[t // 32]) >> (t % 32)) & 1}


@pytest.fixture
def setup(family, tokenizers, compilers):
    """(compiled grammar, a complete generation of it: its tokens end with the stop token)."""
    grammar = compilers(family).compile(SCHEMA)
    gen = generate(grammar, tokenizers(family), seed=0)
    assert gen.terminated
    return grammar, gen.token_ids


def test_refused_tokens_change_nothing(setup):
    grammar, tokens = setup
    matcher = grammar.matcher()
    assert matcher.accept_tokens(tokens[:3])
    before = _mask(matcher)
    refused = min(set(range(grammar.vocab_size)) - _allowed(before))
    assert not matcher.accept_tokens([refused])
    assert not matcher.accept_tokens([tokens[3], refused])           # a valid prefix is not kept either
    assert not matcher.accept_tokens([grammar.vocab_size])            # outside the vocabulary
    assert not matcher.accept_tokens([-1])
    assert torch.equal(_mask(matcher), before)
    assert matcher.num_tokens == 3
    assert matcher.accept_tokens(tokens[3:])                          # and the sequence goes on
    assert matcher.is_terminated()


def test_stop_token_only_last_and_only_where_the_grammar_may_end(setup):
    grammar, tokens = setup
    eos = tokens[-1]
    matcher = grammar.matcher()
    assert not matcher.accept_tokens([eos])                           # nothing generated yet
    assert not matcher.accept_tokens(tokens[:2] + [eos])              # the object is not closed
    assert not matcher.accept_tokens([*tokens[:-1], eos, eos])       # a stop token in the middle
    assert matcher.num_tokens == 0 and not matcher.is_terminated()
    assert matcher.accept_tokens(tokens)                              # several tokens at once, as a draft
    assert matcher.is_terminated()


def test_terminated_matcher_allows_only_stop_tokens(setup):
    grammar, tokens = setup
    matcher = grammar.matcher()
    assert matcher.accept_tokens(tokens)
    assert _allowed(_mask(matcher)) == set(grammar.stop_token_ids)
    assert not matcher.accept_tokens([tokens[0]])
    assert matcher.accept_tokens([])


def test_rollback_restores_the_earlier_masks(setup):
    grammar, tokens = setup
    matcher = grammar.matcher()
    masks = [_mask(matcher)]
    for token in tokens:
        assert matcher.accept_tokens([token])
        masks.append(_mask(matcher))
    matcher.rollback(1)                                               # the stop token
    assert not matcher.is_terminated()
    assert torch.equal(_mask(matcher), masks[-2])
    matcher.rollback(3)
    assert matcher.num_tokens == len(tokens) - 4
    assert torch.equal(_mask(matcher), masks[-5])
    assert matcher.accept_tokens(tokens[-4:])                         # replaying gives the same end
    assert matcher.is_terminated()
    with pytest.raises(ValueError, match="cannot roll back"):
        matcher.rollback(len(tokens) + 1)
    matcher.rollback(len(tokens))
    assert torch.equal(_mask(matcher), masks[0])


def test_reset_starts_over(setup):
    grammar, tokens = setup
    matcher = grammar.matcher()
    start = _mask(matcher)
    assert matcher.accept_tokens(tokens)
    matcher.reset()
    assert matcher.num_tokens == 0 and not matcher.is_terminated()
    assert torch.equal(_mask(matcher), start)
    assert matcher.accept_tokens(tokens) and matcher.is_terminated()


def test_matchers_of_one_grammar_are_independent(setup):
    grammar, tokens = setup
    first, second = grammar.matcher(), grammar.matcher()
    assert first.accept_tokens(tokens[:4])
    assert second.num_tokens == 0
    assert torch.equal(_mask(second), _mask(grammar.matcher()))


def test_every_stop_token_of_the_model_ends_the_grammar(family, tokenizers):
    tokenizer = tokenizers(family)
    other_stop = len(tokenizer) - 1          # e.g. Llama 3's <|eot_id|> beside <|end_of_text|>
    compiler = GrammarCompiler(tokenizer, eos_token_ids=[tokenizer.eos_token_id, other_stop])
    try:
        grammar = compiler.compile(StructuredOutputSpec.choice(["yes", "no"]))
        gen = generate(grammar, tokenizer, seed=0)
        matcher = grammar.matcher()
        assert matcher.accept_tokens(gen.token_ids[:-1])
        assert _allowed(_mask(matcher)) == {tokenizer.eos_token_id, other_stop}
        assert matcher.accept_tokens([other_stop]) and matcher.is_terminated()
    finally:
        compiler.shutdown()
