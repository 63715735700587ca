#!/usr/bin/env bash
# The benchmark suite and the test suite on a GPU machine, as one script: conv layers and train
# steps at the CPU suite's shapes and batches (so the tables line up with the CPU tables), in
# float32 and in bfloat16, with achieved TFLOP/s against a matrix product measured in the same
# dtype, then the whole test suite on the GPU as a correctness check.
#
# Usage: benchmarks/gpu_run.sh OUTDIR [PART...]
#   PART, run in the order given (default: conv train tests):
#     conv     fnlayers-bench conv once per dtype in DTYPES: 40 s of suite per dtype on an H200
#              in float32 (November's run), plus 10-15 s of jax, torch and CUDA start-up
#     train    fnlayers-bench train --no-memory once per dtype: 85 s per dtype in float32
#              (mostly compilation: fnlayers' AlexNet step compiles in 11 s), plus start-up
#     tests    python -m pytest on the GPU, on pytest-xdist workers when it is installed; it gets
#              what is left of BUDGET_S, and an interrupted run still prints its summary
#     big      not by default: train at GPU-sized batches (CIFAR10-quick 512, AlexNet 128) per
#              dtype, over 90 s per dtype
#     alexnet  not by default: AlexNet with the memory probes (a fresh process per framework,
#              12 s apiece), float32 only, about 170 s
#   The bfloat16 passes have not been timed on an H200 yet; they compile the same number of
#   programs as the float32 ones, which is where their time goes. With the defaults the
#   benchmarks take about 5 minutes and the tests the rest of the budget.
# Environment:
#   DTYPES    the dtypes of conv, train and big (default: "float32 bfloat16")
#   BUDGET_S  seconds the whole script may take (default 570: one 10-minute command, with room
#             for the machine's start-up within a 15-minute loan); every part is cut at what is
#             left of it, the tests included
#   WORKERS   pytest-xdist workers for the tests (default 8; 0: one process)
#   PYTHON    the interpreter (default python3)
# Output: in OUTDIR a JSON file, a Markdown table and a log per benchmark and dtype
# (conv-gpu-float32.json, train-gpu-bfloat16.log, ...), setup.log and pytest.log; after every
# part OUTDIR.tar.gz holds OUTDIR as it then is (one file to copy off a lent machine, complete up
# to the last part that finished).
# Needs jax with CUDA, optionally flax and torch with CUDA.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_run.sh OUTDIR [conv|train|tests|big|alexnet ...]}
shift
parts=${*:-conv train tests}
dtypes=${DTYPES:-float32 bfloat16}
budget=${BUDGET_S:-570}
workers=${WORKERS:-8}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

# Seconds a part may take: its own limit, or what is left of the budget if that is less.
limit() {
  local left=$((budget - SECONDS))
  echo $(($1 < left ? $1 : left))
}

archive() {
  tar -czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
}

bench() {  # bench NAME LIMIT_S ARGS...: one fnlayers-bench run, its JSON, table and log
  local name=$1 t
  t=$(limit "$2")
  shift 2
  if ((t < 30)); then
    echo "skipped $name: $t s left of BUDGET_S=$budget" | tee -a "$out/setup.log"
    return
  fi
  echo "== $name ($t s at most, $SECONDS s in)"
  # JAX and PyTorch share the card in one process: JAX takes half, not its default 75%.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "$t" $py -m fnlayers.bench.cli "$@" \
    --out "$out/$name.json" 2>&1 | tee "$out/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
  $py -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" || true
  $py -c "import flax; print('flax', flax.__version__)" || true
  git log -1 --format='fnlayers at %h %s' 2>/dev/null || true
  echo "parts: $parts; dtypes: $dtypes; budget: $budget s"
} 2>&1 | tee "$out/setup.log"
for part in $parts; do
  case $part in
    conv)
      for dtype in $dtypes; do bench "conv-gpu-$dtype" 100 conv --dtype "$dtype"; done ;;
    train)
      # Without the memory probes: each is a fresh process that starts CUDA and compiles again.
      for dtype in $dtypes; do
        bench "train-gpu-$dtype" 150 train --no-memory --dtype "$dtype"
      done ;;
    big)
      for dtype in $dtypes; do
        bench "train-gpu-big-$dtype" 150 train --no-memory --models cifar10_quick,alexnet \
          --batch cifar10_quick=512 --batch alexnet=128 --dtype "$dtype"
      done ;;
    alexnet)
      bench train-gpu-alexnet 200 train --models alexnet --frameworks fnlayers,flax,torch ;;
    tests)
      t=$(limit 100000)
      echo "== tests ($t s at most, $SECONDS s in)"
      xdist=()
      if ((workers > 0)) && $py -c "import xdist" 2>/dev/null; then
        xdist=(-n "$workers")
      fi
      # Several JAX processes share the card: each allocates as it goes instead of taking 75%
      # of it up front. tests/data holds fixtures and the scripts that wrote them, not tests.
      # SIGINT, not SIGTERM, at the limit: pytest then stops and still prints its summary.
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s INT -k 30 "$((t > 40 ? t - 30 : 10))" \
        $py -m pytest -q --tb=short -rfE --durations=15 --ignore=tests/data "${xdist[@]}" \
        > "$out/pytest.log" 2>&1
      tail -40 "$out/pytest.log" ;;
    *) echo "unknown part: $part" >&2 ;;
  esac
  archive
done
echo "done in $SECONDS s; $out.tar.gz"
