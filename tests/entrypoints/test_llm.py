"""The offline API, ``LLM``.

Specified: ``generate`` takes one prompt or many, as text, token ids or vLLM's dict forms, with one
``SamplingParams`` for all or one per prompt, and returns finished outputs in the order of the
prompts; if any prompt is refused, none runs, the error names the prompt's index and keeps the
offending ``param``, and the engine is left idle and usable; an exception while running aborts the
batch without leaking KV blocks. ``chat`` renders the tokenizer's (or a given) chat template,
with the generation prompt, and generates from it. ``embed`` takes the same prompt forms and returns,
in prompt order, each prompt's token ids and its pooled vector ``outputs.embedding`` (a list of
``hidden_size`` floats, unit length by default); a prompt may fill the whole context, a longer one is
refused like a completion's (its values against HF: tests/engine/test_pooling.py).
"""

from __future__ import annotations

import pytest

from llmserve import LLM, RequestOutput, SamplingParams
from llmserve.errors import InvalidRequestError
from llmserve.outputs import EmbeddingRequestOutput
from llmserve.pooling_params import PoolingParams

PROMPTS = ["Hello world, this is", "The quick brown fox", "A"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), kv_cache_memory_bytes="32MiB", max_model_len=64)


@pytest.fixture(autouse=True)
def leaves_engine_idle(llm):
    yield
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_unfinished == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def reference(llm) -> dict[str, list[int]]:
    """Greedy tokens of each prompt generated on its own."""
    return {p: llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS}


def tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_outputs_come_back_in_prompt_order(llm, reference):
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.prompt for o in outputs] == PROMPTS
    assert tokens(outputs) == [reference[p] for p in PROMPTS]
    assert all(o.finished for o in outputs)
    assert len({o.request_id for o in outputs}) == 3


def test_prompt_forms_are_equivalent(llm, reference):
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    single = llm.generate(PROMPTS[0], GREEDY)
    assert len(single) == 1 and tokens(single) == [reference[PROMPTS[0]]]
    assert tokens(llm.generate(ids[0], GREEDY)) == [reference[PROMPTS[0]]]        # one prompt as ids
    assert tokens(llm.generate(ids, GREEDY)) == [reference[p] for p in PROMPTS]   # many as ids
    mixed = [{"prompt": PROMPTS[0]}, {"prompt_token_ids": ids[1]}, PROMPTS[2]]
    outputs = llm.generate(mixed, GREEDY)
    assert tokens(outputs) == [reference[p] for p in PROMPTS]
    assert outputs[0].prompt == PROMPTS[0] and outputs[1].prompt is None
    assert outputs[1].prompt_token_ids == ids[1]


def test_max_tokens_zero_scores_the_prompt(llm):
    """max_tokens=0 with prompt_logprobs: nothing generated ("length", empty text), and the prompt's logprobs
    are those a generating request gets; with n=2 both samples are empty."""
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=2, n=2)
    scored, generated = llm.generate(PROMPTS[:1], scoring)[0], llm.generate(
        PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))[0]
    assert [(c.text, c.token_ids, c.finish_reason) for c in scored.outputs] == [("", [], "length")] * 2
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(scored.prompt_token_ids)
    for ours, theirs, token in zip(scored.prompt_logprobs[1:], generated.prompt_logprobs[1:],
                                   scored.prompt_token_ids[1:]):
        assert ours[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-5)
        assert ours.keys() == theirs.keys()


def test_default_sampling_params(llm):
    out = llm.generate(PROMPTS[0])[0].outputs[0]
    assert 1 <= len(out.token_ids) <= 16      # vLLM's default max_tokens
    assert out.finish_reason in ("stop", "length")


def test_one_sampling_params_per_prompt(llm, reference):
    params = [SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True) for k in (1, 3, 6)]
    outputs = llm.generate(PROMPTS, params)
    assert tokens(outputs) == [reference[p][:k] for p, k in zip(PROMPTS, (1, 3, 6))]
    with pytest.raises(ValueError, match="3 prompts but 2"):
        llm.generate(PROMPTS, params[:2])


@pytest.mark.parametrize("bad_index, bad_prompt, param", [
    (0, "", "prompt"),
    (2, [5] * 64, "prompt"),
    (1, {"prompt_token_ids": [1, 99999]}, "prompt"),
    (2, {"text": "no prompt key"}, "prompt"),
])
def test_one_bad_prompt_runs_none(llm, reference, bad_index, bad_prompt, param):
    prompts = list(PROMPTS)
    prompts[bad_index] = bad_prompt
    generated = llm.engine.num_generation_tokens_total
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(prompts, GREEDY)
    assert str(info.value).startswith(f"prompt {bad_index}: ")
    assert info.value.param == param
    assert llm.engine.num_generation_tokens_total == generated, "some prompt ran"
    assert not llm.engine.has_unfinished_requests()
    assert tokens(llm.generate(PROMPTS, GREEDY)) == [reference[p] for p in PROMPTS]


