#!/usr/bin/env bash
# Quick start: set up, then serve the built-in demo model (random weights: its text is gibberish) on
# http://127.0.0.1:8000 with the OpenAI-compatible API. Extra arguments go to `llmserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/llmserve serve "$@"
