"""Multi-step decoding through the engine (``--num-scheduler-steps``): the compiled loop runs several decode steps
per engine step. A greedy output is exactly what one step at a time gives: the same tokens, the same finish,
whatever the dtype or weight format, with stops inside a step's tokens, with rows it cannot run in the batch and
under KV-cache pressure; unseeded random rows draw in the loop too (their distribution:
tests/layers/test_cpu_sampling.py). Engines it cannot run refuse the flag at start-up, saying why."""

from __future__ import annotations

import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.config import EngineConfig
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.testing.gguf_files import write_gguf
from llmserve.worker.multi_step import MultiStepUnsupported

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels are not available")

STEPS = 4
PROMPTS = ["Hello world, this is", "The quick brown fox jumps over the lazy dog and then keeps running far away",
           "A"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True)   # not a multiple of STEPS


def engine(path, steps: int, **kwargs) -> LLM:
    return LLM(str(path), kv_cache_memory_bytes=kwargs.pop("kv", "32MiB"), block_size=4, num_scheduler_steps=steps,
               **kwargs)


def outputs(llm: LLM, params=GREEDY, prompts=PROMPTS) -> list[tuple[list[int], str, str | None]]:
    params = params if isinstance(params, list) else [params] * len(prompts)
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
            for o in llm.generate(prompts, params)]


class StepCounter:
    """The decode steps of each engine step (``num_steps`` of its scheduler output)."""

    def __init__(self, llm: LLM) -> None:
        core = llm.engine.core
        schedule = core.scheduler.schedule
        self.num_steps: list[int] = []

        def counted():
            out = schedule()
            self.num_steps.append(out.num_steps)
            return out

        core.scheduler.schedule = counted


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("llama", "bfloat16"), ("qwen3", "float32"),
                                          ("qwen2", "bfloat16")])
def test_the_tokens_are_those_of_one_step_at_a_time(checkpoint_dir, family, dtype):
    path = checkpoint_dir(family)
    multi = engine(path, STEPS, dtype=dtype)
    counter = StepCounter(multi)
    assert outputs(multi) == outputs(engine(path, 1, dtype=dtype))
    # after the prompts' step, 10 tokens each: steps of 4, 4 and 2
    assert [n for n in counter.num_steps if n > 1] == [4, 4, 2]


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_0", "F16"])
def test_gguf_files_decode_the_same_in_several_steps(checkpoint_dir, tmp_path_factory, file_type):
    """Their packed (group-int8) LM head and layers run in the loop as in a step of their own."""
    source = checkpoint_dir("llama")
    path = write_gguf(source, tmp_path_factory.mktemp("gguf") / f"llama-{file_type}.gguf", "llama", file_type)
    multi = engine(path, STEPS, tokenizer=str(source))
    counter = StepCounter(multi)
    assert outputs(multi) == outputs(engine(path, 1, tokenizer=str(source)))
    assert max(counter.num_steps) == STEPS


