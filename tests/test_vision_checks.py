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

    # The saved result renders into docs/vision.md's section (a copy of it here), and only there.
    docs = tmp_path / "vision.md"
    docs.write_text("# Vision\n<!-- vision-checks -->\nold\n<!-- /vision-checks -->\n## Next\n")
    monkeypatch.setattr(vision_checks, "DOCS", str(docs))
    vision_checks.main(["--from-json", str(out), "--docs"])
    text = docs.read_text()
    assert text.startswith("# Vision\n<!-- vision-checks -->\ncpu, torch ") and text.endswith("## Next\n")
    assert "old" not in text and text.count("| `resnet18` | 16 | no |") == 2  # float32 and bf16
    plain = rows[0]["plain"]["median_ms"]
    stored = rows[0]["der++ stored"]["median_ms"]
    assert f"| {plain:.2f} | {stored:.2f} ms ({stored / plain:.2f}x) |" in text
    assert "| plain DataLoader loop | `resnet18` |" in text and "| 1.00x |" in text
    sys.modules.pop("vision_checks", None)


def test_the_vision_checks_section_is_in_the_docs():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import _runner

    assert _runner.has_section(os.path.join(ROOT, "docs", "vision.md"), "vision-checks")
