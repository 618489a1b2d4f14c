"""The model runner's side of multi-step decoding (``--num-scheduler-steps``, :mod:`llmserve.engine.multi_step`).

A multi-step step's rows are decodes (greedy, or random and unseeded) the scheduler has allocated KV-cache slots
for, ``num_steps`` tokens ahead. The fused CPU decode step runs them all in one call
(:meth:`FusedDecode.decode_steps`): per step the decoder layers, the LM head and each row's argmax or draw (the
sampler's temperature, top-k, top-p and min-p, from a generator seeded from PyTorch's), fed back as the row's next
token, until a row samples one of its stop tokens (one step at a time, the next step would run without it). The
tokens come back as the step's sampled token per sequence and the ones before it
(:attr:`ModelRunnerOutput.multi_step_tokens`).
A step of more rows than a tied LM head runs in the loop (:meth:`FusedDecode.takes_steps`) runs as a plain step
instead: one token each, the lookahead slots kept for the sequences' next steps.
"""

from __future__ import annotations

import numpy as np
import torch

from llmserve.engine.messages import ModelRunnerOutput
from llmserve.engine.stop_conditions import stop_token_ids
from llmserve.layers.cpu_decode_layers import SampleParams
from llmserve.layers.sampling_batch import FLOAT32_MAX
from llmserve.models.llama_fused_decode import FusedDecode
from llmserve.worker.input_batch import CachedSequence, InputBatch, StepInputs


class MultiStepUnsupported(ValueError):
    """``--num-scheduler-steps`` above 1 for a model or engine the compiled loop cannot run; says why."""


def multi_step_decode(fused: FusedDecode | str, num_kv_cache_groups: int) -> FusedDecode:
    """The fused decode step that runs multi-step steps (given as
    :func:`~llmserve.models.llama_fused_decode.fused_decode_or_reason` returns it: the step, or why it is off);
    raises :class:`MultiStepUnsupported` naming what is missing."""
    why = None
    if isinstance(fused, str):
        why = f"the fused CPU decode step is off ({fused})"
    elif fused.steps_unsupported is not None:
        why = fused.steps_unsupported
    elif num_kv_cache_groups != 1:
        why = f"the model's attention layers keep {num_kv_cache_groups} KV-cache groups"
    if why is not None:
        raise MultiStepUnsupported(f"--num-scheduler-steps > 1 runs decode steps in the compiled CPU loop, which "
                                   f"this engine cannot: {why}. Leave --num-scheduler-steps at 1")
    assert not isinstance(fused, str)
    return fused


def sampling_of(seq: CachedSequence) -> SampleParams:
    """``seq``'s sampling in the loop: greedy (temperature 0), or its temperature, top-k, top-p and min-p (an
    unseeded random row: the scheduler sends no seeded one)."""
    params = seq.params
    if params.is_greedy:
        return SampleParams(0.0, 1.0, 0.0, 0)
    return SampleParams(min(params.temperature, FLOAT32_MAX), params.top_p, params.min_p, params.top_k)


def run_multi_step(fused: FusedDecode, batch: InputBatch, step: StepInputs, num_steps: int) -> ModelRunnerOutput:
    """Run a multi-step step (its inputs prepared with ``num_steps - 1`` positions of lookahead in the block
    tables) and return each sequence's tokens: as many as the steps ran (they end early after a stop token)."""
    seqs = step.sample_seqs
    if len(seqs) != len(step.input_ids) or step.num_decodes != len(seqs):
        raise RuntimeError("a multi-step step must decode one token for every row")
    rows = np.fromiter((seq.row for seq in seqs), dtype=np.int64, count=len(seqs))
    if np.any(batch.num_blocks[rows] * batch.block_size < step.positions + num_steps):
        raise RuntimeError("a multi-step step's sequences do not hold KV-cache blocks for every position it writes")
    sampling: list[SampleParams] | None = [sampling_of(seq) for seq in seqs]
    seed = 0
    if all(s.temperature == 0.0 for s in sampling):
        sampling = None
    else:   # (the draws' generator is seeded from PyTorch's, which the engine's --seed seeds)
        seed = int(torch.randint(0, 2**63 - 1, (1,)))
    tokens = fused.decode_steps(torch.from_numpy(step.input_ids), torch.from_numpy(step.positions),
                                torch.from_numpy(step.block_tables[0]), num_steps,
                                # (min_tokens are met, or the scheduler would not have made the step multi-step)
                                [stop_token_ids(seq.params, seq.eos_token_id) for seq in seqs], sampling,
                                seed).T.tolist()
    out = ModelRunnerOutput()
    for seq, row in zip(seqs, tokens):
        out.sampled[seq.seq_id] = row[-1]
        out.multi_step_tokens[seq.seq_id] = row[:-1]
    return out
