"""benchmarks/gpu_checks.sh's own composition, on the CPU: its stage list, and its render stage over saved
results (the GPU stages' scripts have their CPU smoke runs in test_step_overhead.py and test_vision_checks.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("benchmarks", "gpu_checks.sh")


def step_result(setting, vit=False):
    rows = [{"variant": "plain", "median_ms": 9.0, "ratio_to_plain": 1.0},
            {"variant": "ER (fused)", "median_ms": 9.45, "ratio_to_plain": 1.05}]  # fmt: skip
    return {"setting": setting, "device": "cuda", "torch": "9.9.9", "vit": vit, "rows": rows}


VISION = {
    "device": "Test GPU X1", "batch": 32, "steps": 50, "torch": "9.9.9",
    "step_overhead": [{"model": "resnet18", "input": 32, "compiled": False, "bf16": True,
                       "plain": {"median_ms": 8.0}, "der++ stored": {"median_ms": 9.0},
                       "der++ re-augmented": {"median_ms": 10.0, "host_syncs": 0}}],
    "throughput": [{"loop": "experiment program (memory)", "model": "resnet18", "images_per_s": 3000.0},
                   {"loop": "plain DataLoader loop", "model": "resnet18", "images_per_s": 2000.0}],
}  # fmt: skip


def checkout(tmp_path):
    """The files the script reads and writes, copied: the real README and docs are never touched."""
    root = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "benchmarks"), root / "benchmarks", ignore=shutil.ignore_patterns("results"))
    (root / "docs").mkdir()
    shutil.copy(os.path.join(ROOT, "README.md"), root / "README.md")
    shutil.copy(os.path.join(ROOT, "docs", "vision.md"), root / "docs" / "vision.md")
    return root


def run(root, out, *stages):
    bin_dir = out.parent / "bin"  # python3 is this interpreter, as the device machine's has torch
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "OUT": str(out), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.path.join(ROOT, "src")}  # fmt: skip
    return subprocess.run(["bash", SCRIPT, *stages], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def section(text, name):
    return text.split(f"<!-- {name} -->\n", 1)[1].split(f"\n<!-- /{name} -->", 1)[0]


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    done = run(checkout(tmp_path), out, "mlp", "bogus")
    assert done.returncode == 2 and "unknown stage 'bogus'" in done.stderr and "tests mlp compiled" in done.stderr
    assert not out.exists()


def test_the_render_stage_puts_each_saved_result_in_its_section(tmp_path):
    root, out = checkout(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "step_overhead_cuda.json").write_text(json.dumps(step_result("resnet18-reduced, Test GPU X1")))
    (out / "step_overhead_cuda_vit.json").write_text(json.dumps(step_result("vit_small, Test GPU X1", vit=True)))
    (out / "vision_checks_cuda.json").write_text(json.dumps(VISION))
    done = run(root, out, "render")
    assert done.returncode == 0, done.stderr
    assert "no " + str(out / "step_overhead_cuda_compiled.json") in done.stderr  # said, and left out
    readme = (root / "README.md").read_text()
    assert section(readme, "step-overhead-cuda").startswith("resnet18-reduced, Test GPU X1, torch 9.9.9")
    assert section(readme, "step-overhead-cuda-vit").startswith("vit_small, Test GPU X1, torch 9.9.9")
    assert section(readme, "step-overhead-cpu") == section(
        open(os.path.join(ROOT, "README.md")).read(), "step-overhead-cpu"
    )
    vision = section((root / "docs" / "vision.md").read_text(), "vision-checks")
    assert vision.startswith("Test GPU X1, torch 9.9.9, batch 32") and "| 9.00 ms (1.12x) |" in vision
    assert "| experiment program (memory) | `resnet18` | 3000 | 1.50x |" in vision
    assert (out / "README.md").read_text() == readme and (out / "stage_seconds.txt").read_text().startswith("render ")


def test_a_failing_stage_fails_the_script(tmp_path):
    root, out = checkout(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "vision_checks_cuda.json").write_text("not json")
    done = run(root, out, "render")
    assert done.returncode == 1 and "stage render failed" in done.stderr
