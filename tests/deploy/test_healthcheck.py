"""docker/healthcheck.py, the images' HEALTHCHECK: it finds the server's address in the server's command
line (the image's entrypoint plus what ``docker run`` appended) and exits 0 only on a 200 from /health."""

from __future__ import annotations

import http.server
import importlib.util
import threading
from pathlib import Path

import pytest

from tests.deploy.tools import DOCKERFILES, REPO, entrypoint

spec = importlib.util.spec_from_file_location("healthcheck", REPO / "docker" / "healthcheck.py")
healthcheck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(healthcheck)

ENTRY = entrypoint(DOCKERFILES["cpu"])


@pytest.mark.parametrize("extra, url", [
    ([], "http://127.0.0.1:8000/health"),
    (["--model", "m", "--port", "9000"], "http://127.0.0.1:9000/health"),
    (["--port=9001"], "http://127.0.0.1:9001/health"),
    (["--port", "9000", "--port", "9002"], "http://127.0.0.1:9002/health"),   # the last one wins, as in argparse
    (["--host", "127.0.0.2"], "http://127.0.0.2:8000/health"),
    (["--host", "::"], "http://127.0.0.1:8000/health"),
    (["--host", "::1", "--port", "8080"], "http://[::1]:8080/health"),
])
def test_address_from_the_command_line(extra, url):
    assert healthcheck.health_url([*ENTRY, *extra]) == url


class Health(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub():
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def cmdline(tmp_path: Path, *extra: str) -> Path:
    path = tmp_path / "cmdline"
    path.write_bytes("\0".join([*ENTRY, *extra]).encode() + b"\0")
    return path


def test_exit_status_follows_health(stub, tmp_path, monkeypatch):
    path = cmdline(tmp_path, "--model", "m", "--port", str(stub.server_address[1]))
    monkeypatch.setattr(Health, "status", 503)   # loading
    assert healthcheck.main(path) == 1
    monkeypatch.setattr(Health, "status", 200)
    assert healthcheck.main(path) == 0
    stub.shutdown()
    stub.server_close()
    assert healthcheck.main(path) == 1   # nothing listening
