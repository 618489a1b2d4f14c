"""The driver's grammar state follows the worker's copy of the sequences (tiny Llama tokenizer, real llguidance).

* The grammar compiler is built when the first constrained sequence arrives, never for unconstrained ones, and
  a batch without constrained rows gets no bitmask.
* A sequence's matcher is made at its first sample and replays the tokens the sequence already has (a resumed
  sequence); one removed and sent again starts over from its tokens, not from the old matcher's state; a fork
  gets a matcher of its own.
* The bitmask rows are those of the constrained sequences, in the order of the sampled rows.
* A token the grammar refuses, or a grammar that does not compile, raises (the step fails), and the next try
  raises again rather than running the sequence unconstrained.
"""

from __future__ import annotations

import pytest
import torch

from llmserve.engine.messages import NewSequenceData, SchedulerOutput
from llmserve.sampling_params import SamplingParams
from llmserve.structured_output import StructuredOutputError, StructuredOutputSpec
from llmserve.worker.input_batch import InputBatch
from llmserve.worker.structured_output_manager import StructuredOutputManager

pytest.importorskip("llguidance")

LETTERS = StructuredOutputSpec.regex("[ a-z]{1,40}")


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture
def setup(tokenizer):
    from llmserve.structured_output import GrammarCompiler

    loads = []

    def load() -> GrammarCompiler:
        loads.append(1)
        return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])

    manager = StructuredOutputManager(load, max_num_seqs=2)
    return manager, InputBatch(torch.device("cpu"), 4, 2, 64, manager), loads


def new(seq_id: int, spec: StructuredOutputSpec | None, outputs: list[int] = ()) -> NewSequenceData:
    return NewSequenceData(seq_id, 0, [1, 5, 6], list(outputs), SamplingParams(structured_outputs=spec), 2,
                           [[0, 1]], 3)


def test_matchers_follow_the_sequences(setup, tokenizer):
    manager, batch, loads = setup
    words = tokenizer.encode("hello world", add_special_tokens=False)
    batch.update(SchedulerOutput(new_seqs=[new(1, None)]))
    assert manager.fill_bitmask([batch.seqs[1]]) is None and not loads
    batch.update(SchedulerOutput(new_seqs=[new(2, LETTERS, outputs=words)]))   # resumed after a preemption
    assert loads == [1]
    bitmask, rows = manager.fill_bitmask([batch.seqs[1], batch.seqs[2]])
    assert rows == [1]
    matcher = manager._matchers[2]
    assert matcher.num_tokens == len(words)
    assert bitmask[1].tolist() != [-1] * bitmask.shape[1]   # constrained: not every token allowed
    manager.accept([batch.seqs[1], batch.seqs[2]], [7, words[0]])
    assert matcher.num_tokens == len(words) + 1
    # dropped and sent again (preempted, or the step failed): a fresh matcher from the tokens it has
    batch.update(SchedulerOutput(finished_seq_ids=[2], new_seqs=[new(2, LETTERS, outputs=words)]))
    manager.fill_bitmask([batch.seqs[2]])
    assert manager._matchers[2] is not matcher and manager._matchers[2].num_tokens == len(words)
    child = batch.fork(batch.seqs[2], 3, 1)
    _, rows = manager.fill_bitmask([batch.seqs[2], child])
    assert rows == [0, 1] and manager._matchers[3] is not manager._matchers[2]
    batch.update(SchedulerOutput(finished_seq_ids=[2, 3]))
    assert not manager._matchers and loads == [1]


def test_refused_tokens_and_uncompilable_grammars_fail_the_step_every_time(setup, tokenizer):
    manager, batch, _ = setup
    batch.update(SchedulerOutput(new_seqs=[new(1, LETTERS), new(2, StructuredOutputSpec.regex("(a|b"))]))
    manager.fill_bitmask([batch.seqs[1]])
    upper = tokenizer.encode("Z", add_special_tokens=False)[-1]
    with pytest.raises(RuntimeError, match="allows no token"):
        manager.accept([batch.seqs[1]], [upper])
    for _ in range(2):
        with pytest.raises(StructuredOutputError, match="regex cannot be compiled"):
            manager.fill_bitmask([batch.seqs[2]])
