"""The catalog is the only list: a method is one file, found by discovery, and it reaches the CLI, the
benchmark rows and the docs' methods table with no other edit; its best values are one preset file, loaded by
the CLI's --preset and the benchmarks; its floor step sits beside it."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import synapse.structure
from synapse import catalog, testing
from synapse.experiments import presets
from synapse.experiments.cli import build_parser, main
from synapse.experiments.models import Classifier, Normalize, create_model
from synapse.pretrained._frozen import FrozenFeatureFloor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _runner  # noqa: E402
import reproduce  # noqa: E402
import step_overhead  # noqa: E402

SMALL = ["--dataset", "fashion-mnist", "--max_train_per_task", "50", "--max_test_per_task", "20"]

THROWAWAY = '''
"""A throwaway method: MAS under another name, in a module no family __init__ imports."""

from synapse._floor import PenaltyFloor
from synapse.catalog import HParam, MethodSpec, register
from synapse.structure.mas import MAS


class Throwaway(MAS):
    """MAS, registered again."""


register(
    MethodSpec(
        "throwaway",
        Throwaway,
        family="structure",
        paper="Nobody 2026, *A throwaway method*",
        summary="a method that exists only in this test",
        floor=PenaltyFloor,
        hparams=(HParam("mas_lambda", float, 1.0, "penalty strength", low=0.0),),
    )
)
'''


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """A method file written into a folder added to ``synapse.structure``'s path, with a preset file beside
    the real ones (in a copy of the presets folder); the catalog rediscovers its families."""
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "throwaway_method.py").write_text(textwrap.dedent(THROWAWAY))
    folder = tmp_path / "presets"
    shutil.copytree(presets.HERE, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    row = {"buffer": None, "values": {"lr": 0.03, "mas_lambda": 0.5}}
    entry = {"source": "validation-grid", "reference": "this test", "grid": {"mas_lambda": [0.5]}, "rows": [row]}
    (folder / "throwaway.json").write_text(json.dumps({"method": "throwaway", "protocols": {"seq-mnist": entry}}))
    monkeypatch.setattr(synapse.structure, "__path__", [*synapse.structure.__path__, str(methods)])
    monkeypatch.setattr(catalog, "_loaded", False)
    monkeypatch.setattr(presets, "HERE", str(folder))
    presets.load.cache_clear()
    yield
    catalog._REGISTRY.pop("throwaway", None)
    sys.modules.pop("synapse.structure.throwaway_method", None)
    presets.load.cache_clear()


def test_a_new_method_file_reaches_every_list_with_no_other_edit(throwaway):
    assert "throwaway" in catalog.names()  # discovered: no __init__ imports it
    choices = next(a.choices for a in build_parser()._actions if a.dest == "synapse_type")
    assert "throwaway" in choices
    assert "| structure | `throwaway` |" in catalog.methods_table()
    variants = step_overhead.make_variants(20, 5, (1, 28, 28))
    assert {"Throwaway", "floor: Throwaway"} <= variants.keys()
    assert ("throwaway", None) in reproduce.rows_for("fashion-mnist")
    assert reproduce.tuned_grids("seq-mnist")["throwaway"] == {"mas_lambda": [0.5]}
    assert _runner.config_for("fashion-mnist", "throwaway", None, 0).method_args == {"mas_lambda": 0.5}
    # the contract harness: test_contract.py's cases come from the catalog, so the new method is among them,
    # and it passes each check
    from test_contract import _variants

    cases = [case.values for case in _variants() if case.values[0].name == "throwaway"]
    assert cases
    for spec, hparams, run in cases:
        testing.check_resume(spec, hparams, **run)
        testing.check_rejected_calls(spec, hparams, **run)
    testing.check_bad_hyperparameters(catalog.get("throwaway"))


def test_family_init_imports_are_not_needed(monkeypatch):
    """Discovery imports every module of a family package, whatever its ``__init__`` imports."""
    imported = []
    real = catalog.importlib.import_module
    monkeypatch.setattr(catalog, "_loaded", False)
    monkeypatch.setattr(catalog.importlib, "import_module", lambda name: imported.append(name) or real(name))
    catalog.specs()
    assert {"synapse.rehearsal.mir", "synapse.structure.mas", "synapse.distillation.lwf"} <= set(imported)


def test_every_method_has_checked_presets_and_table_fields():
    for method in presets.methods():  # each file passes its checks against the catalog
        presets.load(method)
    seq_mnist = {m for m, _ in presets.table("seq-mnist")}
    # Every method is a row of the reproduction, but the pretrained family: the DER paper's protocols train
    # from scratch, and those methods need a pretrained backbone (issue 24's protocols are theirs).
    from_scratch = {m for m in presets.methods() if m in presets.BASELINES or catalog.get(m).family != "pretrained"}
    assert seq_mnist == from_scratch
    assert [m for m in presets.methods() if m not in presets.BASELINES and catalog.get(m).regulariser] == [
        "si",
        "ewc",
        "mas",
        "lwf",
    ]
    assert presets.display_name("er-ace") == "ER-ACE" and presets.display_name("sequential") == "SGD (fine-tuning)"


_ER_ROW = {"source": "paper", "reference": "x", "rows": [{"buffer": 200, "values": {"lr": 0.1}}]}


@pytest.mark.parametrize(
    "content, problem",
    [
        ({"method": "other", "protocols": {}}, "'method' must be 'er'"),
        ({"method": "er", "protocols": {"seq-x": {}}}, "unknown protocol 'seq-x'"),
        (
            {"method": "er", "protocols": {"seq-mnist": {"source": "rumour", "reference": "x", "rows": []}}},
            "'source' must be one of",
        ),
        (
            {
                "method": "er",
                "protocols": {
                    "seq-mnist": {
                        "source": "paper",
                        "reference": "x",
                        "rows": [{"buffer": 200, "values": {"lr": 0.1, "alpha": -1.0}}],
                    }
                },
            },
            "alpha must be finite and >= 0",
        ),
        (
            {
                "method": "er",
                "protocols": {
                    "seq-mnist": {"source": "paper", "reference": "x", "rows": [{"buffer": None, "values": {"lr": 1}}]}
                },
            },
            "buffer None for a method with a memory",
        ),
        (
            {"method": "er", "protocols": {"seq-mnist": {**_ER_ROW, "tuned": {**_ER_ROW, "grid": {"lr": [0.1]}}}}},
            "seq-mnist (tuned): a second row is 'validation-grid', with the 'grid' it searched",
        ),
        (
            {
                "method": "er",
                "protocols": {
                    "seq-mnist": {
                        **_ER_ROW,
                        "tuned": {
                            **_ER_ROW,
                            "source": "validation-grid",
                            "grid": {"lr": [0.1]},
                            "rows": [{"buffer": 500, "values": {"lr": 0.1}}],
                        },
                    }
                },
            },
            "buffers [500] have no first row (the paper's values) to pair with",
        ),
    ],
)
def test_a_bad_preset_file_is_refused_naming_file_and_problem(tmp_path, monkeypatch, content, problem):
    (tmp_path / "er.json").write_text(json.dumps(content))
    monkeypatch.setattr(presets, "HERE", str(tmp_path))
    presets.load.cache_clear()
    try:
        with pytest.raises(ValueError, match="er.json") as e:
            presets.load("er")
        assert problem in str(e.value)
    finally:
        presets.load.cache_clear()


def test_cli_preset_fills_unset_values_and_flags_override(tmp_path, capsys):
    out = str(tmp_path)
    args = [*SMALL, "--synapse_type", "der++", "--buffer_size", "500", "--preset", "seq-mnist", "--alpha", "0.5"]
    assert main([*args, "--output_dir", out]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f:
        config = json.load(f)["config"]
    assert presets.values("der++", "seq-mnist", 500) == {"lr": 0.03, "mb": 10, "alpha": 1.0, "beta": 0.5}
    assert config["lr"] == 0.03 and config["buffer_sample_size"] == 10
    assert config["method_args"]["alpha"] == 0.5 and config["method_args"]["beta"] == 0.5
    assert "preset seq-mnist for der++ at buffer 500: authors-config" in printed
    assert "--lr 0.03: preset" in printed and "--alpha: the command line's, not the preset's 1.0" in printed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--synapse_type", "der++", "--buffer_size", "300"], "no seq-mnist preset for der++ at buffer 300"),
        (["--dataset", "cifar10", "--synapse_type", "er"], "is for --dataset fashion-mnist or mnist, not cifar10"),
    ],
)
def test_cli_preset_errors_before_anything_runs(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main([*SMALL, *flags, "--preset", "seq-mnist"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("spec", [s for s in catalog.specs() if s.floor is not None], ids=lambda s: s.name)
def test_floor_steps_train(spec):
    """Each floor is a real step: finite gradients on the model (GDumb's stream step stores the batch only)."""
    torch.manual_seed(0)
    prompts = spec.cls.requires_vit  # on a tiny ViT behind the experiment program's normalisation
    model = Classifier(Normalize([0.5], [0.25]), testing.toy_vit(), 3, testing.IMAGE_SIZE) if prompts else None
    model = model or create_model("mlp", 1, 28, 10, [0.5], [0.25])
    floor = spec.floor(model, 40, 5, (1, 28, 28), spec.resolve(spec.harness_hparams))
    x, y = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (8,))
    logits = floor.forward(x)
    floor.backward(F.cross_entropy(logits, y), y, x, logits)
    grads = [p.grad for p in model.parameters()]
    if prompts:  # the prompts, keys and head train; the backbone gets no gradient
        trained = floor.extra + list(model.backbone.head.parameters())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in trained)
        assert sum(g is not None for g in grads) == 2
    elif spec.name == "gdumb":
        assert all(g is None for g in grads) and torch.equal(floor.x[:8], x)
    elif issubclass(spec.floor, FrozenFeatureFloor):  # a closed-form classifier: no backward pass, features kept
        assert all(g is None for g in grads) and floor.features.shape[0] == 8
    else:
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_provenance_is_rendered_from_the_raw_results():
    recorded = _runner.provenance()
    assert {"commit", "machine", "versions"} <= recorded.keys() and "torch" in recorded["versions"]
    machine, versions = _runner.provenance_lines([recorded, recorded])
    assert machine == f"Machine: {recorded['machine']} (commit {recorded['commit']})"
    assert versions == f"Versions: {recorded['versions']}"
    assert _runner.provenance_lines([None]) == (
        "Machine: not recorded with these raw results",
        "Versions: not recorded with these raw results",
    )
    assert _runner.provenance_lines([recorded, None])[0].endswith("; not recorded with these raw results")


def test_python_m_synapse_experiments_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "synapse.experiments", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0 and "--preset" in proc.stdout and "--synapse_type" in proc.stdout
