"""Sampling parameters end to end, through ``LLM.generate`` on the tiny Llama checkpoint.

Specified: a seeded request produces the same tokens whatever else shares its batches (other
requests, other parameters, its position, requests joining mid-run), and different seeds give
different samples; greedy limits agree with greedy (``top_k=1``, ``top_p`` tiny, ``min_p=1``,
``temperature=0`` whatever the seed); the repetition penalty is vLLM's/HF's (prompt and output
tokens, multiplicative) and equals transformers' ``generate(repetition_penalty=...)``; frequency
and presence penalties count output tokens only and are additive; penalties push repetition in
the expected direction; ``logit_bias`` of +100 forces a token and -100 forbids it; ``logprobs=k``
returns the sampled token and the top k (k or k+1 entries) with ranks, of the raw model logits,
summing to ``cumulative_logprob``.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.engine.llm_engine import OutputKind
from tests.hf_reference import hf_model

PROMPT = "Hello world, this is"
OTHER = "The quick brown fox"
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, seed=1234, max_tokens=16, ignore_eos=True)
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), kv_cache_memory_bytes="32MiB", max_model_len=128)


def completion(llm, prompt, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("ignore_eos", True)
    return llm.generate([prompt], SamplingParams(**kw))[0].outputs[0]


def greedy(llm, prompt=PROMPT, **kw):
    return completion(llm, prompt, temperature=0.0, **kw).token_ids


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


# ------------------------------------------------------------------ seeds


def other_requests():
    """Five requests with assorted parameters (some seeded, some not) to share the batch with."""
    return [
        ("A", SamplingParams(temperature=0.0, max_tokens=20)),
        ("def add(a, b):\n    return a + b", SamplingParams(temperature=1.3, top_k=5, max_tokens=9)),
        (OTHER, SamplingParams(n=2, temperature=0.7, presence_penalty=1.0, seed=7, max_tokens=14)),
        ("Une phrase en français", SamplingParams(temperature=1.0, top_p=0.5, min_p=0.05, logprobs=3,
                                                  repetition_penalty=1.2, max_tokens=25)),
        (PROMPT, SamplingParams(temperature=1.0, logit_bias={5: 3.0}, frequency_penalty=0.5, max_tokens=5)),
    ]


def test_seeded_request_is_independent_of_its_batch(llm):
    alone = llm.generate([PROMPT], SEEDED)[0].outputs[0]
    others = other_requests()
    for position in (0, 3, 5):
        prompts = [p for p, _ in others]
        params = [s for _, s in others]
        prompts.insert(position, PROMPT)
        params.insert(position, SEEDED)
        together = llm.generate(prompts, params)[position].outputs[0]
        assert together.token_ids == alone.token_ids, f"position {position}"
        assert together.text == alone.text


def test_seeded_request_joining_a_running_batch(llm):
    alone = llm.generate([PROMPT], SEEDED)[0].outputs[0].token_ids
    engine = llm.engine
    for i, (prompt, params) in enumerate(other_requests()):
        engine.add_request(f"other{i}", prompt, params)
    finished = {}
    for step in range(1000):
        if step == 4:
            engine.add_request("seeded", PROMPT, SEEDED, output_kind=OutputKind.FINAL_ONLY)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert finished["seeded"].outputs[0].token_ids == alone


def test_seeded_request_under_chunked_prefill_and_preemption(llama_dir, llm):
    alone = llm.generate([PROMPT], SEEDED)[0].outputs[0].token_ids
    block = llm.engine.runner.kv_cache_bytes_per_block() // 16 * 4
    tight = LLM(str(llama_dir), block_size=4, max_num_batched_tokens=6, kv_cache_memory_bytes=14 * block,
                max_model_len=128)
    prompts = [p for p, _ in other_requests()] + [PROMPT]
    params = [s for _, s in other_requests()] + [SEEDED]
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert outs[-1].outputs[0].token_ids == alone


def test_same_seed_same_tokens_different_seeds_differ(llm):
    samples = [completion(llm, PROMPT, temperature=1.0, seed=seed).token_ids for seed in range(5)]
    assert len({tuple(s) for s in samples}) == 5
    assert completion(llm, PROMPT, temperature=1.0, seed=3).token_ids == samples[3]


def test_parallel_samples_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=99, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = [c.token_ids for c in llm.generate([PROMPT], params)[0].outputs]
    again = [c.token_ids for c in llm.generate([PROMPT], params)[0].outputs]
    assert first == again
    assert len({tuple(s) for s in first}) == 3
    # Sample 0 of an n=3 request is the n=1 sample of the same seed.
    assert first[0] == completion(llm, PROMPT, temperature=1.0, seed=99).token_ids


# ------------------------------------------------------------------ limits that are greedy


def test_temperature_zero_ignores_seed(llm):
    ref = greedy(llm)
    assert greedy(llm, seed=1) == greedy(llm, seed=2) == ref
    assert ref != completion(llm, PROMPT, temperature=1.0, seed=1).token_ids


@pytest.mark.parametrize("knobs", [
    dict(top_k=1), dict(top_k=1, seed=5), dict(top_p=1e-6, seed=5), dict(min_p=1.0, seed=5),
    dict(temperature=1e-6, seed=5),
])
def test_greedy_limits_equal_greedy(llm, knobs):
    kw = {"temperature": 1.0, **knobs}
    assert completion(llm, PROMPT, **kw).token_ids == greedy(llm)
    assert completion(llm, OTHER, **kw).token_ids == greedy(llm, OTHER)


# ------------------------------------------------------------------ penalties


def prompt_with_repeating_continuation(llm) -> list[int]:
    """OTHER plus greedy tokens up to a point where greedy's next token is already in the prompt."""
    tok = llm.get_tokenizer()
    ids = tok.encode(OTHER)
    cont = greedy(llm, OTHER, max_tokens=30)
    for k in range(1, len(cont)):
        if cont[k] in cont[:k]:
            return ids + cont[:k]
    pytest.fail("greedy output of OTHER never repeats a token")


