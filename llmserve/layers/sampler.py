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

from dataclasses import dataclass

import torch

from llmserve.layers.layer_ops import row_reductions_for
from llmserve.layers.sampling_batch import SamplingBatch
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
class SamplerOutput:
    """Tokens chosen this step and the raw-logit logprobs the rows asked for."""

    sampled_token_ids: torch.Tensor  # [N] int64
    # [N] float32, logprob of the sampled token; None when no row asked for logprobs (its
    # normaliser is a pass over every logit, as long as the greedy argmax itself)
    sampled_logprobs: torch.Tensor | None
    # [N, K] with K = batch.max_num_logprobs, sorted descending; None when no
    # row asked. Rows that asked for fewer than K slice their prefix.
    topk_token_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None


# The largest magnitude a penalised logit takes: float32 goes to 3.4e38, and a random row's logits are divided by
# its temperature (at least 1e-5 when not greedy) before the softmax.
PENALISED_LIMIT = 1e30


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

    A penalised finite logit stays finite, within ``PENALISED_LIMIT``: a
    repetition penalty beyond float32 (any positive value is accepted, as in
    vLLM) would otherwise turn a zero logit into NaN (``0 * inf``) and the rest
    into infinities, and a row whose grammar allows only such tokens would have
    nothing to sample. The limit leaves room for the temperature's division.
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
    new = torch.where(old.isfinite(), new.nan_to_num(nan=0.0).clamp(-PENALISED_LIMIT, PENALISED_LIMIT), new)
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
    """``x.argmax(dim=-1)`` of a 2-D tensor; one compiled pass per row on CPU and one kernel on GPU in float32."""
    kernels = row_reductions_for(x)
    if kernels is not None and x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1:
        return kernels.argmax_rows(x)
    return x.argmax(dim=-1)


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, dim=-1)`` of a 2-D tensor; in float32 one compiled pass per row on CPU (PyTorch's
    materialises ``exp(x - max)`` for the whole matrix) and one kernel launch on GPU (PyTorch's is seven)."""
    kernels = row_reductions_for(x)
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
        if batch.max_num_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
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
        logits: torch.Tensor, sampled: torch.Tensor, num_logprobs: int
    ) -> SamplerOutput:
        """Raw-logit logprobs of the sampled tokens and of the top ``num_logprobs``.

        Uses ``logit - logsumexp`` instead of a full log-softmax, so no ``[N, V]``
        tensor is materialised; top-k of the logits orders tokens like top-k of
        their logprobs.
        """
        normaliser = row_logsumexp(logits)
        sampled_logprobs = logits.gather(1, sampled.unsqueeze(1)).squeeze(1) - normaliser
        values, topk_ids = logits.topk(num_logprobs, dim=-1)
        return SamplerOutput(sampled, sampled_logprobs, topk_ids, values - normaliser.unsqueeze(1))
