#!/usr/bin/env bash
# Creates .venv and installs llmserve into it.
#
# PyTorch: if the Python used here can already import torch (a GPU box with its CUDA build, say), the
# virtual environment sees that torch and nothing is reinstalled. Otherwise the CPU build of torch
# 2.13.0 is installed (from the PyTorch CPU index; an unpinned `pip install torch` would pull several
# GB of CUDA packages). Override with LLMSERVE_TORCH_SPEC / LLMSERVE_TORCH_INDEX_URL.
#
# Usage: scripts/setup.sh [--test]   (--test also installs the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LLMSERVE_VENV:-.venv}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: using the torch already installed for $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ]; then
    spec=${LLMSERVE_TORCH_SPEC:-torch==2.13.0+cpu}
    index=${LLMSERVE_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  else
    spec=${LLMSERVE_TORCH_SPEC:-torch==2.13.0}
    index=${LLMSERVE_TORCH_INDEX_URL:-}
  fi
  echo "setup: installing $spec"
  # The configured indexes first (a local wheel or mirror answers at once); then the PyTorch index.
  $PIP install --quiet "$spec" 2>/dev/null || $PIP install --quiet "$spec" ${index:+--extra-index-url "$index"}
fi
$PIP install --quiet -e ".$extras"

# The CPU kernels are C, compiled on first use; without a compiler llmserve runs (slower) PyTorch paths.
if ! command -v "${CC:-cc}" >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing gcc for the CPU kernels"
    apt-get install -y -qq gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc >/dev/null; }
  else
    echo "setup: no C compiler found: the CPU kernels will be off (install gcc for faster CPU decoding)" >&2
  fi
fi
# The dashboard's browser test drives headless Chromium (tests/entrypoints/openai/test_dashboard.py skips without it).
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium for the dashboard's browser test"
    apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1; } \
      || echo "setup: could not install chromium: the dashboard's browser test will be skipped" >&2
  else
    echo "setup: no chromium found: the dashboard's browser test will be skipped (install chromium to run it)" >&2
  fi
fi
echo "setup: ready ($VENV/bin/llmserve)"