@torch.inference_mode()
def hf_greedy_penalised(path, prompt_ids, max_new_tokens, frequency=0.0, presence=0.0):
    """Reference greedy decoding with vLLM's additive penalties over output tokens, on HF's model."""
    model = hf_model(str(path))
    ids = list(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits = logits - frequency * counts - presence * (counts > 0).float()
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
    return out


def test_repetition_penalty_equals_transformers(llm, llama_dir):
    prompt = prompt_with_repeating_continuation(llm)
    model = hf_model(str(llama_dir))
    for penalty in (1.3, 2.0, 0.7):
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS,
                             min_new_tokens=MAX_TOKENS, repetition_penalty=penalty, pad_token_id=0)
        ref = ref[0, len(prompt):].tolist()
        assert greedy(llm, prompt, repetition_penalty=penalty) == ref, f"repetition_penalty={penalty}"


@pytest.mark.parametrize("frequency, presence", [(2.0, 0.0), (0.0, 2.0), (0.5, 1.0), (-2.0, 0.0), (0.0, -2.0)])
def test_frequency_and_presence_penalties_match_reference(llm, llama_dir, frequency, presence):
    prompt = prompt_with_repeating_continuation(llm)
    got = greedy(llm, prompt, frequency_penalty=frequency, presence_penalty=presence, max_tokens=24)
    assert got == hf_greedy_penalised(llama_dir, prompt, 24, frequency, presence)


def test_penalties_only_repetition_penalty_sees_the_prompt(llm):
    """Greedy's next token is in the prompt: repetition_penalty avoids it, the output-only penalties do not."""
    prompt = prompt_with_repeating_continuation(llm)
    first = greedy(llm, prompt, max_tokens=1)[0]
    assert first in prompt
    assert greedy(llm, prompt, max_tokens=1, frequency_penalty=2.0)[0] == first
    assert greedy(llm, prompt, max_tokens=1, presence_penalty=2.0)[0] == first
    assert greedy(llm, prompt, max_tokens=1, repetition_penalty=2.0)[0] != first


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=2.0), dict(frequency_penalty=2.0),
                                     dict(presence_penalty=2.0)])
def test_penalties_reduce_repetition(llm, penalty):
    for prompt in (PROMPT, OTHER):
        base = greedy(llm, prompt, max_tokens=40)
        assert repeats(base) >= 4
        assert repeats(greedy(llm, prompt, max_tokens=40, **penalty)) < repeats(base)


