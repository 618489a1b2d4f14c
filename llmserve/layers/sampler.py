"""Batched token sampler: one call per engine step turns logits into tokens.

All work over the vocabulary is done with whole-batch tensor ops driven by
per-row parameter tensors; features no row uses are skipped entirely (their
tensors in :class:`SamplingBatch` are ``None``). The only per-row Python work
at forward time is drawing the random numbers of seeded rows from their own
generators, which is what makes a seeded request reproducible whatever else
shares its batch.

Processing order: logit bias, repetition / frequency / presence penalties,
the structured-output grammar's token bitmask, min-tokens masking (a banned
or masked token stays -inf through bias and penalties, so this is vLLM V1's
order in effect); greedy rows then take the argmax; random rows go through
temperature, top-k, top-p and min-p and are sampled with the exponential race
``argmax(probs / q)``, ``q ~ Exp(1)``, which samples exactly from ``probs``
without a cumulative sum or a host sync. Returned logprobs are those of the
raw model logits, before any of this processing (vLLM's default), for
constrained rows too.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmserve.layers.cpu_kernels import kernels_for
from llmserve.sampling_params import SamplingParams
from llmserve.structured_output.bitmask import apply_token_bitmask

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, sample_index: int, position: int) -> int:
    """The seed of the draw for output position ``position`` of sample ``sample_index`` of a seeded
    request: SplitMix64 over the three, so samples and positions get unrelated streams (not ``seed + i``,
    which would make sample 1 of seed 42 equal sample 0 of seed 43). A seeded sequence's tokens are then
    a function of its seed and its own tokens only: the same whatever shares the batch, after a
    preemption, after a failed step is run again, on any rank."""
    z = seed & _MASK64
    for value in (sample_index, position):
        z = (z + (value + 1) * 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dim in float32 (also used for prompt logprobs)."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


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
    cost nothing in :meth:`Sampler.forward`. Flattened indices address the
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
            temperature = floats([1.0 if g else p.temperature for p, g in zip(params, greedy)])
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


@dataclass
class SamplerOutput:
    """Tokens chosen this step and the raw-logit logprobs the rows asked for."""

    sampled_token_ids: torch.Tensor  # [N] int64
    sampled_logprobs: torch.Tensor  # [N] float32, logprob of the sampled token
    # [N, K] with K = batch.max_num_logprobs, sorted descending; None when no
    # row asked. Rows that asked for fewer than K slice their prefix.
    topk_token_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None


def apply_penalties(
    logits: torch.Tensor,
    prompt_index: torch.Tensor | None,
    output_index: torch.Tensor,
    repetition_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
) -> None:
    """Repetition (HF/vLLM), frequency and presence penalties, in place.

    Only the logits of tokens seen in a row's prompt (``prompt_index``) or
    output (``output_index``), given as flat ``row * V + token`` positions into
    the contiguous ``[N, V]`` ``logits``, can change, so just those positions
    are gathered, updated and written back instead of running several dense
    ``[N, V]`` passes. A position listed twice gets the same new value both
    times, so the write-back is deterministic. Penalties are ``[N]`` per row.
    """
    flat = logits.view(-1)
    counts = torch.zeros_like(flat)
    counts.scatter_add_(0, output_index, torch.ones_like(output_index, dtype=flat.dtype))
    index = output_index if prompt_index is None else torch.cat((prompt_index, output_index))
    row = index // logits.shape[1]
    old = flat[index]
    count = counts[index]
    repetition = repetition_penalty[row]
    new = torch.where(old > 0, old / repetition, old * repetition)
    new -= frequency_penalty[row] * count
    new -= presence_penalty[row] * (count > 0).to(new.dtype)
    flat[index] = new


def ban_stop_tokens(logits: torch.Tensor, index: torch.Tensor, grammar: bool) -> None:
    """Set the EOS / stop-token logits at flat ``index`` to -inf (rows still under min_tokens), in place.

    With a grammar in the batch, a row whose grammar allows only stop tokens here keeps them: the output
    must end where its grammar does, and a row of -inf only would have no token to sample. (The scheduler
    ends such a sequence on that token despite min_tokens.)
    """
    flat = logits.view(-1)
    kept = flat[index] if grammar else None
    flat.index_fill_(0, index, float("-inf"))
    if kept is not None:
        ends = torch.isneginf(logits).all(dim=1)[index // logits.shape[1]]
        flat.index_copy_(0, index, torch.where(ends, kept, float("-inf")))


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    max_top_k: int,
    top_p: torch.Tensor | None,
) -> torch.Tensor:
    """Set logits outside each row's top-k and then top-p nucleus to -inf.

    Top-k keeps every token whose logit is >= the k-th largest (ties at the
    boundary are kept). Top-p is applied to the top-k-renormalised
    distribution and keeps the smallest set whose probability is >= top_p,
    always including the most likely token. Both paths below give the same
    mask for a row, so a row's result does not depend on whether another row
    in the batch forced the sort.
    """
    vocab_size = logits.shape[-1]
    if top_p is None:
        assert top_k is not None
        # Top-k only: a partial top-k is much cheaper than a full sort.
        top_values = logits.topk(max_top_k, dim=-1).values
        kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
        kth = kth.masked_fill((top_k >= vocab_size).unsqueeze(1), float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))

    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Rows with top-p disabled get a threshold no cumulative sum can reach, so
    # tokens whose probability underflows to 0 are not dropped for them.
    threshold = torch.where(top_p < 1.0, 1.0 - top_p, -1.0).unsqueeze(1)
    drop = cumulative <= threshold
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return sorted_logits.scatter(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero probabilities below ``min_p * max prob`` of their row (no renormalising needed)."""
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a 2-D tensor; one compiled pass per row on CPU in float32."""
    kernels = kernels_for(x)
    if kernels is not None and x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1:
        return kernels.argmax_rows(x)
    return x.argmax(dim=-1)


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, dim=-1)`` of a 2-D tensor; one compiled pass per row on CPU in float32
    (PyTorch's materialises ``exp(x - max)`` for the whole matrix: 8 ms for 256 x 32000 on two cores)."""
    kernels = kernels_for(x)
    if kernels is not None and x.dim() == 2 and x.stride(1) == 1:
        return kernels.logsumexp_rows(x)
    return torch.logsumexp(x, dim=-1)


