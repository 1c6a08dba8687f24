"""The step-overhead benchmark runs every variant, floors included, and writes its JSON (timings are not
asserted: speed is measured by the benchmark itself, side by side, not by tests). Saved results render
into tables, and into README.md between the device's markers, without running anything."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import step_overhead  # noqa: E402


def test_step_overhead_runs_every_variant(tmp_path):
    out = tmp_path / "overhead.json"
    args = ["--steps", "3", "--rounds", "1", "--warmup", "2", "--buffer_size", "30", "--json", str(out)]
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step_overhead.py"), *args], check=True)
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    from synapse import catalog

    # Every catalog method has a row and a floor row, by its display name (the ER family fused and unfused);
    # the methods whose toy is a ViT have theirs in the --vit table (below), not here.
    mlp = [spec for spec in catalog.specs() if spec.toy != "vit"]
    expected = {"plain", "ER (fused)", "DER++ (unfused)", "A-GEM", "SI", "GEM", "GDumb", "DER++ reference-style"}
    expected |= {f"floor: {spec.display_name}" for spec in mlp}
    assert expected <= rows.keys()
    assert not any(spec.display_name in rows for spec in catalog.specs() if spec.toy == "vit")
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert rows["plain"]["ratio_to_plain"] == 1.0
    # Each method's rows are also compared with its floor (the goal: at most 1.1x).
    assert all("ratio_to_floor" in rows[name] for name in ("ER (fused)", "ER (unfused)", "GEM", "GDumb"))
    er, floor = rows["ER (fused)"], rows["floor: ER"]
    assert er["ratio_to_floor"] == pytest.approx(er["median_ms"] / floor["median_ms"])
    assert not any("ratio_to_floor" in rows[name] for name in ("plain", "floor: ER", "DER++ reference-style"))
    # Every method's task end is timed too (floors and the reference-style DER++ have none).
    ends = {r["variant"]: r for r in result["task_end"]["rows"]}
    assert {"GDumb", "iCaRL (fused)", "EWC (online)", "ER (fused)", "SI"} <= ends.keys()
    assert all(any(name.startswith(spec.display_name) for name in ends) for spec in mlp)
    assert not any(name.startswith("floor") or "reference" in name for name in ends)
    assert all(r["median_ms"] > 0 for r in ends.values())


def test_step_overhead_vit_rows_are_the_catalogs_vit_methods(tmp_path):
    pytest.importorskip("timm")
    from synapse import catalog

    out = tmp_path / "vit.json"
    # gpu_checks.sh's line (a ViT-S-sized model on CUDA, the catalog's defaults), as a CPU smoke run
    args = ["--vit", "--hparams", "defaults", "--device", "cpu", "--quick", "--json", str(out)]
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step_overhead.py"), *args], check=True)
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    vit = [spec for spec in catalog.specs() if spec.toy == "vit"]
    assert vit  # the pretrained family is registered
    expected = {"plain", "forward only"}
    expected |= {spec.display_name for spec in vit} | {f"floor: {s.display_name}" for s in vit if s.floor}
    assert set(rows) == expected  # no MLP method runs on the ViT
    assert result["model_args"] == step_overhead.VIT_QUICK[1]  # the quick path's tiny ViT
    assert "vit_tiny_patch16_224" in result["setting"] and rows["plain"]["ratio_to_plain"] == 1.0
    assert {spec.display_name for spec in vit} <= {r["variant"] for r in result["task_end"]["rows"]}


def saved(tmp_path, name="result.json", **fields):
    result = {
        "setting": "resnet18-reduced, batch 32 + buffer batch 32, Test GPU X1, torch 9.9.9, median of 5 steps",
        "device": "cuda",
        "torch": "9.9.9",
        "rows": [
            {"variant": "plain", "median_ms": 9.0, "ratio_to_plain": 1.0},
            {"variant": "ER (fused)", "median_ms": 9.45, "ratio_to_plain": 1.05},
            {"variant": "A-GEM", "median_ms": 17.73, "ratio_to_plain": 1.97},
        ],
        **fields,
    }
    path = tmp_path / name
    path.write_text(json.dumps(result))
    return str(path)


def test_from_json_renders_the_table_with_device_and_torch(tmp_path, capsys):
    step_overhead.main(["--from-json", saved(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("resnet18-reduced, batch 32") and "Test GPU X1" in out and "torch 9.9.9" in out
    assert "| ER (fused)               |    9.450 |   1.05x |" in out
    assert "| A-GEM                    |   17.730 |   1.97x |" in out


def test_from_json_names_device_and_torch_missing_from_the_setting(tmp_path, capsys):
    path = saved(tmp_path, setting="mlp, batch 10", device_name="Test GPU X2", torch="1.2.3")
    step_overhead.main(["--from-json", path])
    assert capsys.readouterr().out.startswith("mlp, batch 10, Test GPU X2, torch 1.2.3:")


def test_from_json_writes_the_readme_between_the_markers_only(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    before = "# Title\n\n<!-- step-overhead-cpu -->\ncpu table\n<!-- /step-overhead-cpu -->\n\nGPU:\n\n"
    after = "\n\n## Development\n"
    readme.write_text(f"{before}<!-- step-overhead-cuda -->\nold\n<!-- /step-overhead-cuda -->{after}")
    monkeypatch.setattr(step_overhead, "README", str(readme))
    eager = saved(tmp_path)
    compiled = saved(tmp_path, "compiled.json", setting="resnet18-reduced under torch.compile, Test GPU X1")
    step_overhead.main(["--from-json", eager, compiled, "--readme"])
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "old" not in text
    section = text.split("<!-- step-overhead-cuda -->\n")[1].split("\n<!-- /step-overhead-cuda -->")[0]
    assert section.count("| plain ") == 2 and "under torch.compile, Test GPU X1, torch 9.9.9:" in section


def test_from_json_puts_a_vit_result_in_the_vit_section(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    names = ("step-overhead-cpu", "step-overhead-cpu-vit")
    readme.write_text("".join(f"<!-- {n} -->\nold {n}\n<!-- /{n} -->\n" for n in names))
    monkeypatch.setattr(step_overhead, "README", str(readme))
    step_overhead.main(["--from-json", saved(tmp_path, device="cpu", vit=True), "--readme"])
    text = readme.read_text()
    assert "old step-overhead-cpu\n" in text and "old step-overhead-cpu-vit" not in text


def test_from_json_puts_each_result_in_its_own_section_or_writes_none(tmp_path, monkeypatch):
    """gpu_checks.sh renders the eager, compiled and ViT results in one call: two sections."""
    readme = tmp_path / "README.md"
    names = ("step-overhead-cuda", "step-overhead-cuda-vit")
    readme.write_text("".join(f"<!-- {n} -->\nold {n}\n<!-- /{n} -->\n" for n in names))
    monkeypatch.setattr(step_overhead, "README", str(readme))
    eager, vit = saved(tmp_path), saved(tmp_path, "vit.json", setting="vit_small, Test GPU X1", vit=True)
    compiled = saved(tmp_path, "compiled.json", setting="resnet18-reduced under torch.compile, Test GPU X1")
    step_overhead.main(["--from-json", eager, vit, compiled, "--readme"])
    text = readme.read_text()
    mlp_part, vit_part = text.split("<!-- step-overhead-cuda-vit -->")
    assert "old" not in text and mlp_part.count("| plain ") == 2 and vit_part.count("| plain ") == 1
    assert mlp_part.index("under torch.compile") > mlp_part.index("resnet18-reduced, batch 32")
    assert "vit_small" in vit_part and "vit_small" not in mlp_part
    # A section without its markers: nothing is written, not even the sections that have theirs.
    readme.write_text("<!-- step-overhead-cuda -->\nold\n<!-- /step-overhead-cuda -->\n")
    with pytest.raises(SystemExit, match="step-overhead-cuda-vit"):
        step_overhead.main(["--from-json", eager, vit, "--readme"])
    assert readme.read_text() == "<!-- step-overhead-cuda -->\nold\n<!-- /step-overhead-cuda -->\n"


def test_the_readme_has_a_section_for_every_table_the_scripts_write():
    sections = {
        step_overhead.readme_section({"device": device, "vit": vit}) for device in ("cpu", "cuda") for vit in (0, 1)
    }
    assert all(step_overhead.has_section(step_overhead.README, name) for name in sections), sections


@pytest.mark.parametrize(
    "content, flags, message",
    [
        (None, [], "cannot read"),
        ("not json", [], "is not JSON"),
        ('{"setting": "s", "device": "cuda", "rows": []}', [], "no 'rows'"),
        ('{"setting": "s", "device": "cuda", "rows": [{"variant": "plain"}]}', [], "numeric 'median_ms'"),
        ('{"setting": "s", "device": "cuda", "rows": [{"variant": "plain"}]}', ["--compile"], "drop --compile"),
    ],
)
def test_from_json_rejects_bad_input_and_leaves_the_readme(tmp_path, monkeypatch, capsys, content, flags, message):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- step-overhead-cuda -->\nold\n<!-- /step-overhead-cuda -->\n")
    monkeypatch.setattr(step_overhead, "README", str(readme))
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        step_overhead.main(["--from-json", str(path), "--readme", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert "old" in readme.read_text()


def test_readme_without_its_markers_is_left_alone(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- step-overhead-cuda -->\nno end marker\n")
    monkeypatch.setattr(step_overhead, "README", str(readme))
    with pytest.raises(SystemExit, match="lacks the markers"):
        step_overhead.main(["--from-json", saved(tmp_path), "--readme"])
    assert readme.read_text() == "<!-- step-overhead-cuda -->\nno end marker\n"


def test_compile_compiles_every_variant_before_its_method(tmp_path, monkeypatch):
    """``--compile`` hands each method the compiled module. torch.compile is replaced by a recorder, so
    this checks the wiring in milliseconds; compiled steps themselves run in benchmarks/gpu_checks.sh."""
    compiled = []

    def fake_compile(model, backend=None):
        compiled.append((type(model).__name__, backend))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "compiled.json"
    variants = ["plain", "SI", "ER (fused)", "floor: ER"]  # in table order
    args = ["--compile", "--compile_backend", "eager", "--steps", "1", "--rounds", "1", "--warmup", "1"]
    step_overhead.main([*args, "--buffer_size", "20", "--only", *variants[1:], "--json", str(out)])
    assert compiled == [("Classifier", "eager")] * len(variants)
    result = json.loads(out.read_text())
    assert result["compiled"] == "torch.compile(model, backend='eager')"
    assert "under torch.compile" in result["setting"] and [r["variant"] for r in result["rows"]] == variants


def test_task_end_table_shows_end_task_against_an_epoch():
    rows = [{"variant": "ewc", "median_ms": 40.0, "plain_steps": 32.0}]
    lines = step_overhead.task_end_lines({"items": 640, "epoch_steps": 64, "repeats": 3, "rows": rows})
    assert lines[-1] == "| ewc                      |    40.00 |          32 |   0.50x |"
    older = step_overhead.task_end_lines({"items": 640, "rows": rows})  # saved before the column existed
    assert older[-1].endswith("|          32 |       - |")


@pytest.mark.parametrize("name", ["step_overhead_cpu.json", "step_overhead_cpu_vit.json"])
def test_the_readme_cpu_tables_are_the_render_of_the_committed_results(name):
    """README.md's CPU step-overhead sections are what --from-json --readme writes from the committed JSON."""
    result = step_overhead.load_result(os.path.join(ROOT, "benchmarks", "results", name))
    section = step_overhead.readme_section(result)
    with open(step_overhead.README) as f:
        text = f.read()
    shown = text.split(f"<!-- {section} -->\n", 1)[1].split(f"\n<!-- /{section} -->", 1)[0]
    assert shown == "\n".join(step_overhead.render(result))
