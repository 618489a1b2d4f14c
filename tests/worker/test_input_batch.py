"""The worker's persistent input batch: rows patched from scheduler messages, step inputs gathered from them."""

import numpy as np
import torch

from llmserve.engine.messages import CachedSequenceData, NewSequenceData, SchedulerOutput
from llmserve.lora.request import LoRARequest
from llmserve.sampling_params import SamplingParams
from llmserve.worker.input_batch import InputBatch

BS = 4


def new(seq_id: int, prompt: list[int], blocks: list[int], computed: int = 0, outputs: list[int] | None = None,
        lora: LoRARequest | None = None, **params) -> NewSequenceData:
    return NewSequenceData(seq_id, 0, prompt, outputs or [], SamplingParams(max_tokens=8, **params), None, [blocks],
                           computed, lora_request=lora)


def batch(**kwargs) -> InputBatch:
    return InputBatch(torch.device("cpu"), BS, **kwargs)


def test_prefill_then_decode_inputs_come_from_the_rows():
    b = batch()
    b.update(SchedulerOutput(new_seqs=[new(1, [10, 11, 12, 13, 14], [7, 3])]))
    step = b.prepare({1: 5})
    assert step.input_ids.tolist() == [10, 11, 12, 13, 14]
    assert step.positions.tolist() == [0, 1, 2, 3, 4]
    assert step.slot_mapping[0].tolist() == [28, 29, 30, 31, 12]
    assert step.sample_rows == [4] and [s.seq_id for s in step.sample_seqs] == [1]
    assert step.block_tables[0].tolist() == [[7, 3]]

    b.update(SchedulerOutput(cached_seqs=[CachedSequenceData(1, [99], 2, [[]], 5)]))
    step = b.prepare({1: 1})
    assert (step.input_ids.tolist(), step.positions.tolist(), step.slot_mapping[0].tolist()) == ([99], [5], [13])
    assert step.num_decodes == 1 and step.context_lens == [5]
    assert b.seqs[1].output_token_ids == [99]


def test_decodes_come_first_in_a_stable_order_and_chunks_sample_only_at_their_end():
    b = batch()
    b.update(SchedulerOutput(new_seqs=[new(1, list(range(10)), [0, 1, 2]), new(2, [5, 6], [4], computed=1),
                                       new(3, [8, 9], [5], computed=1)]))
    step = b.prepare({1: 4, 2: 1, 3: 1})   # seq 1: the first chunk of its prompt
    assert step.seq_ids == [2, 3, 1]
    assert step.query_lens == [1, 1, 4] and step.context_lens == [1, 1, 0] and step.num_decodes == 2
    assert step.input_ids.tolist() == [6, 9, 0, 1, 2, 3]
    assert [s.seq_id for s in step.sample_seqs] == [2, 3] and step.sample_rows == [0, 1]
    # Rows are cut to the step's widest sequence (seq 1's first chunk needs one block), padded with 0.
    assert step.block_tables[0].tolist() == [[4], [5], [0]]


def test_copy_on_write_replaces_the_table_tail_and_freed_rows_are_reused_clean():
    b = batch(max_num_seqs=1)
    b.update(SchedulerOutput(new_seqs=[new(1, list(range(6)), [2, 3], computed=6)]))
    b.update(SchedulerOutput(cached_seqs=[CachedSequenceData(1, [], 1, [[9]], 6)]))
    assert b.block_ids(1) == [[2, 9]]
    b.update(SchedulerOutput(finished_seq_ids=[1], new_seqs=[new(2, [1], [4])]))
    row = b.block_tables[0, b.seqs[2].row]
    assert b.block_ids(2) == [[4]] and row.tolist() == [4] + [0] * (len(row) - 1)


def test_rows_and_columns_grow_past_their_first_allocation():
    b = batch(max_num_seqs=1, max_model_len=4)
    prompts = {i: list(range(100 * i, 100 * i + 9)) for i in (1, 2, 3)}
    b.update(SchedulerOutput(new_seqs=[new(i, p, [3 * i, 3 * i + 1, 3 * i + 2]) for i, p in prompts.items()]))
    step = b.prepare({1: 9, 2: 9, 3: 9})
    assert step.input_ids.tolist() == prompts[1] + prompts[2] + prompts[3]
    assert step.slot_mapping[0][9:18].tolist() == [24, 25, 26, 27, 28, 29, 30, 31, 32]