def test_stops_inside_a_step_end_the_output_where_one_step_at_a_time_does(checkpoint_dir):
    path = checkpoint_dir("llama")
    multi, single = engine(path, 8), engine(path, 1)
    tokens, text, _ = outputs(single)[1]
    by_token = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[tokens[5]])
    by_text = SamplingParams(temperature=0.0, max_tokens=20, stop=[text[len(text) // 2:len(text) // 2 + 3]])
    for params in (by_token, by_text):
        got, want = outputs(multi, params), outputs(single, params)
        assert got == want
        assert want[1][2] == "stop"
    assert multi.engine.block_manager.num_free_blocks == multi.engine.block_manager.num_blocks


def test_rows_the_loop_cannot_run_make_plain_steps_with_the_same_output(checkpoint_dir):
    path = checkpoint_dir("llama")
    penalised = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, repetition_penalty=1.3)
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)   # (its own draws: plain steps)
    mixed = [GREEDY, penalised, seeded]
    multi = engine(path, STEPS)
    counter = StepCounter(multi)
    assert outputs(multi, mixed) == outputs(engine(path, 1), mixed)
    # one step a token while the seeded row runs (its 6 tokens), then the greedy row's last 5 in steps of 4 and 1
    assert counter.num_steps == [1] * 6 + [4, 1]


def test_under_kv_cache_pressure_the_output_is_unchanged(checkpoint_dir):
    """Too few free blocks for the lookahead makes plain steps (preemptions go on as they would)."""
    path = checkpoint_dir("llama")
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = PROMPTS * 3
    single = engine(path, 1, kv="64KiB")
    multi = engine(path, 8, kv="64KiB")
    counter = StepCounter(multi)
    assert outputs(multi, long, prompts) == outputs(single, long, prompts)
    assert max(counter.num_steps) > 1 and multi.engine.scheduler.num_preemptions > 0


def test_a_stream_gets_a_steps_tokens_together(checkpoint_dir):
    llm = engine(checkpoint_dir("llama"), STEPS)
    llm.engine.add_request("r", PROMPTS[0], GREEDY)
    counts = []
    while llm.engine.has_unfinished_requests():
        counts += [len(out.outputs[0].token_ids) for out in llm.engine.step()]
    assert counts == [1, 5, 9, 11]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_tied_lm_head_runs_in_the_loop_for_the_rows_its_kernel_takes(checkpoint_dir, dtype):
    """A tied head keeps the embedding's row-major layout; the module path multiplies it with a compiled kernel for
    up to 8 rows (float32) or 1 (bfloat16) and oneDNN above, so wider steps run plain, one token each."""
    path = checkpoint_dir("llama3")
    multi, single = engine(path, STEPS, dtype=dtype), engine(path, 1, dtype=dtype)
    counter = StepCounter(multi)
    fused = multi.engine.runner.fused_decode
    calls = fused.calls
    assert outputs(multi, prompts=PROMPTS[:1]) == outputs(single, prompts=PROMPTS[:1])
    assert [n for n in counter.num_steps if n > 1] == [4, 4, 2] and fused.calls - calls == 10
    calls, counter.num_steps = fused.calls, []
    assert outputs(multi) == outputs(single)
    assert fused.calls - calls == 10   # every decode step ran fused, in the loop or (bfloat16) one at a time
    assert fused.takes_steps(3) == (dtype == "float32")
    assert max(counter.num_steps) == (STEPS if dtype == "float32" else 1)   # the scheduler knows the head's rows


@pytest.mark.parametrize("family,kwargs,why", [
    ("gpt2", {}, r"fused CPU decode step is off \(layer 0.s rotary embedding is not neox-style"),
    ("llama", {"kv_cache_dtype": "int8"}, "fused CPU decode step is off .* quantised KV cache"),
])
def test_engines_the_loop_cannot_run_refuse_the_flag(checkpoint_dir, family, kwargs, why):
    with pytest.raises(MultiStepUnsupported, match=why):
        engine(checkpoint_dir(family), 2, **kwargs)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="--num-scheduler-steps must be >= 1"):
        EngineConfig(num_scheduler_steps=0)
    with pytest.raises(ValueError, match="speculative decoding"):
        EngineConfig(num_scheduler_steps=2, speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_the_loop_refuses_bad_operands(checkpoint_dir):
    llm = engine(checkpoint_dir("llama"), STEPS)
    fused = llm.engine.runner.fused_decode
    vocab = llm.engine.vocab_size
    tables = torch.zeros(1, 2, dtype=torch.int32)
    one = torch.tensor([0])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        fused.decode_steps(torch.tensor([vocab]), one, tables, 2)
    with pytest.raises(ValueError, match="do not cover position 8"):
        fused.decode_steps(one, torch.tensor([7]), tables, 2)


def test_the_loop_ends_after_the_step_that_samples_a_stop_token(checkpoint_dir):
    llm = engine(checkpoint_dir("llama"), STEPS)   # idle: its first two blocks are free to write
    fused = llm.engine.runner.fused_decode
    tables, first, start = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([5]), torch.tensor([0])
    tokens = fused.decode_steps(first, start, tables, 6)[:, 0].tolist()
    at = next(i for i in range(1, 6) if tokens[i] not in tokens[:i])
    ended = fused.decode_steps(first, start, tables, 6, [[-1, tokens[at]]])
    assert ended[:, 0].tolist() == tokens[:at + 1]
    # two rows (blocks 0-1 and 2-3), the second one's stop ends both
    two = fused.decode_steps(torch.tensor([5, 9]), torch.tensor([0, 0]), torch.tensor([[0, 1], [2, 3]],
                                                                                    dtype=torch.int32), 6)
    other = two[:, 1].tolist()
    at = next(i for i in range(1, 6) if other[i] not in other[:i])
    ended = fused.decode_steps(torch.tensor([5, 9]), torch.tensor([0, 0]), torch.tensor([[0, 1], [2, 3]],
                                                                                      dtype=torch.int32), 6,
                               [[], [other[at]]])
    assert ended.tolist() == two[:at + 1].tolist()


def test_worker_processes_run_it_too(checkpoint_dir):
    """The scheduler asks the workers how many rows their loop runs (a control call to the worker process)."""
    path = checkpoint_dir("llama")
    multi = engine(path, STEPS, distributed_executor_backend="mp")
    try:
        counter = StepCounter(multi)
        assert outputs(multi) == outputs(engine(path, 1))
        assert [n for n in counter.num_steps if n > 1] == [4, 4, 2]
    finally:
        multi.engine.shutdown()


def test_unseeded_random_rows_draw_in_the_loop(checkpoint_dir):
    """(their draws' distribution: tests/layers/test_cpu_sampling.py) A temperature near 0 draws the argmax, so
    the output is greedy's; a usual one runs in the loop too, whole outputs of valid tokens."""
    path = checkpoint_dir("llama")
    multi = engine(path, STEPS)
    counter = StepCounter(multi)
    cold = SamplingParams(temperature=1e-4, max_tokens=11, ignore_eos=True)
    assert [o[0] for o in outputs(multi, cold)] == [o[0] for o in outputs(engine(path, 1))]
    assert [n for n in counter.num_steps if n > 1] == [4, 4, 2]
    warm = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, min_p=0.02, max_tokens=11, ignore_eos=True)
    counter.num_steps = []
    for tokens, _, finish in outputs(multi, warm):
        assert len(tokens) == 11 and finish == "length" and all(0 <= t < multi.engine.vocab_size for t in tokens)
    assert [n for n in counter.num_steps if n > 1] == [4, 4, 2]
