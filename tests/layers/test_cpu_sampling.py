"""The compiled random sampling of the multi-step decode loop (``llmserve_sample_rows``, ``csrc/cpu_sampling.c``)
draws from the distribution the sampler draws an unseeded random row from: the logits over the temperature, top-k
(ties at the k-th kept), top-p over the top-k-renormalised distribution, min-p, as ``llmserve.layers.sampler``
computes them. Checked by drawing 40,000 tokens from rows of the same logits (each row its own generator) against
those probabilities; greedy rows (temperature 0) are left as they were. At a tie on the top-p cut both keep as many
of the tied tokens as they need (which ones the sampler's sort does not specify; the loop takes the first), so
there the tied group's probability is compared."""

from __future__ import annotations

import ctypes

import pytest
import torch

from llmserve.layers.cpu_decode_layers import SampleParams
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.layers.sampler import apply_min_p, apply_top_k_top_p

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels are not available")

LOGITS = torch.tensor([2.0, 1.5, 1.5, 0.7, 0.2, -0.3, -1.0, -2.5, float("-inf"), 0.9])
DISTINCT = torch.tensor([2.0, 1.5, 1.3, 0.7, 0.2, -0.3, -1.0, -2.5, float("-inf"), 0.9])
DRAWS = 40_000


def sample_rows(logits: torch.Tensor, params: list[SampleParams], seed: int, out: torch.Tensor | None = None):
    lib = cpu_kernels().library
    lib.llmserve_sample_rows.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                                         ctypes.POINTER(SampleParams), ctypes.c_uint64, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_int]
    lib.llmserve_sample_rows.restype = None
    logits = logits.contiguous()   # (kept alive for the call)
    rows, vocab = logits.shape
    out = torch.full((rows,), -1, dtype=torch.int64) if out is None else out
    scratch = torch.empty(2, 2 * vocab)   # two threads
    lib.llmserve_sample_rows(logits.data_ptr(), rows, vocab, (SampleParams * rows)(*params), seed, out.data_ptr(),
                             scratch.data_ptr(), 2)
    return out


def expected(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The sampler's probabilities for one random row (its own functions)."""
    logits = (logits / temperature)[None]
    vocab = logits.shape[1]
    k = torch.tensor([top_k if 0 < top_k < vocab else vocab])
    masked = apply_top_k_top_p(logits, k if top_k else None, int(k), torch.tensor([top_p]) if top_p < 1 else None) \
        if top_k or top_p < 1 else logits
    probs = masked.softmax(dim=-1)
    if min_p > 0:
        probs = apply_min_p(probs, torch.tensor([min_p]))
    return (probs / probs.sum())[0]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.6, 0, 1.0, 0.0), (1.3, 3, 1.0, 0.0), (1.0, 2, 1.0, 0.0),   # k = 2: a tie at the 2nd
    (1.0, 0, 0.8, 0.0), (0.8, 0, 0.5, 0.0), (1.0, 0, 1.0, 0.2), (1.1, 6, 0.7, 0.05), (5.0, 0, 0.95, 0.0),
])
def test_draws_follow_the_samplers_distribution(temperature, top_k, top_p, min_p):
    logits = LOGITS if top_p == 1.0 else DISTINCT
    want = expected(logits, temperature, top_k, top_p, min_p)
    params = [SampleParams(temperature, top_p, min_p, top_k)] * DRAWS
    tokens = sample_rows(logits.expand(DRAWS, -1), params, seed=1234)
    freq = torch.bincount(tokens, minlength=LOGITS.numel()).double() / DRAWS
    assert ((freq > 0) <= (want > 0)).all(), (freq, want)   # nothing the sampler masks is drawn
    assert (freq - want.double()).abs().max() < 0.012, (freq, want)   # ~5 standard deviations at most


def test_a_tie_on_the_top_p_cut_keeps_as_many_tied_tokens_as_needed():
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 0.0, -1.0, -2.0])
    want = expected(logits, 1.0, 0, 0.75, 0.0)
    tokens = sample_rows(logits.expand(DRAWS, -1), [SampleParams(1.0, 0.75, 0.0, 0)] * DRAWS, seed=99)
    freq = torch.bincount(tokens, minlength=logits.numel()).double() / DRAWS
    tied = slice(1, 5)
    assert int((want[tied] > 0).sum()) == int((freq[tied] > 0).sum()) == 2   # of four tied tokens, two are needed
    assert abs(float(freq[tied].sum() - want[tied].sum())) < 0.012 and abs(float(freq[0] - want[0])) < 0.012
    assert freq[5:].sum() == 0


def test_greedy_rows_are_left_and_a_seed_repeats_its_draws():
    logits = LOGITS.expand(64, -1)
    params = [SampleParams(0.0, 1.0, 0.0, 0) if r % 2 else SampleParams(1.0, 1.0, 0.0, 0) for r in range(64)]
    first = sample_rows(logits, params, seed=7)
    assert (first[1::2] == -1).all() and (first[::2] >= 0).all()
    assert torch.equal(sample_rows(logits, params, seed=7), first)
    assert not torch.equal(sample_rows(logits, params, seed=8), first)
