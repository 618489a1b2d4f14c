"""Applying a bitmask equals the obvious per-token loop, on the rows asked for and no others; a batch
fill writes for each constrained row what its matcher would write alone."""

from __future__ import annotations

import pytest
import torch

from llmserve.structured_output import (
    allocate_token_bitmask,
    apply_token_bitmask,
    bitmask_width,
)


def _reference(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> torch.Tensor:
    out = logits.clone()
    for r in range(logits.shape[0]) if rows is None else rows:
        for t in range(logits.shape[1]):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


def _random_bitmask(generator, rows: int, vocab: int, extra_words: int = 0) -> torch.Tensor:
    shape = (rows, bitmask_width(vocab) + extra_words)
    return torch.randint(-2**31, 2**31, shape, dtype=torch.int32, generator=generator)


@pytest.mark.parametrize("vocab", [32, 100, 257])
@pytest.mark.parametrize("rows", [None, [0, 2, 3], [], [4]], ids=["all", "some", "none", "last"])
def test_apply_matches_the_reference(vocab, rows):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=generator)
    bitmask = _random_bitmask(generator, 6, vocab, extra_words=2)    # wider and taller than needed
    expected = _reference(logits, bitmask, rows)
    apply_token_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)


def test_unconstrained_rows_are_bit_for_bit_untouched():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, generator=generator)
    logits[1, 0] = -0.0
    before = logits.clone()
    apply_token_bitmask(logits, allocate_token_bitmask(4, 64, fill=0), rows=[0, 2])
    assert torch.isinf(logits[[0, 2]]).all()
    assert torch.equal(logits[[1, 3]].view(torch.int32), before[[1, 3]].view(torch.int32))


def test_all_allowed_and_none_allowed():
    logits = torch.randn(2, 40)
    expected = logits.clone()
    apply_token_bitmask(logits, allocate_token_bitmask(2, 40))
    assert torch.equal(logits, expected)
    apply_token_bitmask(logits, allocate_token_bitmask(2, 40, fill=0))
    assert torch.isneginf(logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_in_half_precision(dtype):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 70, generator=generator).to(dtype)
    bitmask = _random_bitmask(generator, 3, 70)
    expected = _reference(logits, bitmask, [1, 2])
    apply_token_bitmask(logits, bitmask, torch.tensor([1, 2]))
    assert logits.dtype == dtype and torch.equal(logits, expected)


def test_bitmask_that_does_not_cover_the_logits_is_refused():
    with pytest.raises(ValueError, match="does not cover"):
        apply_token_bitmask(torch.zeros(2, 65), allocate_token_bitmask(2, 64))
    with pytest.raises(ValueError, match="does not cover"):
        apply_token_bitmask(torch.zeros(3, 64), allocate_token_bitmask(2, 64))
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask(torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int64))


def test_batch_fill_writes_what_each_matcher_writes_alone(tokenizers, compilers):
    pytest.importorskip("llguidance")
    from llmserve.structured_output import GrammarBitmask, StructuredOutputSpec

    from .conftest import generate

    compiler = compilers("qwen2")
    tokenizer = tokenizers("qwen2")
    grammars = [compiler.compile(StructuredOutputSpec.regex(r"[0-9]{2,6}")),
                compiler.compile(StructuredOutputSpec.choice(["alpha", "beta"])),
                compiler.compile(StructuredOutputSpec.json_schema({"type": "array", "items": {"type": "boolean"}}))]
    matchers = [grammar.matcher() for grammar in grammars]
    for i, (grammar, matcher) in enumerate(zip(grammars, matchers)):
        tokens = generate(grammar, tokenizer, seed=i).token_ids
        assert matcher.accept_tokens(tokens[: i + 1])                  # each at its own position
    assert matchers[1].accept_tokens(generate(grammars[1], tokenizer, seed=1).token_ids[2:])
    assert matchers[1].is_terminated()

    batch = [matchers[0], None, matchers[1], None, matchers[2]]
    bitmask = GrammarBitmask(8, compiler.vocab_size, num_threads=2)
    bitmask.bitmask.fill_(7)
    rows = bitmask.fill(batch)
    assert rows == [0, 2, 4]
    for row, matcher in zip(rows, [matchers[0], matchers[1], matchers[2]]):
        alone = allocate_token_bitmask(1, compiler.vocab_size)
        matcher.fill_bitmask(alone, 0)
        assert torch.equal(bitmask.bitmask[row], alone[0])
    assert (bitmask.bitmask[[1, 3, 5, 6, 7]] == 7).all()              # rows of unconstrained sequences

    logits = torch.randn(len(batch), compiler.vocab_size)
    expected = _reference(logits, bitmask.bitmask, rows)
    bitmask.apply(logits, rows)
    assert torch.equal(logits, expected)

    with pytest.raises(ValueError, match="do not fit"):
        bitmask.fill([None] * 9)
