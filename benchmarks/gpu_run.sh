#!/usr/bin/env bash
# The benchmark suite and the test suite on a GPU machine, as one script: conv layers and train
# steps at the CPU suite's shapes and batches (so the tables line up with README's CPU tables),
# AlexNet's memory probes, the train step at GPU-sized batches, and the whole test suite on the
# GPU as a correctness check.
# Usage: benchmarks/gpu_run.sh OUTDIR [PART...]
#   PART: conv, train, alexnet (memory probes), big (GPU-sized batches), tests; default: all, in
#   that order (about 11 minutes on an H200; pick parts to fit a shorter lease).
# Needs jax with CUDA, optionally flax and torch with CUDA.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_run.sh OUTDIR [conv|train|alexnet|big|tests ...]}
shift
parts=${*:-conv train alexnet big tests}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# JAX and PyTorch share the card in one process: JAX takes half, not its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
  $py -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" || true
  $py -c "import flax; print('flax', flax.__version__)" || true
  git log -1 --format='fnlayers at %h %s' 2>/dev/null || true
  echo "parts: $parts"
} 2>&1 | tee "$out/setup.log"
for part in $parts; do
  case $part in
    conv)
      timeout 150 $py -m fnlayers.bench.cli conv --out "$out/conv-gpu.json" 2>&1 \
        | tee "$out/conv.log" ;;
    train)
      # Without the memory probes: each is a fresh process that starts CUDA and compiles again
      # (about 12 s apiece on an H200).
      timeout 120 $py -m fnlayers.bench.cli train --no-memory --out "$out/train-gpu.json" 2>&1 \
        | tee "$out/train.log" ;;
    alexnet)
      timeout 170 $py -m fnlayers.bench.cli train --models alexnet --frameworks fnlayers,flax,torch \
        --out "$out/train-gpu-alexnet.json" 2>&1 | tee "$out/train-alexnet.log" ;;
    big)
      timeout 100 $py -m fnlayers.bench.cli train --no-memory --models cifar10_quick,alexnet \
        --batch cifar10_quick=512 --batch alexnet=128 --out "$out/train-gpu-big.json" 2>&1 \
        | tee "$out/train-big.log" ;;
    tests)
      # The test suite pins float32 products to full precision (tests/conftest.py).
      timeout 300 $py -m pytest -q --tb=short -rfE > "$out/pytest.log" 2>&1
      tail -40 "$out/pytest.log" ;;
    *) echo "unknown part: $part" >&2 ;;
  esac
done
