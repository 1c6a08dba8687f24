"""The DER++ stream side-by-side section is computed from the raw files it is given: seeds merged across
files, diverged seeds counted and left out of the second mean, lockstep rows named, nothing without files."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import sidebyside_derpp360 as derpp360  # noqa: E402


def _run(final: float, diverged: bool = False, classes: int = 9) -> dict:
    return {
        "final": final,
        "diagonal": [final],
        "finite_loss": not diverged,
        "predicted_classes": classes,
        "diverged": diverged,
    }


def _write(path, seeds: dict, mode: str = "accuracy") -> None:
    raw = {
        "mode": mode,
        "reference_commit": "abc123",
        "buffer": 500,
        "values": {"lr": 0.2, "mb": 16},
        "seeds": seeds,
    }
    path.write_text(json.dumps(raw))


def test_section_merges_files_and_counts_diverged_seeds(tmp_path):
    _write(tmp_path / "sidebyside_derpp360.json", {"0": {"synapse": _run(20.0), "reference": _run(10.0, True, 1)}})
    _write(tmp_path / "sidebyside_derpp360_more.json", {"1": {"synapse": _run(30.0), "reference": _run(40.0)}})
    steps = {"1": {"first_difference": None, "steps": [{"step": 0, "replay": False, "relative_grad_diff": 2e-7}]}}
    _write(tmp_path / "sidebyside_derpp360_steps.json", steps, mode="steps")
    text = derpp360.section(str(tmp_path))
    assert "at commit abc123" in text
    assert "| Synapse | 2 | 25.00 ± 7.07 | 25.00 ± 7.07 | 0 of 2 |" in text
    assert "| mammoth `Derpp` | 2 | 25.00 ± 21.21 | 40.00 ± 0.00 | 1 of 2 |" in text
    assert "| 0 | 20.00 (9) | 10.00* (1) |" in text
    assert "| 1 | 1 | 0 | none | 2.0e-07 |" in text
    seeds, runs, files = derpp360.stream_runs(str(tmp_path))
    assert seeds == [0, 1]
    assert [r["final"] for r in runs["reference"]] == [10.0, 40.0] and len(files) == 2
    assert [seed for _, seed, _ in derpp360.lockstep_runs(str(tmp_path))] == ["1"]


def test_section_is_empty_without_raw_files(tmp_path):
    assert derpp360.section(str(tmp_path)) == ""
    assert derpp360.stream_runs(str(tmp_path)) == ([], {"synapse": [], "reference": []}, [])
