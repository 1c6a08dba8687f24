"""The Synapse-side parts of ``benchmarks/sidebyside_pretrained.py`` (the authors' code is not in CI): the
comparison rows, the reference backbone's weight loading, and the render."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _slca_sidebyside as slca_sbs  # noqa: E402
import sidebyside_pretrained as sbs  # noqa: E402


def ranpac_record(seed: int, classes: int = 4, m: int = 6, n: int = 20):
    gen = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n, m, generator=gen))
    y = torch.nn.functional.one_hot(torch.arange(n) % classes, classes).float()
    features = torch.randn(5, 3, generator=gen)
    projection = torch.randn(3, m, generator=gen)
    ridge = sbs.ridge_choice(h, y)["ridge"]  # the authors' choice, as their code would make it
    weights = ((y.T @ h).double() @ torch.linalg.inv((h.T @ h).double() + ridge * torch.eye(m))).float()
    logits = torch.relu(features @ projection) @ weights.T
    ours = {"gram": h.T @ h, "class_features": y.T @ h, "ridge": ridge, "weights": weights, "logits": logits}
    ours.update(features=features, projection=projection)
    return ours, {**ours, "task_features": h, "task_targets": y}


def test_identical_runs_compare_as_equal():
    ours, theirs = ranpac_record(0)
    rows = sbs.compare("ranpac", [ours], [theirs], per_task=4)
    assert {r["quantity"] for r in rows} >= {"G = H^T H", "Q = H^T Y", "lambda on the authors' split"}
    assert all(r["max_rel"] < 1e-5 for r in rows if "max_rel" in r)
    assert all(r["same"] for r in rows if "same" in r)
    assert all(r["fraction"] == 1.0 for r in rows if "fraction" in r)


def test_a_changed_quantity_is_found():
    ours, theirs = ranpac_record(1)
    theirs = {**theirs, "gram": theirs["gram"] * 1.01}
    rows = {r["quantity"]: r for r in sbs.compare("ranpac", [ours], [theirs], per_task=4)}
    assert abs(rows["G = H^T H"]["max_rel"] - 0.01 / 1.01) < 1e-6


def test_selection_rows_tell_sets_from_orders():
    ours = torch.tensor([[0, 1], [2, 3]])
    theirs = torch.tensor([[1, 0], [2, 4]])
    rows = {r["quantity"]: r["fraction"] for r in sbs.selection_rows({}, "", ours, theirs)}
    assert rows == {"prompt selection: same set": 0.5, "prompt selection: same order": 0.0}


def test_reference_backbone_takes_the_weights_and_gives_the_heads_input():
    torch.manual_seed(0)
    model = sbs.tiny_vit().eval()
    weights = model.state_dict()
    vit = sbs.reference_backbone({"vit": dict(sbs.VIT), "weights": weights})
    x = torch.randn(2, 3, sbs.VIT["img_size"], sbs.VIT["img_size"])
    with torch.no_grad():
        assert torch.allclose(vit(x), model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-6)


def test_render_reads_the_results(tmp_path):
    ours, theirs = ranpac_record(2)
    results = {
        "method": "ranpac",
        "reference": {"repository": "RanPAC/RanPAC", "files": "RanPAC.py", "commit": "abc", "versions": "timm x"},
        "settings": {"dataset": "d", "train_per_task": 1, "test_per_task": 1, "batch_size": 1, "vit": "v"},
        "tolerance": sbs.TOLERANCE,
        "provenance": None,
        "seeds": {"0": sbs.compare("ranpac", [ours], [theirs], per_task=4)},
    }
    (tmp_path / "sidebyside_pretrained_ranpac.json").write_text(json.dumps(results))
    text = sbs.render(str(tmp_path))
    assert "| G = H^T H |" in text and "within tolerance" in text


def step_record(gen, partial=False, selection=True):
    record = {
        "logits": torch.randn(3, 4, generator=gen),
        "loss": torch.randn((), generator=gen),
        "grads": {"e_prompt.prompt": torch.randn(2, 2, 6, generator=gen)},
        "mask_partial": partial,
    }
    if selection:
        record["selection"] = torch.tensor([[0], [0], [1]])
    return record


def test_prompt_steps_compare_reshaped_gradients_and_mark_partial_masks():
    gen = torch.Generator().manual_seed(3)
    ours = {"steps": [step_record(gen, partial=True), step_record(gen)], "evaluations": []}
    # The authors keep heads apart: (..., 6) is their (..., heads 2, 3); the same numbers.
    theirs = {
        "steps": [
            {**step, "grads": {"e_prompt.prompt": step["grads"]["e_prompt.prompt"].reshape(2, 2, 2, 3)}}
            for step in ours["steps"]
        ],
        "evaluations": [],
    }
    rows = sbs.compare_steps(ours, theirs, [0, 0])
    quantities = [r["quantity"] for r in rows]
    assert "loss" + sbs.PARTIAL_MASK in quantities and "loss" in quantities
    assert "gradient of e_prompt.prompt" + sbs.PARTIAL_MASK in quantities
    assert all(r["max_rel"] == 0.0 for r in rows if "max_rel" in r)


def test_prompt_task_ends_compare_starts_and_tied_votes():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 3, generator=gen)
    state = {"key": torch.randn(2, 3, generator=gen)}
    ours = {
        "steps": [step_record(gen, selection=False)],
        "task_start_states": [state],  # at the next task's first training forward
        "evaluations": [{"logits": logits, "selection": torch.tensor([[0], [0], [1], [1]])}],
    }
    theirs = {
        "steps": [{**ours["steps"][0]}],
        "task_starts": [{"key": state["key"] + 1.0}],
        "evaluations": [
            {
                "logits": logits,
                "selection": torch.tensor([[0], [0], [0], [0]]),
                "vote_tied": torch.tensor([False, False, True, True]),
            }
        ],
    }
    rows = {r["quantity"]: r for r in sbs.compare_steps(ours, theirs, [0])}
    assert not any(q.startswith("prompt selection:") for q in rows)  # no selection (CODA-Prompt)
    start = rows["key at task start (Synapse: at its first training forward)"]
    assert abs(start["max_abs"] - 1.0) < 1e-6
    assert rows["prompt selection (test): same set"]["fraction"] == 0.5
    assert rows["of the test selections that differ: in a batch whose vote ties"]["fraction"] == 1.0


def slca_records(gen, per_task=2, tasks=2):
    """A Synapse-side SLCA record of one step per task and one task end per task, and the authors' record of
    the same numbers in their layout (their logits have the classes so far only, their head of the step's task
    only)."""
    classes = per_task * tasks
    ours = {"steps": [], "ends": []}
    theirs = {"steps": [], "ends": []}
    for t in range(tasks):
        rows = slice(t * per_task, (t + 1) * per_task)
        grads = {"blocks.0.w": torch.randn(3, 2, generator=gen), "head.weight": torch.zeros(classes, 3)}
        grads["head.bias"] = torch.zeros(classes)
        grads["head.weight"][rows] = torch.randn(per_task, 3, generator=gen)
        steps = {k: 0.01 * v for k, v in grads.items()}
        logits = torch.randn(4, classes, generator=gen)
        ours["steps"].append({"logits": logits, "loss": torch.tensor(1.0), "grads": grads, "steps": steps})
        theirs["steps"].append(
            {
                "logits": logits[:, : (t + 1) * per_task],
                "loss": torch.tensor(1.0),
                "grads": {k: v[rows] if k in slca_sbs.HEAD else v for k, v in grads.items()},
                "steps": {k: v[rows] if k in slca_sbs.HEAD else v for k, v in steps.items()},
            }
        )
        shown = (t + 1) * per_task
        end = {
            "class_means": torch.randn(shown, 3, generator=gen).double(),
            "class_covariances": torch.randn(shown, 3, 3, generator=gen),
            "head.weight": torch.randn(shown, 3, generator=gen),
            "head.bias": torch.randn(shown, generator=gen),
            "logits": torch.randn(5, shown, generator=gen),
        }
        ours["ends"].append({**end, "stat_classes": torch.arange(shown), "aligned": t > 0})
        theirs["ends"].append(end)
    return ours, theirs


def test_slca_rows_map_the_authors_per_task_heads_onto_synapses_rows():
    ours, theirs = slca_records(torch.Generator().manual_seed(5))
    rows = slca_sbs.compare(ours, theirs, [0, 1], per_task=2)
    assert all(r["max_rel"] == 0.0 for r in rows if "max_rel" in r)
    quantities = {r["quantity"] for r in rows}
    assert "aligned head: weight" in quantities and "logits of the earlier classes" in quantities
    assert "optimizer step of the earlier classes' head rows (authors: frozen)" in quantities
    # Synapse's earlier rows moved (weight decay) and a backbone gradient is off: both are found.
    ours["steps"][1]["steps"]["head.weight"][0, 0] = 0.5
    ours["steps"][1]["grads"]["blocks.0.w"] = theirs["steps"][1]["grads"]["blocks.0.w"] * 1.01
    found = {(r["task"], r["quantity"]): r for r in slca_sbs.compare(ours, theirs, [0, 1], per_task=2)}
    assert found[(2, "optimizer step of the earlier classes' head rows (authors: frozen)")]["max_abs"] == 0.5
    assert abs(found[(2, "gradient of the backbone (worst tensor)")]["max_rel"] - 0.01) < 1e-6


def test_slca_worst_tensor_is_the_largest_relative_difference():
    ours = {"a": torch.tensor([100.0, 1.0]), "b": torch.tensor([0.011])}
    theirs = {"a": torch.tensor([100.0, 0.0]), "b": torch.tensor([0.010])}
    assert slca_sbs.worst_tensor(ours, theirs, ["a", "b"]) == pytest.approx({"max_abs": 0.001, "max_rel": 0.1})
    assert slca_sbs.worst_tensor(ours, theirs, []) == {"max_abs": 0.0, "max_rel": 0.0}
