"""Runs the API server with faults injected into the engine, for the fault-isolation tests.

A prompt containing token id FORWARD_POISON makes the model step fail whenever that request is in
the batch; a prompt containing LOOP_POISON makes the engine loop itself fail. RANK_POISON makes the step
fail on one rank only: with tensor parallelism on the last TP rank, between the forward's all-reduces and
the LM head's all-gather (its peers are left waiting in a collective); with pipeline parallelism on the
first stage, before anything is sent to the next. The product has no test
hooks: this script patches the classes, then starts the normal server entry point. The engine-core
process is spawned and imports this script again (as ``__mp_main__``): ``INSTALL_ENV`` tells that import to
patch it too.
"""

import os
import sys

from llmserve.distributed.parallel_state import get_pp_group, get_tp_group
from llmserve.engine.core import EngineCore
from llmserve.entrypoints.openai import api_server
from llmserve.worker.model_runner import ModelRunner

FORWARD_POISON = 1999
LOOP_POISON = 1998
RANK_POISON = 1997
INSTALL_ENV = "LLMSERVE_TEST_INJECT_FAULTS"

_execute = ModelRunner.execute_model
_step = EngineCore.step


def execute(self, sched):
    prompts = [new.prompt_token_ids for new in sched.new_seqs]
    prompts += [self.input_batch.seqs[c.seq_id].prompt_token_ids for c in sched.cached_seqs
                if c.seq_id in self.input_batch.seqs]
    if any(FORWARD_POISON in prompt for prompt in prompts):
        raise RuntimeError("injected model fault")
    if not any(RANK_POISON in prompt for prompt in prompts):
        return _execute(self, sched)
    tp, pp = get_tp_group(), get_pp_group()
    if pp.world_size > 1 and pp.is_first_rank:
        raise RuntimeError("injected fault on one rank")
    if tp.world_size > 1 and tp.is_last_rank:
        def failing_logits(hidden):
            raise RuntimeError("injected fault on one rank")

        self.model.compute_logits = failing_logits
        try:
            return _execute(self, sched)
        finally:
            del self.model.compute_logits
    return _execute(self, sched)


def step(self):
    if any(LOOP_POISON in seqs[0].prompt_token_ids for seqs in self.requests.values()):
        raise RuntimeError("injected engine-loop fault")
    return _step(self)


def install() -> None:
    """Patch the engine classes in this process and in the engine-core process it will start (only in a
    server: tests import this module for the poison ids)."""
    os.environ[INSTALL_ENV] = "1"
    ModelRunner.execute_model = execute
    EngineCore.step = step


if __name__ == "__main__":
    install()
    sys.exit(api_server.main())
elif os.environ.get(INSTALL_ENV) == "1":
    install()
