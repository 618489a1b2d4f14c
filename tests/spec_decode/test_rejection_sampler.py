"""Rejection sampling of deterministic (n-gram) drafts: greedy rows keep drafts while the argmax agrees;
random rows accept a draft with the target's probability of it and otherwise emit a token from the target
without it, renormalised, so every emitted token follows the target distribution (chi-square over many
samples); the bonus token comes when all drafts are accepted; seeded rows give the same tokens with and
without drafts."""

from __future__ import annotations

import torch

from llmserve.layers.sampler import Sampler
from llmserve.layers.sampling_batch import SamplingBatch
from llmserve.sampling_params import SamplingParams
from llmserve.spec_decode import rejection_sampler
from llmserve.worker.input_batch import CachedSequence

CPU = torch.device("cpu")
VOCAB = 6


def seq(params: SamplingParams, output: list[int] | None = None, seq_id: int = 0) -> CachedSequence:
    generator = torch.Generator() if params.seed is not None and not params.is_greedy else None
    return CachedSequence(seq_id, 0, seq_id, [1, 2, 3], list(output or []), params, None, generator)


def run(logits: torch.Tensor, seqs: list[CachedSequence], drafts: list[list[int]]) -> list[list[int]]:
    """Each row's emitted tokens: what the model runner does with one step's logits."""
    rows = rejection_sampler.sampling_rows(seqs, drafts, CPU)
    sampled = Sampler()(logits, SamplingBatch.build(rows, VOCAB, CPU)).sampled_token_ids
    accepted = rejection_sampler.num_accepted(sampled, drafts).tolist()
    tokens = sampled.tolist()
    return [[tokens[p] for p in positions] for positions in rejection_sampler.emitted_positions(drafts, accepted)]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    expected = probs[keep].double() * counts.sum()
    return (((counts[keep] - expected) ** 2) / expected).sum().item()


def test_num_accepted_counts_the_leading_agreement_of_each_row():
    drafts = [[4, 5, 1], [], [2, 2], [3]]
    sampled = torch.tensor([4, 5, 0, 9,   7,   2, 1, 8,   0, 6])   # rows of k + 1 positions
    assert rejection_sampler.num_accepted(sampled, drafts).tolist() == [2, 0, 1, 0]
    assert rejection_sampler.emitted_positions(drafts, [2, 0, 1, 0]) == [[0, 1, 2], [4], [5, 6], [8]]
    assert rejection_sampler.logit_rows([10, 11, 20, 31], drafts) == [7, 8, 9, 10, 11, 18, 19, 20, 30, 31]
    assert rejection_sampler.last_positions(drafts) == [3, 4, 7, 9]


def test_greedy_keeps_drafts_while_the_argmax_agrees_and_adds_the_bonus():
    logits = torch.full((4, VOCAB), -1.0)
    for position, best in enumerate([3, 1, 4, 2]):
        logits[position, best] = 5.0
    greedy = SamplingParams(temperature=0.0)
    assert run(logits, [seq(greedy)], [[3, 1, 4]]) == [[3, 1, 4, 2]]        # all accepted + bonus
    assert run(logits, [seq(greedy)], [[3, 0, 4]]) == [[3, 1]]              # first disagreement is replaced
    assert run(logits[:1], [seq(greedy)], [[]]) == [[3]]


def test_sampled_tokens_follow_the_target_distribution():
    """The first emitted token follows p_0 whatever the draft; it is the draft with probability p_0(d); the
    second, when the draft was accepted, follows p_1 (top-k and temperature applied as without drafts)."""
    torch.manual_seed(0)
    n = 20000
    p0_logits = torch.tensor([1.2, 0.3, -0.5, 0.9, -1.0, 0.0])
    p1_logits = torch.tensor([0.1, 1.5, -0.2, 0.4, 0.7, -2.0])
    params = SamplingParams(temperature=0.8, top_k=5)
    logits = torch.stack([p0_logits, p1_logits]).repeat(n, 1)
    for draft in (0, 4, 5):                          # likely, unlikely, outside the top-k (probability 0)
        emitted = run(logits, [seq(params) for _ in range(n)], [[draft]] * n)
        p0 = torch.softmax(p0_logits / 0.8, -1).masked_fill(p0_logits < p0_logits.topk(5).values[-1], 0)
        p0 /= p0.sum()
        first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=VOCAB).double()
        assert chi_square(first, p0) < 30.0   # df <= 5: p ~ 1e-5 under the null
        accepted = [e for e in emitted if len(e) == 2]
        assert all(e[0] == draft for e in accepted) and all(e[0] != draft for e in emitted if len(e) == 1)
        rate = len(accepted) / n
        assert abs(rate - p0[draft].item()) < 4 * (max(p0[draft].item(), 1e-3) / n) ** 0.5 + 1e-3
        if len(accepted) > 2000:
            p1 = torch.softmax(p1_logits / 0.8, -1).masked_fill(p1_logits < p1_logits.topk(5).values[-1], 0)
            second = torch.bincount(torch.tensor([e[1] for e in accepted]), minlength=VOCAB).double()
            assert chi_square(second, p1 / p1.sum()) < 30.0


def test_penalties_see_the_earlier_drafts():
    """Position j is sampled as if the first j drafts were already output: a strong presence penalty
    makes a greedy row refuse to repeat a draft it just accepted."""
    logits = torch.tensor([[0.0, 3.0, 2.0, 0.0, 0.0, 0.0]] * 2)
    params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert run(logits, [seq(params)], [[1]]) == [[1, 2]]


def test_seeded_rows_give_the_same_tokens_with_and_without_drafts():
    torch.manual_seed(1)
    params = SamplingParams(temperature=1.0, seed=7)
    logits = torch.randn(4, VOCAB)
    plain = []
    for position in range(4):            # one token per step, no drafts
        plain += run(logits[position:position + 1], [seq(params, output=plain)], [[]])[0]
    drafted = run(logits, [seq(params)], [plain[:3]])[0]
    assert drafted == plain
    wrong = [(plain[0] + 1) % VOCAB, 0, 0]
    assert run(logits, [seq(params)], [wrong])[0] == plain[:1]   # rejected at once: the token it would have drawn
    assert run(logits, [seq(params)], [plain[:3]]) == run(logits, [seq(params)], [plain[:3]])


def test_rows_are_independent_of_each_other():
    logits = torch.randn(5, VOCAB)
    greedy = SamplingParams(temperature=0.0)
    alone = run(logits[2:5], [seq(greedy)], [[int(logits[2].argmax()), 0]])
    together = run(logits, [seq(greedy, seq_id=0), seq(greedy, seq_id=1)],
                   [[int(logits[0].argmax())], [int(logits[2].argmax()), 0]])
    assert together[1] == alone[0] and together[0][0] == int(logits[0].argmax())
