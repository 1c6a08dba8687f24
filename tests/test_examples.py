"""Every example runs on a tiny budget, so none of them rots."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py") and f != "common.py")


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    args = [] if name == "task_dict.py" else ["--steps-per-task", "30", "--dataset_dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", name), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "an example should report what it did"
