"""Per-step timing of the offline engine: wall time of ``engine.step()`` split into the model forward
(+ LM head), the sampler and everything else (scheduling, input building, detokenising: engine overhead).

The profiler wraps the runner's ``execute``, the model's ``forward`` and ``compute_logits`` and the
sampler's ``forward`` with timers for as long as it is active, and records what each step ran.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from llmserve.engine.llm_engine import LLMEngine
from llmserve.sampling_params import SamplingParams


@dataclass
class StepRecord:
    num_seqs: int
    num_tokens: int
    num_decodes: int
    context_tokens: int     # tokens already in the KV cache of the scheduled sequences (read by attention)
    wall_s: float
    forward_s: float        # model forward + LM head
    sampler_s: float

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.forward_s - self.sampler_s

    @property
    def pure_decode(self) -> bool:
        return self.num_seqs > 0 and self.num_decodes == self.num_seqs


class _Timer:
    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


class StepProfiler:
    """``with StepProfiler(engine) as prof: prof.step()`` -> :class:`StepRecord` per engine step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.records: list[StepRecord] = []
        self._scheduled: list[tuple[Any, int]] = []

    def __enter__(self) -> StepProfiler:
        runner = self.engine.runner
        self._forward = _Timer(runner.model.forward)
        self._logits = _Timer(runner.model.compute_logits)
        self._sampler = _Timer(runner.sampler.forward)
        execute = runner.execute

        def traced_execute(scheduled: list[tuple[Any, int]], *args: Any, **kwargs: Any) -> Any:
            self._scheduled.extend((seq, n, seq.num_computed_tokens) for seq, n in scheduled)
            return execute(scheduled, *args, **kwargs)

        runner.model.forward, runner.model.compute_logits = self._forward, self._logits
        runner.sampler.forward, runner.execute = self._sampler, traced_execute
        return self

    def __exit__(self, *exc: Any) -> None:
        runner = self.engine.runner
        del runner.model.forward, runner.model.compute_logits, runner.sampler.forward, runner.execute

    def step(self) -> tuple[StepRecord, list[Any]]:
        before = (self._forward.seconds + self._logits.seconds, self._sampler.seconds)
        self._scheduled = []
        start = time.perf_counter()
        outputs = self.engine.step()
        wall = time.perf_counter() - start
        record = StepRecord(
            num_seqs=len(self._scheduled), num_tokens=sum(n for _, n, _ in self._scheduled),
            num_decodes=sum(1 for _, n, _ in self._scheduled if n == 1),
            context_tokens=sum(ctx for _, _, ctx in self._scheduled), wall_s=wall,
            forward_s=self._forward.seconds + self._logits.seconds - before[0],
            sampler_s=self._sampler.seconds - before[1])
        self.records.append(record)
        return record, outputs


def run_to_completion(engine: LLMEngine, profiler: StepProfiler) -> list[StepRecord]:
    records = []
    while engine.has_unfinished_requests():
        records.append(profiler.step()[0])
    return records


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def summarize(records: list[StepRecord]) -> dict[str, float]:
    """Mean per-step figures (ms) of ``records``."""
    if not records:
        return {"steps": 0, "step_ms": 0.0, "median_step_ms": 0.0, "model_forward_ms": 0.0, "sampler_ms": 0.0,
                "engine_overhead_ms": 0.0}
    n = len(records)
    return {"steps": n,
            "step_ms": 1000 * sum(r.wall_s for r in records) / n,
            "median_step_ms": 1000 * statistics.median(r.wall_s for r in records),
            "model_forward_ms": 1000 * sum(r.forward_s for r in records) / n,
            "sampler_ms": 1000 * sum(r.sampler_s for r in records) / n,
            "engine_overhead_ms": 1000 * sum(r.overhead_s for r in records) / n}


def decode_steps(engine: LLMEngine, prompts: list[list[int]], output_len: int, skip: int = 2,
                 request_prefix: str = "profile") -> tuple[list[StepRecord], list[StepRecord]]:
    """Run ``prompts`` together with ``output_len`` greedy tokens each; return (the steps that ran prefill
    work, the pure decode steps with every sequence in the batch after the first ``skip`` of them)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{request_prefix}-{i}", prompt, greedy(output_len))
    with StepProfiler(engine) as profiler:
        records = run_to_completion(engine, profiler)
    prefill = [r for r in records if not r.pure_decode]
    full = [r for r in records if r.pure_decode and r.num_seqs == len(prompts)]
    return prefill, full[skip:] if len(full) > skip else full