def test_bad_params_for_one_prompt_runs_none(llm):
    params = [GREEDY, SamplingParams(logprobs=1000), GREEDY]
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(PROMPTS, params)
    assert str(info.value).startswith("prompt 1: ") and info.value.param == "logprobs"


def test_context_error_message_keeps_vllm_wording(llm):
    with pytest.raises(InvalidRequestError, match=r"^prompt 0: This model's maximum context length is 64"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10))


def test_exception_while_running_aborts_the_batch(llm, reference, monkeypatch):
    real = llm.engine.step
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY)
    monkeypatch.setattr(llm.engine, "step", real)
    assert tokens(llm.generate(PROMPTS, GREEDY)) == [reference[p] for p in PROMPTS]


def test_chat_renders_the_template_and_generates(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    out = llm.chat(messages, GREEDY)
    assert len(out) == 1
    rendered = tok.decode(out[0].prompt_token_ids)
    assert "<<SYS>>\nBe brief.\n<</SYS>>\n\nhi there [/INST]" in rendered
    assert out[0].prompt_token_ids[0] == tok.bos_token_id
    assert out[0].prompt_token_ids == tok.encode(tok.apply_chat_template(messages, tokenize=False),
                                                 add_special_tokens=False)
    assert len(out[0].outputs[0].token_ids) == 6
    # Same tokens as generating from the rendered prompt ourselves.
    assert tokens(llm.generate([out[0].prompt_token_ids], GREEDY)) == tokens(out)


def test_chat_passes_tools_to_the_template(checkpoint_dir):
    qwen = LLM(str(checkpoint_dir("qwen2")), kv_cache_memory_bytes="8MiB", max_model_len=512)
    tok = qwen.get_tokenizer()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = qwen.chat(messages, GREEDY, tools=tools)
    rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '"name": "get_weather"' in rendered
    assert out[0].prompt_token_ids == tok.encode(rendered, add_special_tokens=False)


def test_chat_with_several_conversations_and_a_custom_template(llm):
    tok = llm.get_tokenizer()
    template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
    conversations = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    outputs = llm.chat(conversations, GREEDY, chat_template=template)
    assert len(outputs) == 2
    assert [tok.decode(o.prompt_token_ids, skip_special_tokens=True) for o in outputs] == [
        tok.decode(tok.encode("<<user>>one\n", add_special_tokens=False)),
        tok.decode(tok.encode("<<user>>two\n", add_special_tokens=False)),
    ]


def test_embed_returns_each_prompts_vector_in_prompt_order(llm):
    tok = llm.get_tokenizer()
    outputs = llm.embed(PROMPTS)
    assert [type(o) for o in outputs] == [EmbeddingRequestOutput] * 3
    assert [o.prompt for o in outputs] == PROMPTS
    assert [o.prompt_token_ids for o in outputs] == [tok.encode(p) for p in PROMPTS]
    hidden_size = llm.engine.hf_config.hidden_size
    for out in outputs:
        assert out.finished and out.outputs.hidden_size == hidden_size
        assert all(isinstance(x, float) for x in out.outputs.embedding)
        assert sum(x * x for x in out.outputs.embedding) == pytest.approx(1.0, abs=1e-5)
    assert len({tuple(o.outputs.embedding) for o in outputs}) == 3
    as_ids = llm.embed([{"prompt_token_ids": tok.encode(PROMPTS[1])}])[0]
    assert as_ids.prompt is None and as_ids.outputs.embedding == pytest.approx(outputs[1].outputs.embedding, abs=1e-6)
    raw = llm.embed(PROMPTS[:2], [PoolingParams(normalize=False), PoolingParams()])
    assert sum(x * x for x in raw[0].outputs.embedding) != pytest.approx(1.0, abs=1e-3)
    assert raw[1].outputs.embedding == pytest.approx(outputs[1].outputs.embedding, abs=1e-6)
    with pytest.raises(ValueError, match="3 prompts but 1 PoolingParams"):
        llm.embed(PROMPTS, [PoolingParams()])


def test_embed_takes_a_prompt_that_fills_the_context_and_refuses_a_longer_one(llm):
    assert llm.embed([[5] * 64])[0].outputs.hidden_size == llm.engine.hf_config.hidden_size
    with pytest.raises(InvalidRequestError, match=r"^prompt 1: This model's maximum context length is 64 tokens. "
                                                  r"However, the input has 65 tokens") as info:
        llm.embed([PROMPTS[0], [5] * 65])
    assert info.value.param == "prompt"


def test_a_prompt_dicts_cache_salt_keys_its_prefix_cache_blocks(llama_dir):
    """vLLM's ``{"prompt_token_ids": ..., "cache_salt": ...}``: the same salt shares cached blocks, another does
    not; an empty salt and a key the dict does not take are refused."""
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="8MiB", max_model_len=128, enable_prefix_caching=True)
    params = SamplingParams(max_tokens=1)
    prompt = list(range(1, 66))
    block_manager = llm.engine.core.block_manager

    def hits(**salt: str) -> int:
        before = block_manager.prefix_hit_tokens
        llm.generate([{"prompt_token_ids": prompt, **salt}], params)
        return block_manager.prefix_hit_tokens - before

    hits(cache_salt="tenant-a")
    assert hits(cache_salt="tenant-a") > 0
    assert hits(cache_salt="tenant-b") == 0
    assert hits() == 0
    with pytest.raises(InvalidRequestError, match="cache_salt must be a non-empty string"):
        llm.generate([{"prompt_token_ids": prompt, "cache_salt": ""}], params)
    with pytest.raises(InvalidRequestError, match="a prompt dict takes prompt, prompt_token_ids, cache_salt; not "
                                                  "multi_modal_data"):
        llm.generate([{"prompt_token_ids": prompt, "multi_modal_data": {}}], params)


