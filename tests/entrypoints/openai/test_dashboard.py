"""``/dashboard``: a live page over the engine's figures, behind ``--api-key``, tested in headless Chromium.

* The page and its data are behind the key: the page answers 401 (naming ``?api_key=``) without it or with
  a wrong one, and 200 with ``?api_key=KEY`` or the Bearer header; its data (``/dashboard/stats``) wants the
  header. The page is self-contained: its Content-Security-Policy lets it load nothing but its own data.
* ``/dashboard/stats`` follows the engine: a request's tokens are counted, its KV blocks are in use while it
  runs and stay as cached prefix blocks once it has finished, a repeated prompt is a prefix-cache hit, the
  latency histograms count what finished, and the block map covers every block.
* In Chromium (``--dump-dom`` after a few polls; skipped where no Chromium is installed): the idle page
  shows live numbers (nothing running, no block in use, every block counted); under load, requests
  running, tokens/s and blocks in use go up (the page's numbers are its last poll's, one instant of the
  load: it is read again until it shows them, within a deadline); after the load, they go back to zero and
  the blocks the requests used show as cached. A screenshot of the page under load is taken (set
  ``DASHBOARD_SCREENSHOT`` to a path to keep it: docs/images/dashboard.png is made that way).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.entrypoints.openai.http_checks import check_error

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (scripts/setup.sh --test "
                                                              "installs it with apt-get when run as root)")


@pytest.fixture(scope="module")
def guarded(start_server):
    """256 KV blocks of 16 tokens, so a few requests fill a visible part of the map."""
    return start_server("--api-key", KEY, "--kv-cache-memory-bytes", "2MiB")


def stats(server) -> dict:
    response = httpx.get(f"{server.base_url}/dashboard/stats", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def complete(server, prompt: str, max_tokens: int, http=httpx) -> None:
    """``http``: an ``httpx.Client`` to reuse its connection (``httpx`` itself opens one per request)."""
    response = http.post(f"{server.base_url}/v1/completions", headers=AUTH, timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})
    assert response.status_code == 200, response.text


def test_page_and_data_are_behind_the_api_key(guarded):
    page = f"{guarded.base_url}/dashboard"
    for response in (httpx.get(page), httpx.get(page, params={"api_key": "wrong"}),
                     httpx.get(page, headers={"Authorization": "Bearer wrong"})):
        error = check_error(response, 401, param=None, code="invalid_api_key", secrets=(KEY, "wrong"))
        assert "?api_key=" in error["message"]
    for response in (httpx.get(page, params={"api_key": KEY}), httpx.get(page, headers=AUTH)):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert "connect-src 'self'" in response.headers["content-security-policy"]
        assert 'id="block-map"' in response.text and "http" not in response.text.split("<script>")[1]
    check_error(httpx.get(f"{page}/stats", params={"api_key": KEY}), 401, code="invalid_api_key")


def test_stats_follow_the_engine(guarded):
    before = stats(guarded)
    kv = before["kv_cache"]
    assert kv["num_blocks"] == 256 and kv["block_size"] == 16
    cells = kv["block_map"]
    assert len(cells["in_use"]) * cells["blocks_per_cell"] >= kv["num_blocks"] > (len(cells["in_use"]) - 1) * \
        cells["blocks_per_cell"]
    prompt = "a prompt long enough to fill several KV blocks " * 8
    complete(guarded, prompt, 20)
    complete(guarded, prompt, 20)
    after = stats(guarded)
    assert after["tokens"]["generation"] - before["tokens"]["generation"] == 40
    assert after["tokens"]["prompt"] > before["tokens"]["prompt"]
    assert after["prefix_cache"]["hits"] > before["prefix_cache"]["hits"]   # the second request's prefix
    assert after["latency"]["ttft"]["count"] - before["latency"]["ttft"]["count"] == 2
    assert after["latency"]["itl"]["count"] - before["latency"]["itl"]["count"] == 2 * 19
    assert after["requests"] == {"running": 0, "waiting": 0}
    block_map = after["kv_cache"]["block_map"]
    assert sum(block_map["in_use"]) == 0 == after["kv_cache"]["num_blocks"] - after["kv_cache"]["num_free_blocks"]
    assert sum(block_map["cached"]) >= len(prompt.split()) // 16   # the finished requests' full blocks


class _Values(HTMLParser):
    """``{element id: (data-value, text)}`` of a dumped DOM."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.values: dict[str, list[str]] = {}
        self._open: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if attributes.get("id"):
            self.values[attributes["id"]] = [attributes.get("data-value") or "", ""]
            self._open.append(attributes["id"])
        else:
            self._open.append("")

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1]:
            self.values[self._open[-1]][1] += data

    def number(self, element_id: str) -> float:
        return float(self.values[element_id][0])


