#!/usr/bin/env bash
# The GPU checks, for a machine with CUDA (e.g. the device tool's, whose python3 already has torch, pytest and
# numpy), in stages that each fit one device call:
#   tests     the sync-free, flat-memory and CPU-vs-CUDA tests (tests/test_gpu.py)
#   mlp       the GPU step-overhead table, every catalog method against its floor (resnet18-reduced)
#   compiled  the same under torch.compile, one variant per method family
#   vit       the pretrained family on a ViT-S-sized random model at 224x224, the catalog defaults
#   vision    benchmarks/vision_checks.py: ResNet-18 and ViT-Tiny, eager/compiled, float32/bf16, host syncs,
#             images/s of the experiment program against a plain DataLoader loop
#   render    the tables of whatever JSON is in the output folder, into README.md and docs/vision.md
#             (runs nothing on the GPU: it may run later, on any machine, over the fetched JSON)
# Outputs go to $OUT (or ./gpu-out); each stage replaces only its own files there (a stage that fails leaves
# no stale table behind) and appends its wall time to stage_seconds.txt. The CPU smoke paths of every stage's
# scripts run in the test suite (tests/test_step_overhead.py, tests/test_vision_checks.py).
#   bash benchmarks/gpu_checks.sh                  # every stage, in this order
#   bash benchmarks/gpu_checks.sh mlp vit render   # some of them
set -uo pipefail
cd "$(dirname "$0")/.."
stages=(tests mlp compiled vit vision render)
chosen=("$@")
[ "${#chosen[@]}" -gt 0 ] || chosen=("${stages[@]}")
for s in "${chosen[@]}"; do
    case " ${stages[*]} " in
        *" $s "*) ;;
        *) echo "gpu_checks: unknown stage '$s'; the stages are: ${stages[*]}" >&2; exit 2 ;;
    esac
done
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

stage_tests() {
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
}
stage_mlp() {
    python3 benchmarks/step_overhead.py --device cuda --rounds 5 --steps 100 --task_ends 1 \
        --json "$out/step_overhead_cuda.json" 2>&1 | tee "$out/step_overhead_cuda.log"
}
stage_compiled() {
    # Compiled plain against compiled replay, one variant per method (each variant compiles its own model;
    # the fill and warm-up steps absorb the compilations and the recompiles while the buffer fills).
    python3 benchmarks/step_overhead.py --device cuda --compile --rounds 5 --steps 100 --task_ends 0 \
        --only "ER (fused)" "DER (fused)" "DER++ (fused)" "A-GEM" "SI" \
        --json "$out/step_overhead_cuda_compiled.json" 2>&1 | tee "$out/step_overhead_cuda_compiled.log"
}
stage_vit() {
    # Each row a ratio to a plain fine-tuning step of the same model, with the methods' catalog defaults
    # (RanPAC's 10000-wide projection). tests/test_step_overhead.py runs this line with --device cpu --quick.
    python3 benchmarks/step_overhead.py --device cuda --vit --hparams defaults --rounds 5 --steps 50 --task_ends 1 \
        --json "$out/step_overhead_cuda_vit.json" 2>&1 | tee "$out/step_overhead_cuda_vit.log"
}
stage_vision() {
    python3 benchmarks/vision_checks.py --device cuda --json "$out/vision_checks_cuda.json" 2>&1 \
        | tee "$out/vision_checks_cuda.log"
}
stage_render() {
    local tables=() f rc=0
    for f in "$out/step_overhead_cuda.json" "$out/step_overhead_cuda_compiled.json" "$out/step_overhead_cuda_vit.json"; do
        if [ -f "$f" ]; then tables+=("$f"); else echo "gpu_checks: no $f, so its table is left out" >&2; fi
    done
    if [ "${#tables[@]}" -gt 0 ]; then  # each result into its own README section (the ViT table apart)
        python3 benchmarks/step_overhead.py --from-json "${tables[@]}" --readme 2>&1 \
            | tee "$out/step_overhead_tables.md" || rc=1
    fi
    if [ -f "$out/vision_checks_cuda.json" ]; then
        python3 benchmarks/vision_checks.py --from-json "$out/vision_checks_cuda.json" --docs 2>&1 \
            | tee "$out/vision_checks_tables.md" || rc=1
    else
        echo "gpu_checks: no $out/vision_checks_cuda.json, so docs/vision.md's tables are left as they are" >&2
    fi
    cp README.md docs/vision.md "$out/" || rc=1
    return $rc
}

# What each stage writes, removed before it runs: never render a stale table.
declare -A outputs=(
    [tests]="gpu_tests.log" [mlp]="step_overhead_cuda.json step_overhead_cuda.log"
    [compiled]="step_overhead_cuda_compiled.json step_overhead_cuda_compiled.log"
    [vit]="step_overhead_cuda_vit.json step_overhead_cuda_vit.log"
    [vision]="vision_checks_cuda.json vision_checks_cuda.log"
    [render]="step_overhead_tables.md vision_checks_tables.md README.md vision.md"
)
if [ "${chosen[0]}" != render ] || [ "${#chosen[@]}" -gt 1 ]; then
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi
status=0
for s in "${chosen[@]}"; do
    for f in ${outputs[$s]}; do rm -f "$out/$f"; done
    start=$SECONDS
    echo "== gpu_checks: $s" >&2
    "stage_$s" || { status=1; echo "gpu_checks: stage $s failed" >&2; }
    echo "$s $((SECONDS - start))" >> "$out/stage_seconds.txt"
done
exit $status
