"""The GDumb side-by-side section and summary row are computed from the raw files they are given: per-seed
finals of each column, Synapse's preset finals taken from the port file where a run has none, nothing
without files."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import crosscheck_summary as summary  # noqa: E402
import sidebyside_gdumb as gdumb  # noqa: E402


def _ref(final: float) -> dict:
    return {"final": final, "per_task": [final] * 5, "buffer_per_class": [18, 22]}


def _write(path, seeds: dict, values: str = "preset", buffer: int = 200) -> None:
    raw = {
        "mode": gdumb.MODE,
        "reference": {"code": "mammoth gdumb", "commit": "abc123"},
        "buffer": buffer,
        "port": gdumb.PORT,
        "synapse_values": values,
        "seeds": seeds,
    }
    path.write_text(json.dumps(raw))


def _synthetic(tmp_path) -> None:
    _write(
        tmp_path / "sidebyside_gdumb_ref_b200.json", {"0": {"reference": _ref(70.0)}, "1": {"reference": _ref(74.0)}}
    )
    _write(
        tmp_path / "sidebyside_gdumb_ref_portopt_b200.json",
        {"0": {"synapse": {"final": 71.0}}, "1": {"synapse": {"final": 73.0}}},
        values="port-optimizer",
    )
    port = {
        "mode": "gdumb",
        "setting": "port",
        "buffer": 200,
        "seeds": {"0": {"synapse": {"final": 60.0}}, "1": {"synapse": {"final": 62.0}}},
    }
    (tmp_path / "sidebyside_gdumb_port_b200.json").write_text(json.dumps(port))


def test_section_lists_each_seed_and_column_and_reads_the_port_file(tmp_path):
    _synthetic(tmp_path)
    text = gdumb.section(str(tmp_path))
    assert "| 200 | 0 | 60.00 | 71.00 | 70.00 | 18-22 |" in text
    assert "| 200 | 1 | 62.00 | 73.00 | 74.00 | 18-22 |" in text
    assert "| 200 | 0 1 | 61.00 ± 1.41 | 72.00 ± 1.41 | 72.00 ± 2.83 |" in text
    assert "sidebyside_gdumb_port_b200.json" in text and "abc123" in text


def test_summary_row_states_the_gap_to_mammoth(tmp_path):
    _synthetic(tmp_path)
    row = summary.gdumb_row(str(tmp_path))
    assert "buffer 200: 61.0 ± 1.4 (2)" in row.synapse
    assert "buffer 200: 72.0 ± 2.8 (2)" in row.authors
    assert row.status == "level with the authors' code: buffer 200: missed (-11.0)"
    assert row.finding.endswith("against mammoth: buffer 200: 72.0 ± 1.4 (2), met (+0.0)")


def test_nothing_without_files(tmp_path):
    assert gdumb.section(str(tmp_path)) == ""
    with pytest.raises(FileNotFoundError, match="sidebyside_gdumb_ref_"):
        summary.gdumb_row(str(tmp_path))