@pytest.mark.parametrize("call, error, match", [
    (lambda llm: llm.generate("hi", PoolingParams()), TypeError, "expected a SamplingParams"),
    (lambda llm: llm.generate("hi", {"max_tokens": 1}), TypeError, "expected a SamplingParams"),
    (lambda llm: llm.generate(["a", "b"], [GREEDY, PoolingParams()]), TypeError, "SamplingParams 1 is a"),
    (lambda llm: llm.embed(["a"], [GREEDY]), TypeError, "PoolingParams 0 is a SamplingParams"),
    (lambda llm: llm.generate("hi", GREEDY, lora_request="adapter"), TypeError, "expected a LoRARequest"),
    (lambda llm: llm.generate(None, GREEDY), TypeError, "prompts must be"),
    (lambda llm: llm.generate({"prompt_token_ids": "hello"}, GREEDY), InvalidRequestError, "list of token ids"),
    (lambda llm: llm.generate({"prompt": [5, 6, 7]}, GREEDY), InvalidRequestError, "prompt_token_ids"),
    (lambda llm: llm.chat([{"content": "hi"}], GREEDY), InvalidRequestError, "message 0 must be a dict with a"),
], ids=["pooling-params-to-generate", "a-dict", "one-of-a-list", "sampling-params-to-embed", "lora-string",
        "no-prompts", "text-as-token-ids", "ids-as-prompt", "message-without-role"])
def test_arguments_of_the_wrong_kind_are_refused_naming_them(llm, call, error, match):
    """Never run as something else (a string of token ids tokenised as text, embeddings out of generate)."""
    with pytest.raises(error, match=match):
        call(llm)


def test_chat_takes_text_parts_template_variables_and_shows_progress(llm, capsys):
    tok = llm.get_tokenizer()
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    joined = [{"role": "user", "content": "one\ntwo"}]   # as the server joins them
    assert llm.chat(parts, GREEDY, use_tqdm=False)[0].prompt_token_ids == llm.chat(joined, GREEDY)[0].prompt_token_ids
    template = "{{ greeting }} {% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = llm.chat(joined, GREEDY, chat_template=template, chat_template_kwargs={"greeting": "Howdy"})[0]
    assert tok.decode(out.prompt_token_ids, skip_special_tokens=True).startswith("Howdy one")
    with pytest.raises(ValueError, match="may not set 'tokenize'"):
        llm.chat(joined, GREEDY, chat_template_kwargs={"tokenize": False})
    capsys.readouterr()
    llm.generate(PROMPTS, GREEDY)
    assert "Processed prompts" in capsys.readouterr().err   # vLLM's progress bar, on by default
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm):
    """vLLM's left truncation, for generation and embeddings alike: the prompt's last k tokens run, as if given
    alone (the text of a cut prompt is not reported: it no longer matches); -1 is the context length."""
    ids = llm.get_tokenizer().encode(PROMPTS[0] + " and then some more words")
    cut = llm.generate(PROMPTS[0] + " and then some more words", SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, truncate_prompt_tokens=3))[0]
    alone = llm.generate({"prompt_token_ids": ids[-3:]}, GREEDY)[0]
    assert cut.prompt_token_ids == ids[-3:] and cut.prompt is None
    assert cut.outputs[0].token_ids == alone.outputs[0].token_ids
    kept = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, truncate_prompt_tokens=-1))[0]
    assert kept.prompt_token_ids == ids   # shorter than the context: nothing to cut
    vectors = llm.embed([ids, ids[-2:]], [PoolingParams(truncate_prompt_tokens=2), PoolingParams()])
    assert vectors[0].prompt_token_ids == ids[-2:]
    assert vectors[0].outputs.embedding == pytest.approx(vectors[1].outputs.embedding, abs=1e-6)
    with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens must be -1 or at least 1"):
        SamplingParams(truncate_prompt_tokens=0)


def test_a_stream_interval_is_named_as_having_no_effect_on_finished_outputs(llama_dir, caplog):
    with caplog.at_level("WARNING", logger="llmserve.entrypoints.llm"):
        LLM(str(llama_dir), kv_cache_memory_bytes="8MiB", max_model_len=64, stream_interval=4)
    assert "stream_interval 4: no effect here" in caplog.text