def test_repetition_penalty_below_one_encourages_repetition(llm):
    for prompt in (PROMPT, OTHER):
        base = greedy(llm, prompt, max_tokens=40)
        assert repeats(greedy(llm, prompt, max_tokens=40, repetition_penalty=0.5)) > repeats(base)


# ------------------------------------------------------------------ logit bias


def test_logit_bias_forces_a_token(llm):
    for params in (dict(temperature=0.0), dict(temperature=1.0, seed=4), dict(temperature=1.5)):
        out = completion(llm, PROMPT, logit_bias={42: 100.0}, **params)
        assert out.token_ids == [42] * MAX_TOKENS


def test_logit_bias_forbids_a_token(llm):
    ref = greedy(llm)
    banned = ref[0]
    out = greedy(llm, logit_bias={banned: -100.0})
    assert out[0] != banned and banned not in out
    # A string key (as JSON sends it) is the same token id.
    assert greedy(llm, logit_bias={str(banned): -100.0}) == out


# ------------------------------------------------------------------ logprobs


def check_logprobs(out, k: int) -> None:
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    total = 0.0
    for token, position in zip(out.token_ids, out.logprobs):
        assert token in position
        sampled = position[token]
        top = sorted((lp for t, lp in position.items() if lp.rank <= k), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == list(range(1, min(k, len(top)) + 1)) and len(top) == k
        assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
        assert len(position) == (k if sampled.rank <= k else k + 1)
        assert sum(math.exp(lp.logprob) for lp in position.values()) <= 1.0 + 1e-5
        assert all(lp.logprob <= 0.0 for lp in position.values())
        # rank r: exactly r - 1 tokens are more likely; the top entries agree with that
        assert all((lp.logprob > sampled.logprob + 1e-6) <= (lp.rank < sampled.rank) for lp in top)
        if sampled.rank > 1:
            assert top[0].logprob >= sampled.logprob
        total += sampled.logprob
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs_greedy(llm, k):
    out = completion(llm, PROMPT, temperature=0.0, logprobs=k)
    check_logprobs(out, k)
    assert all(pos[t].rank == 1 for t, pos in zip(out.token_ids, out.logprobs))
    assert all(len(pos) == max(k, 1) for pos in out.logprobs)
    assert out.token_ids == greedy(llm)


def test_logprobs_sampled(llm):
    out = completion(llm, PROMPT, temperature=1.5, seed=8, logprobs=2, max_tokens=24)
    check_logprobs(out, 2)
    assert any(pos[t].rank > 2 for t, pos in zip(out.token_ids, out.logprobs)), "expected some unlikely picks"
    # Asking for logprobs does not change what is sampled.
    assert out.token_ids == completion(llm, PROMPT, temperature=1.5, seed=8, max_tokens=24).token_ids


def test_logprobs_are_those_of_the_raw_model(llm):
    """logit_bias changes what is sampled, not the reported logprob (that of the unprocessed logits)."""
    tok = llm.get_tokenizer()
    forced = completion(llm, PROMPT, temperature=0.0, logit_bias={42: 100.0}, logprobs=1, max_tokens=1)
    prompt_ids = tok.encode(PROMPT) + [42]
    raw = llm.generate([prompt_ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs[-1][42]
    assert forced.logprobs[0][42].logprob == pytest.approx(raw.logprob, abs=1e-4)
    assert forced.logprobs[0][42].rank == raw.rank > 1
    assert forced.logprobs[0][42].decoded_token == tok.convert_ids_to_tokens(42)
    assert forced.cumulative_logprob == pytest.approx(raw.logprob, abs=1e-4)


def test_logprobs_do_not_depend_on_k(llm):
    small = completion(llm, PROMPT, temperature=0.0, logprobs=1)
    large = completion(llm, PROMPT, temperature=0.0, logprobs=10)
    for a, b in zip(small.logprobs, large.logprobs):
        for token, lp in a.items():
            assert b[token].logprob == pytest.approx(lp.logprob, abs=1e-5) and b[token].rank == lp.rank
    assert small.cumulative_logprob == pytest.approx(large.cumulative_logprob, abs=1e-4)


def test_no_logprobs_asked_none_returned(llm):
    out = completion(llm, PROMPT, temperature=0.0)
    assert out.logprobs is None and out.cumulative_logprob is None
