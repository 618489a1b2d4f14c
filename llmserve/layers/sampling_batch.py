"""The per-step sampling tensors of a batch (:class:`SamplingBatch`), gathered from its rows' parameters.

A feature no row uses leaves its tensors ``None``, so :class:`~llmserve.layers.sampler.Sampler` skips it;
sparse per-row parameters (penalised tokens, logit bias, min-tokens bans) become flat indices into the
``[N * V]`` logits, one indexed op for the whole batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmserve.sampling_params import SamplingParams

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class SamplingRow:
    """One sequence that needs a token this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Set when params.seed is not None: the sequence's generator, seeded with
    # position_seed for the position being sampled, on the logits' device.
    generator: torch.Generator | None
    # Masked, together with params.stop_token_ids, while the output is
    # shorter than params.min_tokens; None disables masking it.
    eos_token_id: int | None


def _uses_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


def _flat_index(
    rows: list[int], token_lists: list[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Positions ``row * vocab_size + token`` into a flattened ``[N, V]`` tensor.

    Converting each row's list in one call is much cheaper than per-token
    Python arithmetic; this runs every step for long prompts.
    """
    parts = [
        torch.as_tensor(tokens, dtype=torch.int64) + row * vocab_size
        for row, tokens in zip(rows, token_lists, strict=True)
    ]
    return torch.cat(parts).to(device)


@dataclass
class SamplingBatch:
    """Per-step sampling tensors for a batch of rows, built on the logits' device.

    A feature's tensors are ``None`` when no row uses it, so unused features
    cost nothing in :meth:`~llmserve.layers.sampler.Sampler.forward`. Flattened indices address the
    ``[N, V]`` logits viewed as ``[N * V]``, which turns every sparse per-row
    update into one indexed op for the whole batch.
    """

    num_rows: int
    vocab_size: int
    # [N] bool, True for greedy rows; None when every row is greedy or none is.
    greedy_mask: torch.Tensor | None
    all_greedy: bool
    # [N] float32; 1.0 for greedy rows so they stay finite. None if all greedy.
    temperature: torch.Tensor | None
    # [N] int64 in [1, V]; V where disabled. None unless a random row uses it.
    top_k: torch.Tensor | None
    # Largest enabled top_k: the width of the partial top-k. V when none.
    max_top_k: int
    # [N] float32 in (0, 1]; 1.0 where disabled. None unless a random row uses it.
    top_p: torch.Tensor | None
    # [N] float32; 0.0 where disabled. None unless a random row uses it.
    min_p: torch.Tensor | None
    # Seeded random rows: row index -> generator.
    generators: dict[int, torch.Generator]
    # [N] float32 each; identity values (1, 0, 0) for rows without penalties.
    # None unless some row uses a penalty.
    repetition_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    presence_penalty: torch.Tensor | None
    # Flat indices of prompt tokens (rows with repetition_penalty != 1 only;
    # None if there are none) and of output tokens (rows with any penalty).
    prompt_token_index: torch.Tensor | None
    output_token_index: torch.Tensor | None
    # Flat indices and float32 values of all rows' logit_bias entries.
    logit_bias_index: torch.Tensor | None
    logit_bias_value: torch.Tensor | None
    # Flat indices of eos / stop tokens of rows still below min_tokens.
    min_tokens_index: torch.Tensor | None
    # Largest params.logprobs in the batch; None when no row asked.
    max_num_logprobs: int | None
    # Structured outputs: int32 [>= N, ceil(V/32)] allowed-token bits (row i for logits row i, on the CPU or
    # the logits' device) and the rows it constrains; None when no row is constrained.
    token_bitmask: torch.Tensor | None = None
    bitmask_rows: Sequence[int] = ()

    @property
    def any_penalties(self) -> bool:
        return self.repetition_penalty is not None

    @property
    def any_top_k(self) -> bool:
        return self.top_k is not None

    @property
    def any_top_p(self) -> bool:
        return self.top_p is not None

    @property
    def any_min_p(self) -> bool:
        return self.min_p is not None

    @classmethod
    def build(
        cls,
        rows: list[SamplingRow],
        vocab_size: int,
        device: torch.device | str,
        token_bitmask: torch.Tensor | None = None,
        bitmask_rows: Sequence[int] = (),
    ) -> SamplingBatch:
        """Gather the rows' parameters into tensors; O(rows + penalised tokens) Python work.

        ``token_bitmask`` rows ``bitmask_rows`` (filled by the grammar matchers) restrict those rows' tokens.
        """
        device = torch.device(device)
        num_rows = len(rows)
        params = [row.params for row in rows]
        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        random_rows = [i for i, g in enumerate(greedy) if not g]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        temperature = top_k = top_p = min_p = None
        max_top_k = vocab_size
        generators: dict[int, torch.Generator] = {}
        if not all_greedy:
            # beyond float32 a temperature would be inf, and a masked (-inf) logit over it NaN
            temperature = floats([1.0 if g else min(p.temperature, FLOAT32_MAX) for p, g in zip(params, greedy)])
            ks = [
                vocab_size if g or p.top_k == 0 else min(p.top_k, vocab_size)
                for p, g in zip(params, greedy)
            ]
            if any(k < vocab_size for k in ks):
                top_k = longs(ks)
                max_top_k = max(k for k in ks if k < vocab_size)
            if any(params[i].top_p < 1.0 for i in random_rows):
                top_p = floats([1.0 if g else p.top_p for p, g in zip(params, greedy)])
            if any(params[i].min_p > 0.0 for i in random_rows):
                min_p = floats([0.0 if g else p.min_p for p, g in zip(params, greedy)])
            generators = {
                i: rows[i].generator for i in random_rows if rows[i].generator is not None
            }

        repetition = frequency = presence = prompt_index = output_index = None
        penalised = [i for i, p in enumerate(params) if _uses_penalties(p)]
        if penalised:
            repetition = floats([p.repetition_penalty for p in params])
            frequency = floats([p.frequency_penalty for p in params])
            presence = floats([p.presence_penalty for p in params])
            output_index = _flat_index(
                penalised, [rows[i].output_token_ids for i in penalised], vocab_size, device
            )
            repeat_rows = [i for i in penalised if params[i].repetition_penalty != 1.0]
            if repeat_rows:
                prompt_index = _flat_index(
                    repeat_rows, [rows[i].prompt_token_ids for i in repeat_rows], vocab_size, device
                )

        bias_index = bias_value = None
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        if biased:
            bias_index = _flat_index(
                biased, [list(params[i].logit_bias) for i in biased], vocab_size, device
            )
            bias_value = floats(
                list(itertools.chain.from_iterable(params[i].logit_bias.values() for i in biased))
            )

        min_tokens_index = None
        blocked_rows: list[int] = []
        blocked_tokens: list[list[int]] = []
        for i, row in enumerate(rows):
            if len(row.output_token_ids) < row.params.min_tokens:
                tokens = list(row.params.stop_token_ids)
                if row.eos_token_id is not None:
                    tokens.append(row.eos_token_id)
                if tokens:
                    blocked_rows.append(i)
                    blocked_tokens.append(tokens)
        if blocked_rows:
            min_tokens_index = _flat_index(blocked_rows, blocked_tokens, vocab_size, device)

        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            greedy_mask=(
                torch.tensor(greedy, dtype=torch.bool, device=device)
                if random_rows and len(random_rows) < num_rows
                else None
            ),
            all_greedy=all_greedy,
            temperature=temperature,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=min_p,
            generators=generators,
            repetition_penalty=repetition,
            frequency_penalty=frequency,
            presence_penalty=presence,
            prompt_token_index=prompt_index,
            output_token_index=output_index,
            logit_bias_index=bias_index,
            logit_bias_value=bias_value,
            min_tokens_index=min_tokens_index,
            max_num_logprobs=max(asked) if asked else None,
            token_bitmask=token_bitmask if bitmask_rows else None,
            bitmask_rows=list(bitmask_rows),
        )
