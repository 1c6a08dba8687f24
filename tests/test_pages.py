"""Every committed REPRODUCIBILITY*.md page is what its script renders from the committed raw results, byte for
byte: a number on a page is one its command gives (issue 21). The renders run nothing."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("benchmarks", "results")

# page -> the command that renders it from the raw results alone (the output path is appended)
RENDERS = {
    "REPRODUCIBILITY.md": ["benchmarks/reproduce.py", "--from-json", f"{RESULTS}/reproduce_fashion-mnist.json"],
    "REPRODUCIBILITY-protocols.md": [
        "benchmarks/protocols.py",
        "--max_test_per_task",
        "2000",
        "--cache",
        f"{RESULTS}/protocols_runs.jsonl",
        "--render-only",
    ],
    "REPRODUCIBILITY-sidebyside.md": ["benchmarks/sidebyside.py", "render"],
    "REPRODUCIBILITY-pretrained.md": ["benchmarks/pretrained_signal.py", "render"],
}


@pytest.mark.parametrize("page", sorted(RENDERS))
def test_the_committed_page_is_the_render_of_the_committed_raw_results(page, tmp_path):
    if page == "REPRODUCIBILITY-pretrained.md":
        pytest.importorskip("timm")
    out = tmp_path / page
    done = subprocess.run(
        [sys.executable, *RENDERS[page], "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.exists(), done.stdout[-2000:] + done.stderr[-2000:]
    with open(os.path.join(ROOT, page)) as f:
        committed = f.read()
    assert out.read_text() == committed, f"{page} is not the render of its raw results: re-render it"
