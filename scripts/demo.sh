#!/usr/bin/env bash
# Quick start: set up, then generate with the built-in demo model (random weights: the text is gibberish).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/llmserve generate --prompt "The capital of France is" --prompt "Once upon a time" "$@"
