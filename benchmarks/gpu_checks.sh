#!/usr/bin/env bash
# The GPU checks in one command, for a machine with CUDA (e.g. the device tool's, whose python3 already
# has torch, pytest and numpy): the sync-free, flat-memory and CPU-vs-CUDA tests, then the GPU
# step-overhead tables, eager and under torch.compile, rendered together into README.md from their JSON;
# then the vision checks (benchmarks/vision_checks.py; its CPU smoke path runs in tests/test_vision_checks.py).
# Outputs go to $OUT (or ./gpu-out).
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
rm -f "$out/step_overhead_cuda.json" "$out/step_overhead_cuda_compiled.json" "$out/step_overhead_cuda_vit.json" "$out/vision_checks_cuda.json"  # never render a stale table
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
python3 benchmarks/step_overhead.py --device cuda --rounds 5 --steps 100 --task_ends 1 \
    --json "$out/step_overhead_cuda.json" 2>&1 | tee "$out/step_overhead_cuda.log"
# Compiled plain against compiled replay, one variant per method (each variant compiles its own model;
# the fill and warm-up steps absorb the compilations and the recompiles while the buffer fills).
python3 benchmarks/step_overhead.py --device cuda --compile --rounds 5 --steps 100 --task_ends 0 \
    --only "ER (fused)" "DER (fused)" "DER++ (fused)" "A-GEM" "SI" \
    --json "$out/step_overhead_cuda_compiled.json" 2>&1 | tee "$out/step_overhead_cuda_compiled.log"
# The pretrained family (the catalog's ViT methods) on a ViT-S-sized random model at 224x224, each row a ratio
# to a plain fine-tuning step of the same model, with the methods' catalog defaults (RanPAC's 10000-wide
# projection). tests/test_step_overhead.py runs this line on the CPU with --device cpu --quick.
python3 benchmarks/step_overhead.py --device cuda --vit --hparams defaults --rounds 5 --steps 50 --task_ends 1 \
    --json "$out/step_overhead_cuda_vit.json" 2>&1 | tee "$out/step_overhead_cuda_vit.log"
tables=()
for f in "$out/step_overhead_cuda.json" "$out/step_overhead_cuda_compiled.json" "$out/step_overhead_cuda_vit.json"; do
    if [ -f "$f" ]; then tables+=("$f"); else echo "gpu_checks: no $f, so its table is left out" >&2; fi
done
if [ "${#tables[@]}" -gt 0 ]; then
    python3 benchmarks/step_overhead.py --from-json "${tables[@]}" --readme 2>&1 | tee "$out/step_overhead_tables.md"
fi
# Vision (issue 22): torchvision ResNet-18 and timm's ViT-Tiny, eager and compiled, float32 and bf16: step
# overhead of re-augmented replay, its host syncs, and images/s of the experiment program (in memory and
# streamed) against a plain DataLoader loop on the same model and image folder.
python3 benchmarks/vision_checks.py --device cuda --json "$out/vision_checks_cuda.json" 2>&1 | tee "$out/vision_checks_cuda.log"
cp README.md "$out/README.md"
