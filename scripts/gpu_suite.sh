#!/usr/bin/env bash
# The GPU suite: on a machine with a CUDA GPU, writes random-weight bf16 checkpoints shaped like
# Llama-3-8B and Llama-3.2-1B, runs the test suite on CUDA, then the benchmarks:
#   1. pytest on the GPU: the tests that run CUDA (Triton attention, MoE, LoRA and quantised-weight kernels,
#      CUDA graphs, the sampler, the runner's memory) rather than the whole CPU suite;
#   2. batch-1 TPOT against the HBM floor (bench latency + bench roofline; bench throughput with one
#      prompt if those commands are missing), eager and with CUDA graphs, each batch size's decode steps
#      also under torch.profiler (kernels by GPU time in torch-profile-<size>-<mode>/batch-B.txt);
#   3. the same TPOT with --quantization fp8 and int8 (the quantised layouts' Triton kernels, up to 128 rows);
#      and scripts/bench_weight_only_kernel.py (the weight-only paths per layer shape; weight-only-kernel.txt);
#   4. llmserve bench throughput --compare-hf (llmserve against Hugging Face generate), 1B and 8B;
#   5. llmserve bench serve against `llmserve serve` at several request rates (8B).
# Everything (logs, JSON results, plots) goes into one results folder.
#
# Usage: scripts/gpu_suite.sh [RESULTS_DIR]       (default: results/gpu-<date>)
# Environment:
#   PYTHON            the Python with llmserve and a CUDA build of torch (default: .venv/bin/python if
#                     present, else python3)
#   LLMSERVE_MODELS   where the checkpoints go (default: ~/.cache/llmserve/gpu-models); reused if present
#   SIZES             which checkpoints to benchmark (default: "1b 8b")
#   RATES             bench serve request rates (default: "1 4 16 inf")
#   NUM_PROMPTS       prompts per throughput / serve run (default: 200)
#   HF_PROMPTS        prompts Hugging Face generates one at a time for --compare-hf (default: 16)
#   TESTS             the pytest paths (default: the tests that touch CUDA, listed below)
#   PYTEST_ARGS       extra pytest arguments (default: "-n 8" when pytest-xdist is importable)
#   STEP_TIMEOUT      seconds after which one step is stopped and counted as failed (default: 1800)
#   QUANTIZATIONS     load-time quantisations to time with bench latency (default: "fp8 int8"; "" for none)
#   SKIP_TESTS=1      skip the pytest step
#   PORT              port of the server under test (default: 8765)
#
# The checkpoints' weights are random: outputs are gibberish, only speed and memory are meaningful.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LLMSERVE=("$PYTHON" -m llmserve.entrypoints.cli)

# ---------------------------------------------------------------------------------------------- fail fast
if ! "$PYTHON" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu_suite: torch is not importable by this Python (set PYTHON=...)")
if not torch.cuda.is_available():
    sys.exit(f"gpu_suite: no CUDA GPU is visible to torch {torch.__version__} "
             f"(built for CUDA: {torch.version.cuda or 'no, a CPU-only build'}); this suite needs one")
EOF
then
  exit 2
fi
if ! "$PYTHON" -c "import llmserve" 2>/dev/null; then
  echo "gpu_suite: llmserve is not importable by $PYTHON (run scripts/setup.sh --test first)" >&2
  exit 2
fi

RESULTS=${1:-results/gpu-$(date +%Y%m%d-%H%M%S)}
MODELS=${LLMSERVE_MODELS:-$HOME/.cache/llmserve/gpu-models}
SIZES=${SIZES:-"1b 8b"}
RATES=${RATES:-"1 4 16 inf"}
NUM_PROMPTS=${NUM_PROMPTS:-200}
HF_PROMPTS=${HF_PROMPTS:-16}
TESTS=${TESTS:-"tests/layers/attention tests/layers/fused_moe tests/layers/test_sampler.py tests/worker/test_cuda_graphs.py
  tests/worker/test_kv_cache_groups.py tests/worker/test_model_runner_memory.py tests/lora/test_triton_ops.py
  tests/lora/test_graph_inputs.py tests/layers/test_triton_layer_ops.py tests/layers/test_layer_ops.py
  tests/layers/test_triton_row_reductions.py
  tests/models/test_gemma4.py tests/quantization/test_triton_weight_only.py
  tests/quantization/test_triton_w8a8.py tests/model_loader/test_gguf_packed.py::test_on_cuda_packed_files_match_plain_transformers"}
if [ -z "${PYTEST_ARGS+set}" ]; then
  PYTEST_ARGS=""; "$PYTHON" -c "import xdist" 2>/dev/null && PYTEST_ARGS="-n 8"
fi
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}
QUANTIZATIONS=${QUANTIZATIONS-"fp8 int8"}
PORT=${PORT:-8765}
mkdir -p "$RESULTS" "$MODELS"
RESULTS=$(cd "$RESULTS" && pwd)
exec > >(tee -a "$RESULTS/suite.log") 2>&1
failures=()
step() { echo; echo "=== $(date +%H:%M:%S) $*"; }
run() {   # run a command (at most STEP_TIMEOUT seconds), log it, remember a failure and go on
  echo "+ $*"
  timeout --kill-after 10 "$STEP_TIMEOUT" "$@" || { echo "!!! failed ($?): $*"; failures+=("$*"); }
}

