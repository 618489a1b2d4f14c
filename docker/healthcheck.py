#!/usr/bin/env python3
"""The images' HEALTHCHECK: exit 0 when the server in this container answers 200 on /health, 1 otherwise.

The address comes from the server's own command line (``/proc/1/cmdline``: the entrypoint with the
arguments given to ``docker run``; with tini or ``docker run --init`` in front the flags are still there),
so ``docker run IMAGE --port 9000`` is checked on port 9000. /health answers 503 while the model loads and
after the engine died; the HEALTHCHECK's start period covers the loading.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def flag_value(argv: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` (``--flag VALUE`` or ``--flag=VALUE``), as argparse keeps it."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def health_url(argv: list[str]) -> str:
    host = flag_value(argv, "--host")
    host = DEFAULT_HOST if host is None or host in WILDCARD_HOSTS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = int(flag_value(argv, "--port") or DEFAULT_PORT)
    return f"http://{host}:{port}/health"


def check(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:   # noqa: S310 (a fixed http URL)
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code} {exc.read(200).decode(errors='replace')}"
    except OSError as exc:
        return False, f"{url}: {exc}"


def main(cmdline: Path = Path("/proc/1/cmdline")) -> int:
    argv = cmdline.read_bytes().decode(errors="replace").split("\0")
    healthy, message = check(health_url(argv))
    print(message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
