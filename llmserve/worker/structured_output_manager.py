"""The driver worker's structured-output state: the grammar compiler, a matcher per constrained sequence, and
the step's token bitmask.

Grammars and matchers hold llguidance objects that do not cross processes, so they live where tokens are
sampled: the driver (tensor-parallel rank 0 of the last pipeline stage). Keeping them there, rather than in
the engine core as vLLM does, means no [rows, V/32] bitmask travels in every step's message, and on a GPU
the bitmask is filled on the CPU while the forward pass runs.

A matcher follows its sequence as the worker's copy of the sequences does (:class:`InputBatch`): when a
sequence with a constraint arrives (fresh, resumed after a preemption, resent after a failed step, or
forked for ``n > 1``) its grammar starts compiling in the compiler's threads (a cache hit for a spec seen
before); the first step that samples it waits for the grammar and makes a fresh matcher that replays the
tokens the sequence already has; every sampled token then advances it. A sequence the scheduler drops is
forgotten, and one it sends again starts over, so a matcher always stands where its sequence's tokens do,
even after a step that failed half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:   # llguidance is imported on the first constrained sequence only
    from llmserve.structured_output import CompiledGrammar, GrammarBitmask, GrammarCompiler, GrammarMatcher
    from llmserve.structured_output.spec import StructuredOutputSpec
    from llmserve.worker.input_batch import CachedSequence


class StructuredOutputManager:
    """Grammar matchers by sequence id, and the batch bitmask they fill.

    ``load_compiler`` builds the :class:`GrammarCompiler` (model vocabulary, the EOS ids the scheduler stops
    on) when the first constrained sequence arrives: deriving llguidance's token trie takes up to seconds for
    a large vocabulary, which servers that never see a constraint should not pay.
    """

    def __init__(self, load_compiler: Callable[[], GrammarCompiler], max_num_seqs: int) -> None:
        self._load_compiler = load_compiler
        self._max_num_seqs = max_num_seqs
        self._compiler: GrammarCompiler | None = None
        self._bitmask: GrammarBitmask | None = None
        self._compiling: dict[int, Future[CompiledGrammar]] = {}   # arrived, not sampled yet
        self._matchers: dict[int, GrammarMatcher] = {}

    def add(self, seq_id: int, spec: StructuredOutputSpec) -> None:
        """A sequence with a constraint arrived: start compiling its grammar (its matcher comes at its first sample)."""
        if self._compiler is None:
            self._compiler = self._load_compiler()
        self._matchers.pop(seq_id, None)
        self._compiling[seq_id] = self._compiler.compile_async(spec)

    def remove(self, seq_id: int) -> None:
        self._compiling.pop(seq_id, None)
        self._matchers.pop(seq_id, None)

    def fill_bitmask(self, seqs: Sequence[CachedSequence]) -> tuple[torch.Tensor, list[int]] | None:
        """The bitmask for this step's sampled rows (row i for ``seqs[i]``) and the constrained rows in it;
        None when no row is constrained. Raises if a grammar failed to compile (the step then fails, and the
        scheduler fails the request alone)."""
        if not self._compiling and not self._matchers:
            return None
        matchers = [self._matcher(seq) for seq in seqs]
        if not any(m is not None for m in matchers):
            return None
        assert self._compiler is not None
        if self._bitmask is None or self._bitmask.bitmask.shape[0] < len(seqs):
            # n > 1 forks can take a step past max_num_seqs rows
            from llmserve.structured_output import GrammarBitmask

            self._bitmask = GrammarBitmask(max(len(seqs), self._max_num_seqs), self._compiler.vocab_size)
        return self._bitmask.bitmask, self._bitmask.fill(matchers)

    def accept(self, seqs: Sequence[CachedSequence], tokens: Sequence[int]) -> None:
        """Advance each constrained sequence's matcher by the token sampled for it."""
        for seq, token in zip(seqs, tokens, strict=True):
            matcher = self._matchers.get(seq.seq_id)
            if matcher is not None and not matcher.accept_tokens([token]):
                raise RuntimeError(f"the grammar allows no token at output position {len(seq.output_token_ids)} "
                                   f"(sampled {token} from a row it masked entirely)")

    def _matcher(self, seq: CachedSequence) -> GrammarMatcher | None:
        matcher = self._matchers.get(seq.seq_id)
        if matcher is None and seq.seq_id in self._compiling:
            grammar = self._compiling[seq.seq_id].result()   # StructuredOutputError if it did not compile
            matcher = grammar.matcher()
            if not matcher.accept_tokens(seq.output_token_ids):
                raise RuntimeError(f"the grammar refuses the {len(seq.output_token_ids)} tokens the sequence "
                                   "already has")
            del self._compiling[seq.seq_id]
            self._matchers[seq.seq_id] = matcher
        return matcher
