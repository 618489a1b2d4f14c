"""Per-step timing of the offline engine: wall time of ``engine.step()`` split into the model forward
(+ LM head), the sampler and everything else (scheduling, input building, detokenising: engine overhead).

The profiler wraps the runner's ``execute``, the model's ``forward`` (and what runs a step's layers in its place:
the fused CPU decode step, the CUDA graphs' replay) and ``compute_logits`` and the sampler's ``forward`` with
timers for as long as it is active, and records what each step ran. On CUDA each timed call starts and ends with
a synchronize: kernels launch asynchronously, and without it their time would land wherever the host next waits
(the sampled tokens' copy back), counted as engine overhead. A multi-step step (``--num-scheduler-steps``) is
recorded as the decode steps it ran, each with an equal share of its times (its compiled loop, LM head and
argmax included, is model forward), so TPOT and tokens per second stay per token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmserve.engine.llm_engine import LLMEngine
from llmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmserve.layers.linear import LinearBase
from llmserve.sampling_params import SamplingParams


@dataclass
class ModelCosts:
    """What one step of the model must read and compute, from the model's shapes."""

    body_params: int          # weights of every linear layer in the decoder layers (used by every token)
    lm_head_params: int       # the LM head (used once per sampled row)
    other_params: int         # norms etc. (read every step; the embedding table is not: only its rows)
    dtype_bytes: int
    kv_bytes_per_token: int   # K and V of one token over all layers
    q_dim: int                # sum over layers of num_heads * head_dim (attention FLOPs per query-key pair / 4)

    @classmethod
    def of(cls, engine: LLMEngine) -> ModelCosts:
        model = engine.runner.model
        body = head = other = 0
        linear_ids: set[int] = set()
        for module in model.modules():
            if isinstance(module, LinearBase):
                body += module.input_size * module.output_size + (module.output_size if module.bias is not None else 0)
                linear_ids.update(id(p) for p in module.parameters(recurse=False))
            elif isinstance(module, ParallelLMHead):
                head += module.vocab_size * int(engine.hf_config.hidden_size)
                linear_ids.update(id(p) for p in module.parameters(recurse=False))
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, VocabParallelEmbedding)}
        for p in model.parameters():
            if id(p) not in linear_ids and id(p) not in embedding_ids:
                other += p.numel()
        runner = engine.runner
        return cls(body, head, other, torch.tensor([], dtype=engine.dtype).element_size(),
                   runner.kv_cache_bytes_per_block() // runner.block_size,
                   sum(a.num_heads * a.head_dim for a in model.attention_layers()))

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a step reads (every linear layer, the LM head and the norms)."""
        return (self.body_params + self.lm_head_params + self.other_params) * self.dtype_bytes

    def step_bytes(self, record: StepRecord) -> int:
        return self.weight_bytes + self.kv_bytes_per_token * record.kv_tokens_read

    def step_flops(self, record: StepRecord) -> int:
        """Multiply-adds x 2 of the step: linear layers per token, LM head per sampled row, attention
        QK^T and PV per query-key pair."""
        return (2 * self.body_params * record.num_tokens + 2 * self.lm_head_params * record.num_logits
                + 4 * self.q_dim * record.attended)


@dataclass
class StepRecord:
    num_seqs: int
    num_tokens: int
    num_decodes: int
    num_logits: int         # sequences whose next token is sampled (the LM head runs for these rows)
    kv_tokens_read: int     # KV-cache tokens attention reads (each sequence's context incl. this step's tokens)
    attended: int           # query-key pairs of the step (causal), for attention FLOPs
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
    """Times ``fn``; its calls are also a named range for ``torch.profiler`` (a compiled kernel called through
    ctypes, such as the fused CPU decode step, shows up in a profile only so)."""

    def __init__(self, fn: Any, name: str, synchronize: Callable[[], None] | None = None) -> None:
        self.fn = fn
        self.name = f"llmserve: {name}"
        self.synchronize = synchronize
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.synchronize is not None:
            self.synchronize()   # work launched before the call is not its own
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(self.name):
                return self.fn(*args, **kwargs)
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self.seconds += time.perf_counter() - start


class StepProfiler:
    """``with StepProfiler(engine) as prof: prof.step()`` -> :class:`StepRecord` per engine step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.records: list[StepRecord] = []
        self._scheduled: list[tuple[int, int, int]] = []   # (new tokens, computed before, total tokens)
        self._num_steps = 1   # decode steps the last step ran (a multi-step step's)

    def __enter__(self) -> StepProfiler:
        runner = self.engine.runner
        sync = torch.cuda.synchronize if runner.device.type == "cuda" else None
        self._forward = _Timer(runner.model.forward, "model forward", sync)
        # the fused CPU decode step and the CUDA graphs' replay run a step's decoder layers in place of the forward
        fused = runner.fused_decode
        self._fused = _Timer(fused.forward, "fused CPU decode step", sync) if fused is not None else None
        self._steps = _Timer(fused.decode_steps, "multi-step decode loop", sync) if fused is not None else None
        self._graphs = runner.graphs
        self._replay = _Timer(self._graphs.run, "CUDA graph replay", sync) if self._graphs is not None else None
        self._logits = _Timer(runner.model.compute_logits, "logits", sync)
        self._sampler = _Timer(runner.sampler.forward, "sampler", sync)
        execute = runner.execute_model

        def traced_execute(sched: Any) -> Any:
            output = execute(sched)
            batch = runner.input_batch   # patched from the step's message by execute
            self._scheduled.extend((n, batch.num_computed_tokens(i), batch.seqs[i].num_tokens)
                                   for i, n in sched.num_scheduled_tokens.items())
            # (a multi-step step may end early, or run as a plain step: its rows' tokens say how many it ran)
            ran = max(map(len, output.multi_step_tokens.values()), default=0) if output is not None else 0
            self._num_steps = 1 + ran
            return output

        runner.model.forward, runner.model.compute_logits = self._forward, self._logits
        if self._fused is not None:
            runner.fused_decode.forward, runner.fused_decode.decode_steps = self._fused, self._steps
        if self._replay is not None:
            self._graphs.run = self._replay
        runner.sampler.forward, runner.execute_model = self._sampler, traced_execute
        return self

    def __exit__(self, *exc: Any) -> None:
        runner = self.engine.runner
        del runner.model.forward, runner.model.compute_logits, runner.sampler.forward, runner.execute_model
        if self._fused is not None:
            del runner.fused_decode.forward, runner.fused_decode.decode_steps
        if self._replay is not None:
            del self._graphs.run

    def _forward_seconds(self) -> float:
        in_place = sum(t.seconds for t in (self._fused, self._steps, self._replay) if t is not None)
        return self._forward.seconds + in_place + self._logits.seconds

    def step(self) -> tuple[list[StepRecord], list[Any]]:
        """One engine step: its records (one per decode step it ran) and outputs."""
        before = (self._forward_seconds(), self._sampler.seconds)
        self._scheduled, self._num_steps = [], 1
        start = time.perf_counter()
        with torch.profiler.record_function("llmserve: engine step"):
            outputs = self.engine.step()
        wall = time.perf_counter() - start
        steps = self._num_steps
        forward, sampler = self._forward_seconds() - before[0], self._sampler.seconds - before[1]
        records = []
        for t in range(steps):   # inner step t: every row one token further
            items = [(n, done + t, total + t) for n, done, total in self._scheduled]
            records.append(StepRecord(
                num_seqs=len(items), num_tokens=sum(n for n, _, _ in items),
                num_decodes=sum(1 for n, _, _ in items if n == 1),
                num_logits=sum(1 for n, done, total in items if done + n == total),
                kv_tokens_read=sum(done + n for n, done, _ in items),
                attended=sum(n * done + n * (n + 1) // 2 for n, done, _ in items), wall_s=wall / steps,
                forward_s=forward / steps, sampler_s=sampler / steps))
        self.records += records
        return records, outputs


def run_to_completion(engine: LLMEngine, profiler: StepProfiler) -> list[StepRecord]:
    records = []
    while engine.has_unfinished_requests():
        records += profiler.step()[0]
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


def profile_decode_steps(engine: LLMEngine, prompts: list[list[int]], steps: int, prefix: Path,
                         request_prefix: str = "torch-profile") -> list[Path]:
    """Run ``prompts`` until every one decodes, then ``steps`` engine steps decoding the whole batch (with
    ``--num-scheduler-steps``, each up to that many decode steps) under ``torch.profiler`` (host, and the GPU's
    kernels on CUDA), then the rest. Writes ``<prefix>.txt`` (operators and kernels by their own time) and
    ``<prefix>.json`` (a trace for Perfetto or chrome://tracing); returns both paths.
    Only this process is seen: profile an engine whose model runs here (one rank, the default executor)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = engine.device.type == "cuda"
    prefill_steps = -(-sum(map(len, prompts)) // engine.max_num_batched_tokens)
    # Room for the steps until the last prompt is prefilled (the first ones decode meanwhile, taking some of each
    # step's tokens: at most twice the prefill's steps) and for the profiled steps, with every sequence still there.
    tokens = (2 * prefill_steps + steps + 2) * engine.config.num_scheduler_steps   # an engine step may decode several
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{request_prefix}-{i}", prompt, greedy(tokens))
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    with StepProfiler(engine) as timer:
        while engine.has_unfinished_requests():
            records, _ = timer.step()
            if records[-1].pure_decode and records[-1].num_seqs == len(prompts):
                break
        with profile(activities=activities) as prof:
            for _ in range(steps):
                timer.step()
        run_to_completion(engine, timer)
    table, trace = prefix.with_suffix(".txt"), prefix.with_suffix(".json")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    sections = [("host time", "self_cpu_time_total"), *([("GPU time", "self_device_time_total")] if on_cuda else [])]
    table.write_text("".join(f"{steps} engine steps decoding {len(prompts)} sequences, by their own {what}:\n"
                             f"{averages.table(sort_by=key, row_limit=40)}\n" for what, key in sections))
    prof.export_chrome_trace(str(trace))
    return [table, trace]
