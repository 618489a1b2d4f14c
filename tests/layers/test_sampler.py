import math

import pytest
import torch

from llmserve.layers.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    compute_logprobs,
    position_seed,
)
from llmserve.layers.sampling_batch import SamplingBatch, SamplingRow
from llmserve.sampling_params import SamplingParams

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
sampler = Sampler()


def row(params=None, prompt=(), output=(), generator=None, eos=None, **kw):
    params = params or SamplingParams(**kw)
    return SamplingRow(params, list(prompt), list(output), generator, eos)


def run(logits, rows):
    batch = SamplingBatch.build(rows, logits.shape[1], logits.device)
    return sampler(logits, batch)


def logits_from_probs(probs, n):
    return torch.tensor(probs).log().expand(n, -1).contiguous()


def sampled_set(logits, rows):
    return set(run(logits, rows).sampled_token_ids.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_equals_argmax(device):
    torch.manual_seed(0)
    logits = torch.randn(16, 1000, device=device)
    out = run(logits, [row(temperature=0.0) for _ in range(16)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.topk_token_ids is None and out.topk_logprobs is None


def test_greedy_rows_in_mixed_batch_equal_argmax():
    torch.manual_seed(1)
    logits = torch.randn(8, 500)
    rows = [row(temperature=0.0 if i % 2 else 1.0, top_p=0.9, top_k=50) for i in range(8)]
    rows[2] = row(top_k=1)
    rows[4] = row(temperature=1e-6)
    out = run(logits, rows)
    for i in (1, 2, 3, 4, 5, 7):
        assert out.sampled_token_ids[i] == logits[i].argmax()


def test_input_logits_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(4, 100)
    before = logits.clone()
    rows = [
        row(logit_bias={3: 10.0}, repetition_penalty=1.5, output=[1, 2], prompt=[4],
            top_p=0.5, min_p=0.1, min_tokens=2, eos=0),
        row(temperature=0.0, presence_penalty=1.0, output=[5]),
        row(top_k=3),
        row(),
    ]
    run(logits, rows)
    assert torch.equal(logits, before)


def test_raw_logprobs():
    torch.manual_seed(3)
    logits = torch.randn(5, 300) * 3
    rows = [
        row(logprobs=3, temperature=0.7, top_k=10, repetition_penalty=1.3, prompt=[1, 2]),
        row(logprobs=0),
        row(),
        row(logprobs=7, temperature=0.0, logit_bias={5: 50.0}),
        row(logprobs=2, top_p=0.5, min_p=0.2),
    ]
    out = run(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(compute_logprobs(logits), reference)
    assert compute_logprobs(logits.to(torch.bfloat16)).dtype == torch.float32
    expected = reference.gather(1, out.sampled_token_ids[:, None]).squeeze(1)
    assert out.sampled_logprobs.dtype == torch.float32
    assert torch.allclose(out.sampled_logprobs, expected, atol=1e-5)
    # Logprobs are of the raw logits: the biased token is sampled, not boosted.
    assert out.sampled_token_ids[3] == 5
    assert torch.allclose(out.sampled_logprobs[3], reference[3, 5], atol=1e-5)

    assert out.topk_token_ids.shape == (5, 7) and out.topk_logprobs.shape == (5, 7)
    assert out.topk_token_ids.dtype == torch.int64
    values, ids = reference.topk(7, dim=-1)
    assert torch.equal(out.topk_token_ids, ids)
    assert torch.allclose(out.topk_logprobs, values, atol=1e-5)
    assert torch.all(out.topk_logprobs[:, :-1] >= out.topk_logprobs[:, 1:])
    # The sampled token's logprob agrees with its top-k entry when listed.
    for i in range(5):
        hits = (out.topk_token_ids[i] == out.sampled_token_ids[i]).nonzero()
        if len(hits):
            assert torch.allclose(out.topk_logprobs[i, hits[0, 0]], out.sampled_logprobs[i])


def test_logprobs_zero_gives_empty_topk():
    out = run(torch.randn(2, 10), [row(logprobs=0), row()])
    assert out.topk_token_ids.shape == (2, 0) and out.topk_logprobs.shape == (2, 0)


def test_top_k_never_samples_outside_top_k():
    torch.manual_seed(4)
    n, vocab = 4000, 64
    base = torch.randn(vocab) * 0.3  # flat distribution: the tail would be hit often
    logits = base.expand(n, -1).contiguous()
    ks = [1 + i % 7 for i in range(n)]
    rows = [row(top_k=k, temperature=2.0) for k in ks]
    out = run(logits, rows)
    rank = base.argsort(descending=True).argsort()  # token -> rank
    ranks = rank[out.sampled_token_ids]
    assert torch.all(ranks < torch.tensor(ks))
    # Every allowed token is reachable.
    k7 = [t for t, k in zip(out.sampled_token_ids.tolist(), ks) if k == 7]
    assert {rank[t].item() for t in k7} == set(range(7))


def test_top_k_paths_agree():
    torch.manual_seed(5)
    logits = torch.randn(6, 50)
    logits[2, 7] = -200.0  # probability underflows to 0; still untouched with top-k/p off
    top_k = torch.tensor([1, 5, 50, 50, 20, 3])
    only_k = apply_top_k_top_p(logits, top_k, 20, None)
    with_sort = apply_top_k_top_p(logits, top_k, 20, torch.ones(6))
    assert torch.equal(only_k, with_sort)
    assert torch.equal((only_k > -math.inf).sum(-1), top_k)
    assert torch.equal(only_k[2], logits[2])


def test_top_p_keeps_nucleus():
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 3000
    logits = logits_from_probs(probs, n)
    for top_p, nucleus in [(0.4, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3})]:
        assert sampled_set(logits, [row(top_p=top_p) for _ in range(n)]) == nucleus, top_p


def test_tiny_top_p_keeps_top_token():
    torch.manual_seed(11)
    logits = torch.randn(300, 1000) * 0.01  # nearly flat: cumulative sums round
    out = run(logits, [row(top_p=1e-9) for _ in range(300)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_top_p_after_top_k_renormalises():
    # top_k=2 leaves {0.5, 0.3} -> {0.625, 0.375}; top_p=0.6 then keeps only token 0.
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05], 500)
    assert sampled_set(logits, [row(top_k=2, top_p=0.6) for _ in range(500)]) == {0}
    assert sampled_set(logits, [row(top_k=3, top_p=0.95) for _ in range(500)]) == {0, 1, 2}


def test_min_p():
    probs = [0.4, 0.3, 0.2, 0.1]
    n = 3000
    logits = logits_from_probs(probs, n)
    assert sampled_set(logits, [row(min_p=0.6) for _ in range(n)]) == {0, 1}
    assert sampled_set(logits, [row(min_p=0.4) for _ in range(n)]) == {0, 1, 2}
    assert sampled_set(logits, [row(min_p=1.0) for _ in range(n)]) == {0}
    direct = apply_min_p(torch.tensor([probs, probs]), torch.tensor([0.6, 0.0]))
    assert torch.equal(direct, torch.tensor([[0.4, 0.3, 0.0, 0.0], probs]))


def test_low_temperature_approaches_argmax():
    torch.manual_seed(6)
    # Distinct logits 0.5 apart: at T=0.01 the runner-up has probability ~e^-50.
    logits = torch.stack([torch.randperm(100).float() * 0.5 for _ in range(200)])
    out = run(logits, [row(temperature=0.01) for _ in range(200)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    out = run(logits, [row(temperature=1e-7) for _ in range(200)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def manual_penalties(logits, prompt, output, rep, freq, pres):
    out = logits.clone()
    for t in range(logits.shape[0]):
        x = out[t].item()
        if t in prompt or t in output:
            x = x / rep if x > 0 else x * rep
        count = output.count(t)
        x -= freq * count
        x -= pres * (count > 0)
        out[t] = x
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_formulas(device):
    torch.manual_seed(7)
    vocab = 20
    logits = torch.randn(4, vocab, device=device) * 2
    specs = [
        dict(repetition_penalty=1.7, prompt=[1, 2, 3, 3], output=[3, 4, 4, 9]),
        dict(frequency_penalty=0.5, presence_penalty=-0.3, prompt=[0, 5], output=[5, 5, 5, 6]),
        dict(repetition_penalty=0.8, frequency_penalty=-1.0, presence_penalty=2.0,
             prompt=[10, 11], output=[11, 12, 12]),
        dict(prompt=[1, 2], output=[1, 2]),  # no penalties: untouched
    ]
    rows = []
    for s in specs:
        s = dict(s)
        prompt, output = s.pop("prompt"), s.pop("output")
        rows.append(row(prompt=prompt, output=output, **s))
    batch = SamplingBatch.build(rows, vocab, device)
    assert batch.any_penalties
    processed = Sampler.apply_logits_processors(logits, batch).cpu()
    logits = logits.cpu()
    for i, r in enumerate(rows):
        p = r.params
        expected = manual_penalties(
            logits[i], list(r.prompt_token_ids), list(r.output_token_ids),
            p.repetition_penalty, p.frequency_penalty, p.presence_penalty,
        )
        assert torch.allclose(processed[i], expected, atol=1e-6), i
    assert torch.equal(processed[3], logits[3])


def test_apply_penalties_helper():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    # Row 0: token 0 seen twice in the output, token 1 once, token 2 in the prompt
    # (listed twice: duplicates must not penalise twice). Row 1: token 3 in the output.
    prompt_index = torch.tensor([2, 2])
    output_index = torch.tensor([0, 0, 1, 4 + 3])
    apply_penalties(logits, prompt_index, output_index, torch.tensor([2.0, 1.0]),
                    torch.tensor([0.5, 0.0]), torch.tensor([0.25, 1.0]))
    expected = torch.tensor([
        [2.0 / 2 - 1.0 - 0.25, -2.0 * 2 - 0.5 - 0.25, 0.5, 0.5],
        [2.0, -2.0, 1.0, 0.5 - 1.0],
    ])
    assert torch.equal(logits, expected)


def test_logprobs_are_computed_only_when_a_row_asks():
    """With no row asking, the sampler skips the normaliser's pass over the logits: no logprobs at all. One row
    asking for logprobs=0 gets the sampled token's logprob of every row and no top-k columns."""
    torch.manual_seed(5)
    logits = torch.randn(3, 50)
    out = run(logits, [row(), row(temperature=0.0), row()])
    assert out.sampled_logprobs is None and out.topk_token_ids is None and out.topk_logprobs is None
    out = run(logits, [row(temperature=0.0), row(logprobs=0, temperature=0.0), row(temperature=0.0)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    expected = torch.log_softmax(logits, dim=-1).gather(1, out.sampled_token_ids[:, None]).squeeze(1)
    assert torch.allclose(out.sampled_logprobs, expected, atol=1e-5)
    assert out.topk_token_ids.shape == (3, 0) and out.topk_logprobs.shape == (3, 0)


def test_no_processing_is_free():
    batch = SamplingBatch.build([row(), row(temperature=0.0)], 10, CPU)
    assert not (batch.any_penalties or batch.any_top_k or batch.any_top_p or batch.any_min_p)
    assert batch.max_num_logprobs is None
    logits = torch.randn(2, 10)
    assert Sampler.apply_logits_processors(logits, batch) is logits


def test_logit_bias_forces_token():
    torch.manual_seed(8)
    logits = torch.randn(50, 30)
    out = run(logits, [row(logit_bias={17: 100.0}) for _ in range(50)])
    assert torch.all(out.sampled_token_ids == 17)
    top = logits[0].argmax().item()
    second = logits[0].topk(2).indices[1].item()
    out = run(logits[:1], [row(temperature=0.0, logit_bias={top: -100.0})])
    assert out.sampled_token_ids.item() == second


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_blocks_eos_and_stop_tokens(device):
    vocab, eos, stop = 10, 0, 7
    logits = torch.zeros(6, vocab, device=device)
    logits[:, eos] = 20.0
    logits[:, stop] = 19.0
    rows = [
        row(temperature=0.0, min_tokens=3, stop_token_ids=[stop], output=[4], eos=eos),
        row(min_tokens=3, stop_token_ids=[stop], output=[4, 5], eos=eos),
        row(temperature=0.0, min_tokens=3, stop_token_ids=[stop], output=[4, 5, 6], eos=eos),
        row(temperature=0.0, min_tokens=3, output=[4], eos=None),
        row(temperature=0.0, min_tokens=3, ignore_eos=True, output=[], eos=eos),
        row(temperature=0.0, output=[], eos=eos),
    ]
    out = run(logits, rows)
    ids = out.sampled_token_ids.tolist()
    assert ids[0] not in (eos, stop) and ids[1] not in (eos, stop) and ids[4] != eos
    assert ids[2] == eos and ids[3] == eos and ids[5] == eos


def seeded_tokens(logits_per_step, position, params, others, seed=1234):
    """Sample `steps` tokens for one seeded row placed at `position` among `others`."""
    device = logits_per_step[0].device
    gen = torch.Generator(device=device)
    tokens = []
    for logits in logits_per_step:
        gen.manual_seed(position_seed(seed, 0, len(tokens)))
        rows = [row(p) for p in others]
        rows.insert(position, row(params, output=list(tokens), prompt=[1, 2, 3], generator=gen))
        vocab = logits.shape[-1]
        full = torch.randn(len(rows), vocab, device=device)
        full[position] = logits
        tokens.append(run(full, rows).sampled_token_ids[position].item())
    return tokens


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(seed=1234),
        SamplingParams(seed=1234, temperature=0.8, top_k=20),
        SamplingParams(seed=1234, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_independent_of_batch(params, device):
    torch.manual_seed(9)
    steps = [torch.randn(257, device=device) * 2 for _ in range(12)]
    reference = seeded_tokens(steps, 0, params, [])
    assert len(set(reference)) > 1
    batches = [
        (2, [SamplingParams(), SamplingParams(temperature=0.0)]),
        (1, [SamplingParams(top_p=0.5), SamplingParams(top_k=3, seed=7)]),  # forces the sort path
        (3, [SamplingParams(presence_penalty=1.0), SamplingParams(min_p=0.3),
             SamplingParams(logit_bias={3: 5.0}), SamplingParams(top_k=5, logprobs=4)]),
    ]
    for position, others in batches:
        torch.manual_seed(position)
        assert seeded_tokens(steps, position, params, others) == reference
    assert seeded_tokens(steps, 0, params, [], seed=99) != reference


def test_position_seed_gives_unrelated_streams():
    seeds = {position_seed(42, i, p) for i in range(5) for p in range(5)}
    assert len(seeds) == 25
    # Derived streams are not just seed + i, in either coordinate.
    assert position_seed(42, 1, 0) != position_seed(43, 0, 0)
    assert position_seed(42, 0, 1) != position_seed(43, 0, 0)
    assert position_seed(42, 0, 0) == position_seed(42, 0, 0)
    for seed in (-5, 2**70):
        assert 0 <= position_seed(seed, 3, 7) < 2**64
        torch.Generator().manual_seed(position_seed(seed, 3, 7))


def test_sampling_frequencies_match_probabilities():
    torch.manual_seed(10)
    probs = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01])
    n = 20000
    for temperature in (1.0, 0.5):
        logits = (probs.log() * temperature).expand(n, -1).contiguous()
        out = run(logits, [row(temperature=temperature) for _ in range(n)])
        counts = torch.bincount(out.sampled_token_ids, minlength=len(probs)).double()
        expected = probs.double() * n
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 30.0, chi2  # df = 7: p ~ 1e-4 under the null


def test_seeded_frequencies_match_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.2])
    gen = torch.Generator(device=CPU)
    logits = probs.log()[None]
    batch = SamplingBatch.build([row(generator=gen)], 3, CPU)
    draws = []
    for position in range(3000):   # as a seeded sequence draws: one seed per output position
        gen.manual_seed(position_seed(5, 0, position))
        draws.append(sampler(logits, batch).sampled_token_ids.item())
    counts = torch.bincount(torch.tensor(draws), minlength=3).double()
    expected = probs.double() * 3000
    assert ((counts - expected) ** 2 / expected).sum().item() < 20.0


# ------------------------------------------------------------------ structured outputs: the grammar's bitmask


def allowing(vocab: int, rows: dict[int, list[int]], num_rows: int) -> torch.Tensor:
    """An int32 bitmask of ``num_rows`` rows where row r allows only ``rows[r]`` (tokens < 31)."""
    from llmserve.structured_output import allocate_token_bitmask

    bitmask = allocate_token_bitmask(num_rows, vocab, fill=0)
    for r, tokens in rows.items():
        for t in tokens:
            bitmask[r, t // 32] |= 1 << (t % 32)
    return bitmask


def test_bitmask_constrains_its_rows_only_and_logprobs_stay_the_models():
    """Constrained rows pick among their allowed tokens (greedy and sampled), after logit bias; the other
    rows are untouched; returned logprobs are of the raw logits, as for unconstrained rows (vLLM's default)."""
    torch.manual_seed(11)
    vocab = 40
    logits = torch.randn(4, vocab)
    rows = [row(temperature=0.0, logprobs=2, logit_bias={7: 100.0}), row(temperature=0.0),
            row(temperature=1.0), row(temperature=0.0)]
    bitmask = allowing(vocab, {0: [3, 5], 2: [9, 12]}, 4)
    batch = SamplingBatch.build(rows, vocab, CPU, bitmask, [0, 2])
    out = sampler(logits, batch)
    assert out.sampled_token_ids[0] == (3 if logits[0, 3] > logits[0, 5] else 5)   # the bias on 7 cannot win
    assert out.sampled_token_ids[2] in (9, 12)
    for i in (1, 3):
        assert out.sampled_token_ids[i] == logits[i].argmax()
    raw = compute_logprobs(logits)
    chosen = out.sampled_token_ids[0]
    assert math.isclose(out.sampled_logprobs[0].item(), raw[0, chosen].item(), rel_tol=1e-5)
    assert torch.equal(out.topk_token_ids[0], raw[0].topk(2).indices)


def test_min_tokens_yields_only_where_the_grammar_may_only_end():
    """Under min_tokens EOS is banned; a constrained row whose grammar allows EOS and more takes the more, one
    whose grammar allows only EOS keeps EOS rather than a row of -inf."""
    vocab, eos = 30, 2
    logits = torch.zeros(3, vocab)
    logits[:, eos] = 5.0
    rows = [row(temperature=0.0, min_tokens=3, eos=eos) for _ in range(3)]
    bitmask = allowing(vocab, {0: [eos, 4], 1: [eos]}, 3)
    batch = SamplingBatch.build(rows, vocab, CPU, bitmask, [0, 1])
    processed = Sampler.apply_logits_processors(logits, batch)
    assert not torch.isneginf(processed).all(dim=1).any()
    assert processed[1, eos] == 5.0 and torch.isneginf(processed[2, eos])
    assert sampler(logits, batch).sampled_token_ids.tolist()[:2] == [4, eos]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1e300])
@pytest.mark.parametrize("repetition_penalty", [1e300, 1e-300])
def test_penalties_and_temperatures_beyond_float32_keep_a_grammar_row_sampleable(repetition_penalty, temperature):
    """Any positive repetition penalty and temperature are accepted (as in vLLM), some beyond float32. A penalised
    logit stays finite (a zero one is not 0 x inf = NaN, a negative one not -inf), and a masked -inf over an infinite
    temperature is no NaN, so a row whose grammar allows only tokens it has seen still samples one of them."""
    vocab = 40
    logits = torch.zeros(2, vocab)
    logits[:, 3], logits[:, 5], logits[:, 9] = -2.0, 0.0, 4.0
    rows = [row(temperature=temperature, repetition_penalty=repetition_penalty, prompt=[3, 5, 9]) for _ in range(2)]
    batch = SamplingBatch.build(rows, vocab, CPU, allowing(vocab, {0: [3, 5]}, 2), [0])
    processed = Sampler.apply_logits_processors(logits, batch)
    assert not processed.isnan().any() and processed[0, [3, 5]].isfinite().all() and processed[1, [3, 5, 9]].isfinite().all()
    out = sampler(logits, batch).sampled_token_ids.tolist()
    assert out[0] in (3, 5) and 0 <= out[1] < vocab
