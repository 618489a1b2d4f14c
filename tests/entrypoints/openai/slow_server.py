"""Runs the API server with a slowed-down engine, so that timing-dependent tests do not depend on how fast
the machine is. The product has no test hooks: this script patches the classes, then starts the normal
server entry point (the engine-core process is spawned and imports this script again as ``__mp_main__``;
``DELAY_ENV`` makes that import patch it too). Its own flags (removed before the server parses the rest):

  --load-delay SECONDS   sleep this long while the model loads (/health answers 503 meanwhile)
  --step-delay SECONDS   sleep this long in every model forward (a 1000-token request takes >= 1000x it)
  --inject-faults        also apply fault_server.py's faults (its FORWARD_POISON and LOOP_POISON token ids)
"""

import argparse
import os
import sys
import time

from llmserve.engine.input_processor import ModelConfigInfo
from llmserve.entrypoints.openai import api_server
from llmserve.worker.model_runner import ModelRunner

DELAY_ENV = "LLMSERVE_TEST_DELAYS"


def patch(load_delay: float, step_delay: float) -> None:
    os.environ[DELAY_ENV] = f"{load_delay},{step_delay}"
    init, execute = ModelConfigInfo.__init__, ModelRunner.execute_model

    def slow_init(self, *args, **kwargs):
        time.sleep(load_delay)
        init(self, *args, **kwargs)

    def slow_execute(self, *args, **kwargs):
        time.sleep(step_delay)
        return execute(self, *args, **kwargs)

    ModelConfigInfo.__init__ = slow_init   # the core's, and the front end's ModelInfo through it
    ModelRunner.execute_model = slow_execute


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--inject-faults", action="store_true")
    own, rest = parser.parse_known_args()
    if own.inject_faults:
        import fault_server   # this script's folder is on sys.path

        fault_server.install()
    patch(own.load_delay, own.step_delay)
    sys.exit(api_server.main(rest))
elif DELAY_ENV in os.environ:
    if os.environ.get("LLMSERVE_TEST_INJECT_FAULTS") == "1":
        import fault_server

        fault_server.install()
    patch(*map(float, os.environ[DELAY_ENV].split(",")))
