"""The images and manifests pass the Hugging Face token as ``HF_TOKEN`` (or ``HUGGING_FACE_HUB_TOKEN``, the
older name): both reach the requests huggingface_hub sends for the downloads llmserve makes (it passes no
token of its own), HF_TOKEN first when both are set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW_AUTHORIZATION = ("from huggingface_hub.utils import build_hf_headers; "
                      "print(build_hf_headers().get('authorization', 'none'))")


@pytest.mark.parametrize("variables, expected", [
    ({"HF_TOKEN": "hf_new"}, "Bearer hf_new"),
    ({"HUGGING_FACE_HUB_TOKEN": "hf_old"}, "Bearer hf_old"),
    ({"HF_TOKEN": "hf_new", "HUGGING_FACE_HUB_TOKEN": "hf_old"}, "Bearer hf_new"),
    ({}, "none"),
])
def test_token_variables_reach_the_hub_requests(tmp_path, variables, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(variables, HF_HOME=str(tmp_path))   # no stored token file
    result = subprocess.run([sys.executable, "-c", SHOW_AUTHORIZATION], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
