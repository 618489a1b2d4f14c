"""Prometheus metrics with vLLM's names, so existing Grafana dashboards work unchanged.

Gauges are refreshed after every engine step (from the engine thread; prometheus_client is
thread-safe); counters and histograms are fed from each step's outputs and from finished requests.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmserve.outputs import EmbeddingRequestOutput, RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                          2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)   # vLLM's
_ABORT_STEP_BUCKETS = (0, 1, 2, 4, 8, 16, 64)
_REQUEST_TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))   # vLLM's 1-2-5 series
FINISH_REASONS = ("stop", "length", "abort", "error")   # the engine's finish reasons


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 num_speculative_tokens: int = 0, max_loras: int | None = None) -> None:
        """``num_speculative_tokens`` > 0 (speculative decoding on) adds vLLM's ``vllm:spec_decode_*`` counters;
        ``max_loras`` (set when LoRA is on) exports ``vllm:lora_requests_info``."""
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = 100%).")
        self.gpu_cache_usage = gauge("vllm:gpu_cache_usage_perc",
                                     "Fraction of KV-cache blocks in use; older name of vllm:kv_cache_usage_perc.")
        self.num_preemptions = counter("vllm:num_preemptions", "Sequences preempted (blocks freed, recomputed later).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "Prompt tokens served by the prefix cache.")
        self.kv_cache_waste = gauge("llmserve:kv_cache_waste_perc",
                                    "KV slots allocated to running sequences but not filled, over slots allocated.")
        self._request_success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                                        labels + ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:   # exported (at 0) from the start, as vLLM does, so rates are never empty
            self._request_success.labels(model_name, reason)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", _TOKEN_LATENCY_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between consecutive tokens.",
                             _TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.",
                                    _LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds", "First scheduled to first token.",
                                      _LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds", "First token to finish.", _LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds", "First scheduled to finish.",
                                        _LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens of a finished request.",
                                               _REQUEST_TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Tokens a finished request generated (its longest sample).",
                                                   _REQUEST_TOKEN_BUCKETS)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Prompt and generation tokens computed per engine step.",
                                          _ITERATION_TOKEN_BUCKETS)
        self.abort_steps = histogram("llmserve:abort_latency_steps",
                                     "Engine steps finished between the engine core receiving an abort and "
                                     "freeing the request's KV blocks (at most 1: the step in flight).",
                                     _ABORT_STEP_BUCKETS)
        self.abort_seconds = histogram("llmserve:abort_latency_seconds",
                                       "Seconds between the engine core receiving an abort and freeing the "
                                       "request's KV blocks.", _TOKEN_LATENCY_BUCKETS)
        self.spec_decode: SpecDecodeMetrics | None = (
            SpecDecodeMetrics(model_name, r, num_speculative_tokens) if num_speculative_tokens > 0 else None)
        # Refreshed from the engine's stats after each step, and only where a value moved: each update takes
        # prometheus_client's lock, and at batch 1 there is a step for every streamed token.
        self._step_gauges = ((self.num_requests_running, "num_requests_running"),
                             (self.num_requests_waiting, "num_requests_waiting"),
                             (self.kv_cache_usage, "kv_cache_usage"), (self.gpu_cache_usage, "kv_cache_usage"),
                             (self.kv_cache_waste, "kv_cache_waste"))
        self._gauge_values: list[float | None] = [None] * len(self._step_gauges)
        # vLLM's counters, advanced by what the engine's running totals grew by
        self._step_counters = ((self.num_preemptions, "num_preemptions"), (self.prompt_tokens, "prompt_tokens"),
                               (self.generation_tokens, "generation_tokens"),
                               (self.prefix_cache_queries, "prefix_cache_queries"),
                               (self.prefix_cache_hits, "prefix_cache_hits"))
        self._seen_totals = [0] * len(self._step_counters)
        self._last_token_time: dict[str, float] = {}
        self.max_loras = max_loras
        self._lora_labels: tuple[str, str, str] | None = None
        if max_loras is not None:
            # vLLM's info gauge: the adapters in use as labels, the time they were last reported as its value
            self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on LoRA requests.",
                                   ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)

    def record_step(self, stats: dict, outputs: list[RequestOutput | EmbeddingRequestOutput]) -> None:
        """Called on the event loop after each step with the engine's stats and the step's outputs."""
        for tokens in stats["iteration_tokens"]:   # one entry per step of the core's messages
            if tokens:
                self.iteration_tokens.observe(tokens)
        for abort in stats["aborts"]:
            self.abort_steps.observe(abort.steps)
            self.abort_seconds.observe(abort.seconds)
        for i, (gauge, key) in enumerate(self._step_gauges):
            value = stats[key]
            if value != self._gauge_values[i]:
                gauge.set(value)
                self._gauge_values[i] = value
        for i, (counter, key) in enumerate(self._step_counters):
            total = stats[key]
            if total != self._seen_totals[i]:
                counter.inc(total - self._seen_totals[i])
                self._seen_totals[i] = total
        if self.spec_decode is not None:
            self.spec_decode.record(stats)
        if self.max_loras is not None:
            self._record_loras(stats["waiting_lora_adapters"], stats["running_lora_adapters"])
        now = time.monotonic()
        for output in outputs:
            if isinstance(output, EmbeddingRequestOutput):   # no tokens generated: only its end counts
                if output.finished:
                    self.record_finished(output)
                continue
            for completion in output.outputs:   # each sample's finish comes once, in the output where it ends
                if completion.finish_reason is not None or output.finished:
                    self._request_success.labels(self.model_name, completion.finish_reason or "abort").inc()
            new_tokens = sum(len(c.token_ids) for c in output.outputs)
            if new_tokens:
                last = self._last_token_time.get(output.request_id)
                first = last is None
                if first:
                    # A sample's first token follows no other; tokens that came with it (a front end that
                    # caught up on two steps at once) follow it by the time since the core sampled it.
                    last = output.metrics.first_token_time or now
                for completion in output.outputs:
                    # A sample's tokens reported together (--stream-interval, or a front end that caught up)
                    # were generated one after another since its last report: each gap is a share of that.
                    gaps = len(completion.token_ids) - (1 if first and completion.token_ids else 0)
                    for _ in range(gaps):
                        self.itl.observe((now - last) / gaps)
                self._last_token_time[output.request_id] = now
            if output.finished:
                self._last_token_time.pop(output.request_id, None)
                self.record_finished(output)

    def _record_loras(self, waiting: list[str], running: list[str]) -> None:
        """One series: the previous label set is dropped when the adapters in use change."""
        labels = (str(self.max_loras), ",".join(waiting), ",".join(running))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                self.lora_info.remove(*self._lora_labels)
            self._lora_labels = labels
        self.lora_info.labels(*labels).set_to_current_time()

    def record_finished(self, output: RequestOutput | EmbeddingRequestOutput) -> None:
        """A request's end (its samples' finishes are counted as they come, in :meth:`record_step`)."""
        m = output.metrics
        if isinstance(output, EmbeddingRequestOutput):
            self._request_success.labels(self.model_name, output.finish_reason or "abort").inc()
            if m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time)
            return
        self.request_prompt_tokens.observe(len(output.prompt_token_ids))
        self.request_generation_tokens.observe(output.num_generated_tokens)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.prefill_time.observe(m.first_token_time - m.first_scheduled_time)
        if m.queue_time is not None:
            self.queue_time.observe(m.queue_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.inference_time.observe(m.finished_time - m.first_scheduled_time)
            if m.first_token_time is not None:
                self.decode_time.observe(m.finished_time - m.first_token_time)
                if output.num_generated_tokens > 1:
                    self.tpot.observe((m.finished_time - m.first_token_time) / (output.num_generated_tokens - 1))


class SpecDecodeMetrics:
    """vLLM's speculative decoding counters, fed from the engine's running totals (see
    :class:`~llmserve.spec_decode.metrics.SpecDecodingStats`); every draft position is exported from the start."""

    def __init__(self, model_name: str, registry: CollectorRegistry, num_speculative_tokens: int) -> None:
        labels = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry).labels(model_name)

        self.num_drafts = counter("vllm:spec_decode_num_drafts", "Sequence steps that checked drafts.")
        self.num_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Draft tokens checked.")
        self.num_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                          "Draft tokens accepted, by position in the draft.", labels + ["position"], registry=registry)
        self.per_pos = [per_pos.labels(model_name, str(i)) for i in range(num_speculative_tokens)]
        self._seen: dict[str, int] = {}
        self._seen_per_pos = [0] * num_speculative_tokens

    def record(self, stats: dict) -> None:
        for name, metric in (("spec_num_drafts", self.num_drafts), ("spec_num_draft_tokens", self.num_draft_tokens),
                             ("spec_num_accepted_tokens", self.num_accepted_tokens)):
            metric.inc(stats[name] - self._seen.get(name, 0))
            self._seen[name] = stats[name]
        for i, count in enumerate(stats["spec_num_accepted_tokens_per_pos"][:len(self.per_pos)]):
            self.per_pos[i].inc(count - self._seen_per_pos[i])
            self._seen_per_pos[i] = count
