"""The step-overhead benchmark runs every variant, floors included, and writes its JSON (timings are not
asserted: speed is measured by the benchmark itself, side by side, not by tests)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_overhead_runs_every_variant(tmp_path):
    out = tmp_path / "overhead.json"
    args = ["--steps", "3", "--rounds", "1", "--warmup", "2", "--buffer_size", "30", "--json", str(out)]
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step_overhead.py"), *args], check=True)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    expected = {"plain", "ER (fused)", "DER++ (unfused)", "A-GEM", "SI", "DER++ reference-style"}
    expected |= {f"floor: {m}" for m in ("ER", "DER", "DER++", "A-GEM", "SI")}
    assert expected <= rows.keys()
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert rows["plain"]["ratio_to_plain"] == 1.0