step "environment"
nvidia-smi | tee "$RESULTS/nvidia-smi.txt"
"$PYTHON" - <<'EOF' | tee "$RESULTS/environment.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30, "GiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed: attention falls back to the PyTorch backend")
from llmserve.layers.attention.backend import select_attention_backend
print("attention backend", select_attention_backend(torch.device("cuda")))
EOF
git rev-parse HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$RESULTS/environment.txt"

# ---------------------------------------------------------------------------------------------- checkpoints
declare -A FAMILY=([1b]=llama3 [8b]=llama)
for size in $SIZES; do
  dir="$MODELS/llama-$size-bf16"
  if [ -f "$dir/config.json" ]; then
    echo "checkpoint $dir exists"
  else
    step "writing the $size checkpoint (random bf16 weights) to $dir"
    run "$PYTHON" -m llmserve.testing.checkpoints "$dir" --family "${FAMILY[$size]}" --size "$size" \
      --dtype bfloat16 --max-shard-bytes 5000000000
  fi
done

# ---------------------------------------------------------------------------------------------- tests
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "tests on CUDA"
  # shellcheck disable=SC2086  # TESTS and PYTEST_ARGS are word lists
  run "$PYTHON" -m pytest -q -p no:cacheprovider $PYTEST_ARGS $TESTS --junitxml "$RESULTS/pytest.xml"
fi

# ---------------------------------------------------------------------------------------------- benchmarks
has_command() { "${LLMSERVE[@]}" bench "$1" --help >/dev/null 2>&1; }

for size in $SIZES; do
  model="$MODELS/llama-$size-bf16"
  [ -f "$model/config.json" ] || continue
  common=(--device cuda --dtype bfloat16 --max-model-len 4096)

  step "[$size] batch-1 TPOT against the HBM floor"
  if has_command roofline; then
    run "${LLMSERVE[@]}" bench roofline "$model" "${common[@]}" --output-json "$RESULTS/roofline-$size.json"
  fi
  for mode in graphs eager; do
    extra=(); [ "$mode" = eager ] && extra=(--enforce-eager)
    if has_command latency; then
      run "${LLMSERVE[@]}" bench latency "$model" "${common[@]}" "${extra[@]}" --input-len 128 --output-len 128 \
        --batch-sizes 1,8,32,128 --output-json "$RESULTS/latency-$size-$mode.json" \
        --plot "$RESULTS/latency-$size-$mode.png" --torch-profile "$RESULTS/torch-profile-$size-$mode"
    else
      run "${LLMSERVE[@]}" bench throughput "$model" "${common[@]}" "${extra[@]}" --input-len 128 \
        --output-len 256 --num-prompts 1 --output-json "$RESULTS/latency-$size-$mode.json"
    fi
  done

  for scheme in $QUANTIZATIONS; do   # the Triton kernels of the quantised layouts, against the bf16 rows above
    step "[$size] --quantization $scheme: TPOT per batch size"
    run "${LLMSERVE[@]}" bench latency "$model" "${common[@]}" --quantization "$scheme" --input-len 128 \
      --output-len 128 --batch-sizes 1,32,128 --output-json "$RESULTS/latency-$size-$scheme.json" \
      --torch-profile "$RESULTS/torch-profile-$size-$scheme"
  done

  if [ -n "$QUANTIZATIONS" ] && [ "$size" = "$(echo "$SIZES" | awk '{print $1}')" ]; then
    step "weight-only kernel against the decoded weight + GEMM, per layer shape and row count"
    run "$PYTHON" scripts/bench_weight_only_kernel.py > "$RESULTS/weight-only-kernel.txt"
  fi

  step "[$size] offline throughput against Hugging Face"
  run "${LLMSERVE[@]}" bench throughput "$model" "${common[@]}" --dataset-name sharegpt \
    --num-prompts "$NUM_PROMPTS" --compare-hf --hf-sequential-prompts "$HF_PROMPTS" --output-json "$RESULTS/throughput-$size.json"
done

# ---------------------------------------------------------------------------------------------- serving
serve_size=$(echo "$SIZES" | awk '{print $NF}')   # the largest
model="$MODELS/llama-$serve_size-bf16"
if [ -f "$model/config.json" ]; then
  step "[$serve_size] online serving at request rates: $RATES"
  "${LLMSERVE[@]}" serve "$model" --device cuda --dtype bfloat16 --max-model-len 4096 --host 127.0.0.1 \
    --port "$PORT" > "$RESULTS/server-$serve_size.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
  ready=0
  for _ in $(seq 1 600); do
    if ! kill -0 $server 2>/dev/null; then break; fi
    if "$PYTHON" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2).status != 200)" 2>/dev/null; then
      ready=1; break
    fi
    sleep 1
  done
  if [ $ready = 1 ]; then
    for rate in $RATES; do
      run "${LLMSERVE[@]}" bench serve --base-url "http://127.0.0.1:$PORT" --dataset-name sharegpt \
        --num-prompts "$NUM_PROMPTS" --request-rate "$rate" \
        --disable-tqdm --save-result "$RESULTS/serve-$serve_size-rate-$rate.json"
    done
  else
    echo "!!! the server did not become healthy; see $RESULTS/server-$serve_size.log"
    failures+=("llmserve serve $model")
  fi
  kill $server 2>/dev/null; wait $server 2>/dev/null
  trap - EXIT
fi

step "done: results in $RESULTS"
ls -l "$RESULTS"
if [ ${#failures[@]} -gt 0 ]; then
  echo "${#failures[@]} step(s) failed:"; printf '  %s\n' "${failures[@]}"
  exit 1
fi
