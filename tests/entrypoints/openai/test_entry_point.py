"""The server's entry point starts the engine core on a local checkpoint before it loads torch or the HTTP
application, and stays light because spawned processes import it again."""

from __future__ import annotations

import subprocess
import sys

from llmserve.entrypoints.openai import api_server, app


def _record_start_up(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(api_server, "EngineCoreClient",
                        lambda config, path: calls.append(("core", config.model, path)) or "core")
    monkeypatch.setattr(app, "serve", lambda config, engine_config, core: calls.append(("serve", core)) or 0)
    return calls


def test_a_local_checkpoint_starts_the_engine_core_before_the_http_application(monkeypatch, llama_dir):
    calls = _record_start_up(monkeypatch)
    assert api_server.main(["--model", str(llama_dir)]) == 0
    assert calls == [("core", str(llama_dir), llama_dir), ("serve", "core")]


def test_a_checkpoint_to_download_is_fetched_after_the_port_opens(monkeypatch):
    calls = _record_start_up(monkeypatch)
    assert api_server.main(["--model", "some-org/some-model"]) == 0
    assert calls == [("serve", None)]   # the load thread fetches it, then starts the core


def test_the_engine_core_starts_before_torch_or_the_http_stack_loads(llama_dir):
    """What the front end has imported when it spawns the core: nothing heavy (the core imports it itself)."""
    code = ("import sys; from llmserve.entrypoints.openai import api_server as m\n"
            "def spawned(config, path):\n"
            "    print(sorted(n for n in ('torch', 'numpy', 'transformers', 'fastapi', 'uvicorn', 'starlette')"
            " if n in sys.modules)); raise SystemExit(0)\n"
            f"m.EngineCoreClient = spawned; m.main(['--model', {str(llama_dir)!r}])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
