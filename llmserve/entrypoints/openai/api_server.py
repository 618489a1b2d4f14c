"""The OpenAI-compatible server's entry point: ``llmserve serve [MODEL] ...`` or
``python -m llmserve.entrypoints.openai.api_server --model MODEL ...`` (the container images' entrypoint).

It parses the flags and, for a checkpoint on this machine, starts the engine-core process before it imports
torch or the HTTP application (:mod:`llmserve.entrypoints.openai.app`), so the core's start-up (imports, the
model) runs beside the front end's instead of after it. The module stays light for a second reason: a
spawned process imports the main module again.
"""

from __future__ import annotations

import argparse
import sys

from llmserve.engine.core_client import EngineCoreClient
from llmserve.entrypoints.cli_args import add_engine_args, engine_config_from_args
from llmserve.entrypoints.openai.server_args import add_server_args, server_config_from_args
from llmserve.logging_setup import add_logging_args, configure_logging, setup_from_args
from llmserve.model_loader.model_source import local_model_path


def run_server(args: argparse.Namespace) -> int:
    """Check the flags, start the engine core, then serve until shutdown (``serve`` ends the process with the
    server's exit status)."""
    engine_config = engine_config_from_args(args)
    config = server_config_from_args(args)
    if (config.lora_modules or config.allow_runtime_lora_updating) and not engine_config.enable_lora:
        raise ValueError("--lora-modules and runtime LoRA updating need --enable-lora")
    if not config.served_model_names:
        if engine_config.model:
            config.served_model_names = [engine_config.model]
        else:
            from llmserve.testing.checkpoints import DEMO_MODEL_NAME

            config.served_model_names = [DEMO_MODEL_NAME]
    # A local checkpoint: start the core now. One to download (or the demo model to generate) is fetched
    # after the port has opened, so /health answers 503 meanwhile instead of refusing connections.
    local = local_model_path(engine_config.model)
    core = EngineCoreClient(engine_config, local) if local is not None else None
    from llmserve.entrypoints.openai.app import serve

    return serve(config, engine_config, core)


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m llmserve.entrypoints.openai.api_server`` (the container images' entrypoint)."""
    parser = argparse.ArgumentParser(prog="python -m llmserve.entrypoints.openai.api_server",
                                     description="OpenAI-compatible server")
    add_engine_args(parser, model_positional=False)
    add_server_args(parser)
    add_logging_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(setup_from_args(args))
    try:
        return run_server(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