def test_a_fork_copies_its_parents_row_and_forgets_it_independently():
    b = batch()
    b.update(SchedulerOutput(new_seqs=[new(1, [1, 2, 3], [6], computed=3, outputs=[4])]))
    child = b.fork(b.seqs[1], 2, 1)
    b.update(SchedulerOutput(finished_seq_ids=[1], cached_seqs=[CachedSequenceData(2, [5], 1, [[8]], 4)]))
    step = b.prepare({2: 1})
    assert child.output_token_ids == [4, 5] and step.input_ids.tolist() == [5] and step.slot_mapping[0].tolist() == [32]
    assert b.block_ids(2) == [[6, 8]]


def test_prompt_logprob_rows_are_listed_until_the_prompt_is_computed():
    b = batch()
    b.update(SchedulerOutput(new_seqs=[new(1, list(range(8)), [0, 1], prompt_logprobs=1), new(2, [3, 4], [2])]))
    step = b.prepare({2: 2, 1: 4})
    assert [(s.seq_id, flat, start, n) for s, flat, start, n in step.prompt_rows] == [(1, 2, 0, 4)]
    b.update(SchedulerOutput(cached_seqs=[CachedSequenceData(1, [], 2, [[]], 4)]))
    assert [(flat, start, n) for _, flat, start, n in b.prepare({1: 4}).prompt_rows] == [(0, 4, 4)]
    b.update(SchedulerOutput(cached_seqs=[CachedSequenceData(1, [9], 2, [[]], 8)]))
    assert b.prepare({1: 1}).prompt_rows == []
    assert np.array_equal(b.prepare({1: 1}).input_ids, [9])


def test_rows_carry_their_adapter_id_and_a_batch_without_adapters_has_none():
    b = batch()
    b.update(SchedulerOutput(new_seqs=[new(1, [1, 2], [0]), new(2, [3, 4], [1])]))
    assert b.prepare({1: 2, 2: 2}).lora_ids is None

    first, second = LoRARequest("first", 3, "/adapters/first"), LoRARequest("second", 5, "/adapters/second")
    b.update(SchedulerOutput(new_seqs=[new(3, [5, 6], [2], lora=first), new(4, [7], [3], lora=second)]))
    b.fork(b.seqs[3], 5, 1)
    step = b.prepare({4: 1, 1: 2, 3: 2, 5: 2, 2: 2})
    assert step.seq_ids == [4, 1, 3, 5, 2] and step.lora_ids.tolist() == [5, 0, 3, 3, 0]
    assert b.lora_requests == {3: first, 5: second}

    b.update(SchedulerOutput(finished_seq_ids=[3, 4]))
    assert b.lora_requests == {3: first}   # the fork still runs with it
    assert b.prepare({5: 2, 1: 2}).lora_ids.tolist() == [3, 0]
    b.update(SchedulerOutput(finished_seq_ids=[5], new_seqs=[new(6, [8], [4])]))
    assert b.lora_requests == {} and b.prepare({6: 1, 1: 2, 2: 2}).lora_ids is None


def test_each_kv_cache_group_has_its_own_table_and_slots():
    """Two groups: one sequence's tables differ per group (a sliding group's leading entries are placeholders),
    and each group's slots come from its own table."""
    b = batch(num_kv_cache_groups=2)
    b.update(SchedulerOutput(new_seqs=[NewSequenceData(1, 0, list(range(6)), [], SamplingParams(max_tokens=8), None,
                                                       [[5, 6], [0, 9]], 4)]))
    step = b.prepare({1: 2})
    assert step.slot_mapping.tolist() == [[24, 25], [36, 37]]
    assert step.block_tables.tolist() == [[[5, 6]], [[0, 9]]]
    assert step.slot_mapping.flags.c_contiguous and step.block_tables.flags.c_contiguous   # rows read as flat arrays
    b.update(SchedulerOutput(cached_seqs=[CachedSequenceData(1, [7], 2, [[2], [3]], 6)]))
    assert b.block_ids(1) == [[5, 6, 2], [0, 9, 3]]
    child = b.fork(b.seqs[1], 2, 1)
    assert b.block_ids(child.seq_id) == [[5, 6, 2], [0, 9, 3]]
