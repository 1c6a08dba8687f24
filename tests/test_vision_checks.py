"""benchmarks/vision_checks.py's CPU smoke path, so that the GPU script's parts cannot break untested."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm (the test extra installs it)")
def test_the_vision_checks_run_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import vision_checks

    out = tmp_path / "checks.json"
    result = vision_checks.main(["--device", "cpu", "--quick", "--no_compile", "--workers", "0", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["step_overhead"]
    assert [(r["model"], r["bf16"]) for r in rows] == [(m, b) for m, _ in vision_checks.QUICK_MODELS for b in (0, 1)]
    for row in rows:
        for variant in ("plain", "der++ stored", "der++ re-augmented"):
            assert row[variant]["median_ms"] > 0
    loops = [r["loop"] for r in result["throughput"]]
    assert loops == ["experiment program (memory)", "experiment program (stream)", "plain DataLoader loop"]
    assert all(r["images_per_s"] > 0 for r in result["throughput"])
    sys.modules.pop("vision_checks", None)
