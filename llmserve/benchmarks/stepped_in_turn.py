"""Engines generating side by side in one process, one engine step each in turn, each timing only its own steps.

Two arms compared this way see the same machine: a change of its load (another process, frequency scaling) falls
on both alike instead of on whichever arm ran at that moment, which is what made arms run one after the other
differ by 10-15% from run to run.
"""

from __future__ import annotations

import bisect
import time
from collections import deque

from llmserve.engine.output_processor import OutputKind
from llmserve.entrypoints.llm import LLM
from llmserve.lora.request import LoRARequest
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams


class SteadyConcurrency:
    """One engine generating ``prompts`` with at most ``concurrency`` requests in it: whenever one finishes, the
    next is added before the following step. :meth:`step` runs one engine step; the run's own clock
    (``seconds``) counts only the time spent in its steps, so that two runs stepped in turn (:func:`run_in_turn`)
    each time themselves alone while any change of the machine's load falls on both. ``loras``: each prompt's
    adapter (None: the base model), when the engine serves LoRA."""

    def __init__(self, llm: LLM, prompts: list[list[int]], params: SamplingParams, concurrency: int,
                 loras: list[LoRARequest | None] | None = None) -> None:
        self.engine = llm.engine
        self.params, self.concurrency = params, concurrency
        self.loras = loras or [None] * len(prompts)
        self.pending = deque(enumerate(prompts))
        self.in_flight: dict[str, int] = {}
        self.results: list[RequestOutput | None] = [None] * len(prompts)
        self.seconds = 0.0
        self._starts: list[float] = []   # each step's start (time.monotonic, the clock of token times)
        self._clock: list[float] = []    # ``seconds`` at that start

    @property
    def done(self) -> bool:
        return not self.pending and not self.in_flight

    def step(self) -> None:
        start = time.monotonic()
        self._starts.append(start)
        self._clock.append(self.seconds)
        while self.pending and len(self.in_flight) < self.concurrency:
            index, prompt = self.pending.popleft()
            request_id = f"in-turn-{id(self)}-{index}"
            self.engine.add_request(request_id, prompt, self.params, output_kind=OutputKind.FINAL_ONLY,
                                    lora_request=self.loras[index])
            self.in_flight[request_id] = index
        for output in self.engine.step():
            if output.finished and output.request_id in self.in_flight:
                self.results[self.in_flight.pop(output.request_id)] = output
        self.seconds += time.monotonic() - start

    def own_time(self, t: float) -> float:
        """``t``, a ``time.monotonic()`` taken during one of this run's steps (a token's time), on its own clock."""
        i = bisect.bisect_right(self._starts, t) - 1
        return self._clock[i] + (t - self._starts[i])

    def tpots(self) -> list[float]:
        """Each request's time per output token after the first, on the run's own clock."""
        return [(self.own_time(r.metrics.last_token_time) - self.own_time(r.metrics.first_token_time))
                / (len(r.outputs[0].token_ids) - 1) for r in self.results]

    def token_ids(self) -> list[list[int]]:
        """Each finished request's output tokens, in the order of the prompts."""
        return [list(r.outputs[0].token_ids) for r in self.results]


def run_in_turn(runs: list[SteadyConcurrency]) -> None:
    """Step ``runs`` in turn until all are done, which goes first alternating every step."""
    turn = 0
    while not all(run.done for run in runs):
        for run in runs if turn % 2 == 0 else runs[::-1]:
            if not run.done:
                run.step()
        turn += 1


def generate_at_concurrency(llm: LLM, prompts: list[list[int]], params: SamplingParams,
                            concurrency: int) -> list[RequestOutput]:
    """Every prompt's finished output (in order), with at most ``concurrency`` requests in the engine."""
    run = SteadyConcurrency(llm, prompts, params, concurrency)
    run_in_turn([run])
    return run.results   # type: ignore[return-value]