class Sampler(torch.nn.Module):
    """Turns one step's logits into tokens according to a :class:`SamplingBatch`."""

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of ``logits`` ([N, V]); the input is not modified."""
        logits = logits.float()
        processed = self.apply_logits_processors(logits, batch)
        if batch.all_greedy:
            sampled = row_argmax(processed)
        else:
            sampled = self.sample_random(processed, batch)
            if batch.greedy_mask is not None:
                sampled = torch.where(batch.greedy_mask, row_argmax(processed), sampled)
        return self.gather_logprobs(logits, sampled, batch.max_num_logprobs)

    @staticmethod
    def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Logit bias, penalties, the grammar bitmask and min-tokens masking: what greedy rows argmax over.

        Returns ``logits`` itself when no row uses any of them, else a new tensor.
        """
        if (
            batch.logit_bias_index is None
            and batch.min_tokens_index is None
            and not batch.any_penalties
            and batch.token_bitmask is None
        ):
            return logits
        logits = logits.clone(memory_format=torch.contiguous_format)
        flat = logits.view(-1)
        if batch.logit_bias_index is not None:
            flat.index_add_(0, batch.logit_bias_index, batch.logit_bias_value)
        if batch.any_penalties:
            apply_penalties(
                logits,
                batch.prompt_token_index,
                batch.output_token_index,
                batch.repetition_penalty,
                batch.frequency_penalty,
                batch.presence_penalty,
            )
        if batch.token_bitmask is not None:
            apply_token_bitmask(logits, batch.token_bitmask, batch.bitmask_rows)
        if batch.min_tokens_index is not None:
            ban_stop_tokens(logits, batch.min_tokens_index, grammar=batch.token_bitmask is not None)
        return logits

    @staticmethod
    def sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Temperature, top-k/top-p, min-p, then the exponential race, for every row.

        Greedy rows run through with neutral parameters; the caller overrides them.
        """
        assert batch.temperature is not None
        logits = logits / batch.temperature.unsqueeze(1)
        if batch.any_top_k or batch.any_top_p:
            logits = apply_top_k_top_p(logits, batch.top_k, batch.max_top_k, batch.top_p)
        probs = logits.softmax(dim=-1)
        if batch.any_min_p:
            probs = apply_min_p(probs, batch.min_p)
        # Exp(1) noise as -log(U): about twice as fast as exponential_() on CPU.
        q = torch.empty_like(probs)
        if len(batch.generators) < batch.num_rows:
            q.uniform_()
        # A seeded row's draw comes from its own generator only, so its tokens
        # do not depend on the batch's size, order or other rows.
        for row, generator in batch.generators.items():
            q[row].uniform_(generator=generator)
        q.log_().neg_()
        # q == 0 would turn masked (prob 0) tokens into 0/0 = NaN, which argmax picks.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return row_argmax(probs.div_(q))

    @staticmethod
    def gather_logprobs(
        logits: torch.Tensor, sampled: torch.Tensor, num_logprobs: int | None
    ) -> SamplerOutput:
        """Raw-logit logprobs of the sampled tokens and of the top ``num_logprobs``.

        Uses ``logit - logsumexp`` instead of a full log-softmax, so no ``[N, V]``
        tensor is materialised; top-k of the logits orders tokens like top-k of
        their logprobs.
        """
        normaliser = row_logsumexp(logits)
        sampled_logprobs = logits.gather(1, sampled.unsqueeze(1)).squeeze(1) - normaliser
        topk_ids = topk_logprobs = None
        if num_logprobs is not None:
            values, topk_ids = logits.topk(num_logprobs, dim=-1)
            topk_logprobs = values - normaliser.unsqueeze(1)
        return SamplerOutput(sampled, sampled_logprobs, topk_ids, topk_logprobs)
