#!/usr/bin/env bash
# The whole benchmark suite on a GPU machine, as one script: conv layers and train steps at the
# CPU suite's shapes and batches (so the tables line up with README's CPU tables), then the train
# step at GPU-sized batches, then the convolution tests on the GPU as a correctness check.
# Usage: benchmarks/gpu_run.sh OUTDIR   (needs jax with CUDA, optionally flax and torch with CUDA)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_run.sh OUTDIR}
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
} 2>&1 | tee "$out/setup.log"
timeout 150 $py -m fnlayers.bench.cli conv --out "$out/conv-gpu.json" 2>&1 | tee "$out/conv.log"
# Train steps first without the memory probes (each probe is a fresh process that starts CUDA and
# compiles again: about 12 s apiece on an H200), then AlexNet's probes alone.
timeout 120 $py -m fnlayers.bench.cli train --no-memory --out "$out/train-gpu.json" 2>&1 \
  | tee "$out/train.log"
timeout 170 $py -m fnlayers.bench.cli train --models alexnet --frameworks fnlayers,flax,torch \
  --out "$out/train-gpu-alexnet.json" 2>&1 | tee "$out/train-alexnet.log"
timeout 100 $py -m fnlayers.bench.cli train --no-memory --models cifar10_quick,alexnet \
  --batch cifar10_quick=512 --batch alexnet=128 --out "$out/train-gpu-big.json" 2>&1 \
  | tee "$out/train-big.log"
# The test suite pins float32 products to full precision (tests/conftest.py).
timeout 90 $py -m pytest -q -p no:cacheprovider tests/test_conv.py 2>&1 | tail -5 \
  | tee "$out/pytest-conv.log"
