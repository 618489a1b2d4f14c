"""Server flags out of range are refused at start-up, naming the flag, before the engine loads (not a bind
error after it, or every request answered 431)."""

from __future__ import annotations

import pytest

from llmserve.entrypoints.openai.api_server import build_parser
from llmserve.entrypoints.openai.server_args import server_config_from_args


@pytest.mark.parametrize("argv,message", [
    (["--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["--port", "-1"], "--port must be in 0..65535, got -1"),
    (["--shutdown-timeout", "-5"], "--shutdown-timeout must be >= 0"),
    (["--max-header-bytes", "0"], "--max-header-bytes must be >= 1"),
    (["--max-request-body-bytes", "0"], "--max-request-body-bytes must be >= 1"),
])
def test_out_of_range_values_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        server_config_from_args(build_parser().parse_args(argv))


def test_values_in_range_are_kept():
    config = server_config_from_args(build_parser().parse_args(
        ["--port", "0", "--shutdown-timeout", "0", "--max-header-bytes", "1", "--max-request-body-bytes", "1KiB"]))
    assert (config.port, config.shutdown_timeout, config.max_header_bytes, config.max_request_body_bytes) == \
        (0, 0, 1, 1024)