def chromium(server, tmp_path: Path, *mode: str, budget_ms: int = 3000) -> str:
    """Open the page (key in the URL) in headless Chromium, let ``budget_ms`` of page time pass (a poll a
    second; the clock waits for each poll's answer), and return what ``mode`` prints."""
    command = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000",
               f"--virtual-time-budget={budget_ms}", *mode, f"{server.base_url}/dashboard?api_key={KEY}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def page_values(server, tmp_path: Path) -> _Values:
    values = _Values(chromium(server, tmp_path, "--dump-dom"))
    assert values.values["status"][1] == "live", values.values["status"]
    return values


def page_values_until(server, tmp_path: Path, check, timeout: float = 60) -> _Values:
    """The page, read again until ``check(values)`` stops raising AssertionError (the last error is raised
    after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        values = page_values(server, tmp_path)
        try:
            check(values)
            return values
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def wait_for(server, condition, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = stats(server)
        if condition(current):
            return current
        time.sleep(0.1)
    raise AssertionError(f"the engine never got there: {current}")


@needs_chromium
def test_page_shows_live_numbers_that_move_under_load(guarded, tmp_path):
    wait_for(guarded, lambda s: s["requests"]["running"] == 0)
    idle = page_values(guarded, tmp_path)
    assert idle.number("running") == 0 and idle.number("waiting") == 0
    assert idle.number("blocks-in-use") == 0 and idle.number("blocks-total") == 256
    assert idle.number("gen-tps") == 0

    stop = threading.Event()

    def load(index: int) -> None:   # a shared prefix (cache hits), then a new question (prompt tokens)
        # A client of its own (a new one per request costs about as long as a short request runs, and then
        # all four were often between requests at once) and answers of hundreds of tokens: the engine
        # stays busy.
        with httpx.Client() as http:
            for number in itertools.count():
                if stop.is_set():
                    return
                complete(guarded, "You are a helpful assistant. " * 8 + f"Client {index}, question {number}: " * 4,
                         200 + 100 * index, http)

    def shows_the_load(page: _Values) -> None:
        assert page.number("running") >= 1
        assert page.number("gen-tps") > 0
        assert page.number("blocks-in-use") > 0 and page.number("kv-usage") > 0
        assert page.values["itl"][1].endswith(" ms")

    clients = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    for client in clients:
        client.start()
    try:
        wait_for(guarded, lambda s: s["requests"]["running"] >= 2)
        page_values_until(guarded, tmp_path, shows_the_load)
        shot = tmp_path / "dashboard.png"
        chromium(guarded, tmp_path, f"--screenshot={shot}", budget_ms=30000)
    finally:
        stop.set()
        for client in clients:
            client.join(120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DASHBOARD_SCREENSHOT"])

    wait_for(guarded, lambda s: s["requests"]["running"] == 0)
    drained = _Values(chromium(guarded, tmp_path, "--dump-dom"))
    assert drained.number("running") == 0 and drained.number("blocks-in-use") == 0
    assert int(drained.values["blocks-detail"][1].rpartition("; ")[2].split()[0]) > 0   # "...; N cached"
