"""Multi-step decoding (``--num-scheduler-steps N``, vLLM's flag): how many decode steps the next engine step runs.

At batch 1 on a CPU, a small model's decode step is a few milliseconds of kernels and a few hundred microseconds
of Python around them (scheduling, inputs, sampling, output processing). A multi-step step runs up to N
decode steps in one call into compiled code, each step's token (argmax or draw) fed back as the next step's input
(:mod:`llmserve.worker.multi_step`), so that Python cost is paid once per N tokens.

The scheduler takes it only when the loop computes what N single steps would: every row of the step is a running
sequence decoding its next token, greedy (the same tokens) or random and unseeded (draws from the same
distribution), with nothing else that changes its logits or needs them (no penalties, logit bias, grammar,
logprobs, adapter or unmet ``min_tokens``), and no draft. N is cut to the
tokens every row may still generate (``max_tokens``, the context), and the step falls back to one token when
the KV cache has too few free blocks for the lookahead (nothing is preempted for it) or the step has more rows than
the workers' loop runs (a tied LM head's kernel takes a few). The loop ends after the first
step in which a row samples an EOS or stop token; a stop string is found in the text once the tokens are back, and
the tokens after it are dropped (:meth:`~llmserve.engine.scheduler.Scheduler.update_from_output`). Streams receive
a step's tokens together.
"""

from __future__ import annotations

from llmserve.engine.block_manager import BlockManager
from llmserve.engine.sequence import Sequence


def decodes_in_the_loop(seq: Sequence) -> bool:
    """Whether ``seq``'s next tokens are what the compiled multi-step loop computes: its logits' argmax, or an
    unseeded draw under temperature, top-k, top-p and min-p (a seeded one must reproduce the sampler's own draws),
    with nothing else asked of them but the token."""
    params = seq.params
    return (seq.pooling is None and seq.lora_request is None and not seq.pending_forks
            and (params.is_greedy or params.seed is None)
            and params.logprobs is None and not params.logit_bias and params.structured_outputs is None
            and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0 and len(seq.output_token_ids) >= params.min_tokens)


def tokens_left(seq: Sequence, max_model_len: int | None) -> int:
    """Tokens ``seq`` may still generate before its length stops it."""
    left = seq.max_tokens - len(seq.output_token_ids)
    return left if max_model_len is None else min(left, max_model_len - seq.num_tokens)


def multi_step_count(scheduled: list[tuple[Sequence, int]], max_steps: int, max_model_len: int | None,
                     block_manager: BlockManager, max_rows: int | None = None) -> int:
    """How many decode steps the scheduled step runs (1: a plain step); ``max_rows``: the most rows the workers'
    loop runs (a tied LM head's kernel), None for any. Allocates the KV-cache slots of the extra steps when it
    returns more than 1 (none are preempted for them)."""
    if max_steps == 1 or not scheduled or (max_rows is not None and len(scheduled) > max_rows):
        return 1
    steps = max_steps
    for seq, num_new in scheduled:
        if num_new != 1 or seq.num_computed_tokens != seq.num_tokens - 1 or not decodes_in_the_loop(seq):
            return 1
        steps = min(steps, tokens_left(seq, max_model_len))
    if steps <= 1:
        return 1
    # (the step's blocks are allocated, copy-on-write done: the lookahead only adds fresh blocks at the tables' ends)
    needed = sum(max(0, block_manager.blocks_for(seq.num_tokens - 1 + steps) - len(seq.block_table))
                 for seq, _ in scheduled)
    if needed > block_manager.num_free_blocks:
        return 1
    for seq, _ in scheduled:
        allocated = block_manager.allocate(seq, seq.num_tokens - 1 + steps)
        assert allocated, "the free blocks were counted"
    return steps
