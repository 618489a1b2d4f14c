"""Grammar state on the CPU: one matcher per sequence, and the batch bitmask the matchers fill each step.

A :class:`CompiledGrammar` is immutable and shared by every sequence with the same spec; each sequence
gets its own :class:`GrammarMatcher` (a copy of the compiled template, tens of microseconds) that
follows the tokens the sequence commits. :class:`GrammarBitmask` fills the rows of the constrained
sequences of a batch in parallel (llguidance's executor runs without the GIL) and applies them to the
logits with :func:`~llmserve.structured_output.bitmask.apply_token_bitmask`.

A matcher is *terminated* once it has accepted a stop (EOS) token, which its grammar allows exactly
where the grammar may end: that token is the last the sequence may take.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance
import llguidance.torch
import torch

from llmserve.structured_output.bitmask import (
    allocate_token_bitmask,
    apply_token_bitmask,
)

if TYPE_CHECKING:
    from llmserve.structured_output.spec import StructuredOutputSpec


class CompiledGrammar:
    """A spec compiled for one tokenizer (made by :class:`~llmserve.structured_output.compiler.GrammarCompiler`)."""

    def __init__(
        self,
        spec: StructuredOutputSpec,
        template: llguidance.LLMatcher,
        stop_token_ids: Sequence[int],
        vocab_size: int,
    ) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset(stop_token_ids)
        self._template = template
        # The mask of a terminated matcher: only stop tokens, so a sequence kept running still parses.
        self._stop_row = allocate_token_bitmask(1, vocab_size, fill=0)[0]
        for token in self.stop_token_ids:
            self._stop_row[token // 32] |= _bit(token % 32)

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar, for one sequence."""
        return GrammarMatcher(self)


class GrammarMatcher:
    """Where one sequence stands in its grammar.

    Every method keeps the matcher usable: a token the grammar refuses is refused without a change of
    state (llguidance would otherwise enter an error state that nothing leaves), and rollback is bounded
    by what was accepted.
    """

    def __init__(self, grammar: CompiledGrammar) -> None:
        self.grammar = grammar
        self._matcher = grammar._template.deep_copy()
        self._num_tokens = 0
        self._terminated = False

    @property
    def num_tokens(self) -> int:
        """Tokens accepted so far (the stop token included), i.e. how far :meth:`rollback` can go."""
        return self._num_tokens

    def is_terminated(self) -> bool:
        """Whether a stop token was accepted: the sequence must end here."""
        return self._terminated

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance by ``token_ids`` if the grammar allows all of them, in order; else change nothing.

        A stop token is allowed only last, and only where the grammar may end; an id outside the
        vocabulary never.
        """
        if self._terminated:
            return not token_ids
        token_ids = list(token_ids)
        if any(not 0 <= token < self.grammar.vocab_size for token in token_ids):
            return False
        stops = self.grammar.stop_token_ids
        ends = bool(token_ids) and token_ids[-1] in stops
        body = token_ids[:-1] if ends else token_ids
        if any(token in stops for token in body):
            return False
        # The stop token never reaches llguidance, which keeps no count of it when its grammar has
        # already ended; so rollback counts stay ours and exact.
        consumed = self._matcher.try_consume_tokens(body)
        if consumed == len(body) and (not ends or self._matcher.is_accepting()):
            self._num_tokens += len(token_ids)
            self._terminated = ends
            return True
        if consumed:
            self._matcher.rollback(consumed)
        return False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (int32, CPU, bit t of the row = token t)."""
        if self._terminated:
            bitmask[row].copy_(self.grammar._stop_row)
        else:
            llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (rejected speculative tokens, a failed step)."""
        if not 0 <= num_tokens <= self._num_tokens:
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self._num_tokens} were accepted")
        if num_tokens == 0:
            return
        grammar_tokens = num_tokens
        if self._terminated:
            self._terminated = False
            grammar_tokens -= 1
        if grammar_tokens and not self._matcher.rollback(grammar_tokens):
            raise RuntimeError(f"grammar matcher failed to roll back: {self._matcher.get_error()}")
        self._num_tokens -= num_tokens

    def reset(self) -> None:
        """Back to the start of the grammar (a preempted sequence replays its tokens from here)."""
        self._matcher = self.grammar._template.deep_copy()
        self._num_tokens = 0
        self._terminated = False


class GrammarBitmask:
    """The bitmask of one step's batch: a reusable int32 buffer [max_rows, ceil(vocab/32)].

    Row i belongs to logits row i; only the rows of constrained sequences are filled and applied,
    so unconstrained rows of a mixed batch are left untouched. ``num_threads`` sizes llguidance's
    fill pool (None: its default, most of the cores).
    """

    def __init__(self, max_rows: int, vocab_size: int, num_threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.bitmask = allocate_token_bitmask(max_rows, vocab_size, pin_memory=torch.cuda.is_available())
        self._executor = llguidance.LLExecutor(num_threads)

    def fill(self, matchers: Sequence[GrammarMatcher | None]) -> list[int]:
        """Fill row i for each ``matchers[i]`` that is not None; return those rows (in order)."""
        if len(matchers) > self.bitmask.shape[0]:
            raise ValueError(f"{len(matchers)} rows do not fit a bitmask of {self.bitmask.shape[0]}")
        rows: list[int] = []
        running: list[tuple[llguidance.LLMatcher, int]] = []
        for row, matcher in enumerate(matchers):
            if matcher is None:
                continue
            if matcher.grammar.vocab_size != self.vocab_size:
                raise ValueError(
                    f"grammar of vocabulary {matcher.grammar.vocab_size} in a bitmask of {self.vocab_size}"
                )
            rows.append(row)
            if matcher.is_terminated():
                matcher.fill_bitmask(self.bitmask, row)
            else:
                running.append((matcher._matcher, row))
        if len(running) == 1:
            llguidance.torch.fill_next_token_bitmask(running[0][0], self.bitmask, running[0][1])
        elif running:
            llguidance.torch.fill_next_token_bitmask_par(self._executor, running, self.bitmask)
        return rows

    def apply(self, logits: torch.Tensor, rows: Sequence[int]) -> None:
        """Set the logits of the tokens the filled ``rows`` disallow to -inf, in place, in one call."""
        apply_token_bitmask(logits, self.bitmask[: logits.shape[0]], rows)


def _bit(position: int) -> int:
    """int32 value with only bit ``position`` set (bit 31 is the sign bit)."""
    return (1 << position) - (1 << 32 if position == 31 else 0)
