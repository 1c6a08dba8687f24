#!/usr/bin/env bash
# The GPU checks in one command, for a machine with CUDA (e.g. the device tool's, whose python3 already
# has torch, pytest and numpy): the sync-free, flat-memory and CPU-vs-CUDA tests, then the GPU
# step-overhead table (written into README.md). Outputs go to $OUT (or ./gpu-out).
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
python3 benchmarks/step_overhead.py --device cuda --rounds 5 --steps 100 --readme \
    --json "$out/step_overhead_cuda.json" 2>&1 | tee "$out/step_overhead_cuda.log"
cp README.md "$out/README.md"
