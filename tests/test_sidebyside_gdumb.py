"""The GDumb side-by-side section and summary row are computed from the raw files they are given: per-seed
finals of each column, the lockstep's first differing step and the memory swap's paired difference, nothing
without files; and the seq-mnist preset is the DER authors' port's retraining, value for value."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import crosscheck_summary as summary  # noqa: E402
import sidebyside_gdumb as gdumb  # noqa: E402
from synapse import catalog  # noqa: E402
from synapse.experiments import presets  # noqa: E402


def _ref(final: float) -> dict:
    return {"final": final, "per_task": [final] * 5, "buffer_per_class": [18, 22]}


def _write(path, seeds: dict, values: str = "preset", buffer: int = 200, mode: str = gdumb.MODE) -> None:
    raw = {
        "mode": mode,
        "reference": {"code": "mammoth gdumb", "commit": "abc123"},
        "buffer": buffer,
        "port": gdumb.PORT,
        "synapse_values": values,
        "seeds": seeds,
    }
    path.write_text(json.dumps(raw))


def _steps(first, final: float) -> dict:
    return {
        "steps": [32, 32],
        "first_differing_step": {"0.0": first, "1e-06": None, "0.001": None},
        "worst_relative_difference": {"lr": 0.0, "grad_norm": 2e-7},
        "final_weights_max_abs_diff": 1e-8,
        "synapse": {"final": final},
        "mammoth": {"final": final + 0.5},
    }


def _memory(ours: float, theirs: float) -> dict:
    return {"synapse_memory": {"final": ours}, "port_memory": {"final": theirs}}


def _synthetic(tmp_path) -> None:
    _write(
        tmp_path / "sidebyside_gdumb_ref_b200.json",
        {
            "0": {"reference": _ref(70.0), "synapse": {"final": 60.0}},
            "1": {"reference": _ref(74.0), "synapse": {"final": 62.0}},
        },
    )
    _write(
        tmp_path / "sidebyside_gdumb_ref_gdumbopt_b200.json",
        {"0": {"synapse": {"final": 71.0}}, "1": {"synapse": {"final": 73.0}}},
        values="gdumb-optimizer",
    )


def _synthetic_lockstep(tmp_path) -> None:
    _write(
        tmp_path / "sidebyside_gdumb_lockstep_b200.json",
        {"0": _steps(None, 70.0), "1": _steps(7, 72.0)},
        mode="gdumb-lockstep",
    )
    _write(
        tmp_path / "sidebyside_gdumb_lockstep_memory_b200.json",
        {"1": _memory(70.0, 71.0), "0": _memory(72.0, 71.0)},
        mode="gdumb-memory",
    )


def test_section_lists_each_seed_and_column(tmp_path):
    _synthetic(tmp_path)
    text = gdumb.section(str(tmp_path))
    assert "| 200 | 0 | 60.00 | 71.00 | 70.00 | 18-22 |" in text
    assert "| 200 | 1 | 62.00 | 73.00 | 74.00 | 18-22 |" in text
    assert "| 200 | 0 1 | 61.00 ± 1.41 | 72.00 ± 1.41 | 72.00 ± 2.83 |" in text
    assert "sidebyside_gdumb_ref_gdumbopt_b200.json" in text and "abc123" in text
    assert "lockstep" not in text  # no lockstep files: no lockstep part


def test_section_renders_the_lockstep_and_the_memory_swap(tmp_path):
    _synthetic(tmp_path)
    _synthetic_lockstep(tmp_path)
    text = gdumb.section(str(tmp_path))
    assert "| 200 | 0 | preset | 32 / 32 | none | 2.0e-07 | 1.0e-08 | 70.00 | 70.50 |" in text
    assert "| 200 | 1 | preset | 32 / 32 | 7 | 2.0e-07 | 1.0e-08 | 72.00 | 72.50 |" in text
    # seeds in seed order; the paired differences (-1, +1): mean 0, std 1.41
    assert "| 200 | 0 1 | 71.00 ± 1.41 | 71.00 ± 0.00 | 0.00 ± 1.41 |" in text
    assert "- buffer 200: seed 0 72.00 / 71.00; seed 1 70.00 / 71.00" in text
    assert "sidebyside_gdumb_lockstep_memory_b200.json" in text


def test_summary_row_states_the_gap_the_lockstep_and_the_memory(tmp_path):
    _synthetic(tmp_path)
    _synthetic_lockstep(tmp_path)
    row = summary.gdumb_row(str(tmp_path))
    assert "buffer 200: 61.0 ± 1.4 (2)" in row.synapse
    assert "buffer 200: 72.0 ± 2.8 (2)" in row.authors
    assert row.status == "level with the authors' code: buffer 200: missed (-11.0)"
    assert "buffer 200 (Synapse preset, seeds 0 1): first differing steps [7, None] over 32 steps" in row.finding
    assert "buffer 200: 0.00 ± 1.41 (2 seeds, paired)" in row.finding
    assert row.finding.endswith("against mammoth: buffer 200: 72.0 ± 1.4 (2), met (+0.0)")
    assert any(s.endswith("sidebyside_gdumb_lockstep_b200.json") for s in row.sources)


def test_nothing_without_files(tmp_path):
    assert gdumb.section(str(tmp_path)) == ""
    with pytest.raises(FileNotFoundError, match="sidebyside_gdumb_ref_"):
        summary.gdumb_row(str(tmp_path))


@pytest.mark.parametrize("buffer", [200, 500])
def test_the_preset_retrains_as_the_port_does(buffer):
    """Every retraining value of the seq-mnist preset (over GDumb's defaults) is the port's (mammoth's
    ``GDumb`` parser defaults and its seq-mnist optimizer and batch size: ``PORT``)."""
    values = {h.name: h.default for h in catalog.get("gdumb").hparams}
    values.update(presets.values("gdumb", "seq-mnist", buffer))
    port = gdumb.PORT
    assert values["retrain_epochs"] == port["fitting_epochs"]
    assert values["retrain_cutmix"] == port["cutmix_alpha"]
    assert values["retrain_lr"] == port["maxlr"] and values["retrain_min_lr"] == port["minlr"]
    assert values["retrain_momentum"] == port["optim_mom"] and not port["optim_nesterov"]
    assert values["retrain_weight_decay"] == port["optim_wd"]
    assert values["retrain_batch_size"] == port["batch_size"]
    assert values["retrain_clip_norm"] == 0.0  # the port's fit_buffer clips nothing


def test_the_gdumb_optimizer_diagnosis_is_the_class_defaults():
    """``--synapse gdumb-optimizer`` runs the GDumb authors' values, which are GDumb's defaults."""
    defaults = {h.name: h.default for h in catalog.get("gdumb").hparams}
    assert gdumb.gdumb_optimizer() == {k: defaults[k] for k in gdumb.GDUMB_OPTIMIZER_NAMES}
