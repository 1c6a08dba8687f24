"""benchmarks/prompt_diagnosis.py: the task-level confusion and the attention-mass shares it reports, and that
each variant's printed command is the experiment program's own setting."""

import os
import shlex
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import prompt_diagnosis as diag  # noqa: E402
from synapse.experiments.cli import _method_args, build_parser  # noqa: E402

TASKS = [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]


def test_class_to_task_maps_each_class_to_its_task_and_refuses_gaps_and_overlaps():
    assert diag.class_to_task(TASKS, 10).tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="no task"):
        diag.class_to_task([[0, 1], [2]], 4)
    with pytest.raises(ValueError, match="more than one task"):
        diag.class_to_task([[0, 1], [1, 2]], 3)


def test_task_confusion_counts_the_task_of_each_predicted_class_per_true_task():
    owner = diag.class_to_task(TASKS, 10)
    # Task 0's four images: classes 1, 2 (task 0), 5 (task 1), 9 (task 3); task 2's two: 0 (task 0), 7 (task 2).
    predicted = torch.tensor([1, 2, 5, 9, 0, 7])
    true_task = torch.tensor([0, 0, 0, 0, 2, 2])
    got = diag.task_confusion(predicted, true_task, owner, 4)
    assert got == [[0.5, 0.25, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="differ"):
        diag.task_confusion(predicted, true_task[:3], owner, 4)


def test_mass_per_task_shares_the_absolute_weights_by_slice_and_averages_over_the_batch():
    # Two slices of 2 components; sample 0 puts |1|+|-1| on slice 0 and 0 on slice 1, sample 1 1 and 3.
    weights = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.5, -0.5, 3.0, 0.0]])
    assert diag.mass_per_task(weights, 2) == pytest.approx([(1.0 + 0.25) / 2, 0.75 / 2])


def test_zero_after_keeps_the_first_columns_only():
    w = torch.arange(1.0, 7.0).reshape(2, 3)
    assert diag._zero_after(w, 2).tolist() == [[1.0, 2.0, 0.0], [4.0, 5.0, 0.0]]


@pytest.mark.parametrize("method,variant", [(m, v) for m in diag.METHODS for v in diag.APPLIES[m]])
def test_each_variants_command_is_the_programs_setting_for_that_change(method, variant):
    words = shlex.split(diag.command(method, variant, 0))
    assert words[:3] == ["python", "-m", "synapse.experiments"]
    parser = build_parser()
    args = parser.parse_args(words[3:])
    fields, method_args = diag.change(method, variant)
    resolved = _method_args(parser, args)
    for key, value in method_args.items():
        assert resolved[key] == value
    for key, value in fields.items():
        assert getattr(args, key) == value
    assert args.synapse_type == method


def test_unknown_variants_are_refused():
    with pytest.raises(SystemExit, match="unknown"):
        diag.parse_variants(["dualprompt:nope"])
    with pytest.raises(SystemExit, match="unknown"):
        diag.parse_variants(["coda-prompt:unmasked"])  # CODA-Prompt has no train_mask
    assert ("l2p", "unmasked") in diag.parse_variants(None)


def _fake_run(variant, diagonal, first_final, last_into_first=0.9, logits=(1.5, 0.25), oracle=0.003):
    """A run record with only what the finding reads: 2 tasks, the last one's numbers as given."""
    matrix = [[0.9, 0.0], [first_final, diagonal]]
    point = {
        "class_il": [first_final, diagonal],
        "oracle_class_il": [0.9, oracle],
        "confusion": [[1.0, 0.0], [last_into_first, 1 - last_into_first]],
        "max_logit": [[2.0, 0.1], list(logits)],
        "selection": {"task 2": {"own_batchwise": 0.0}},
    }
    return {"method": "dualprompt", "variant": variant, "seed": 0, "accuracy_matrix": {"class_il": matrix},
            "points": [point, point]}  # fmt: skip


def test_the_finding_reads_its_numbers_from_the_runs_and_is_empty_without_them(monkeypatch):
    import pretrained_signal as signal

    runs = [_fake_run("default", 0.004, 0.88), _fake_run("unmasked", 0.77, 0.31)]
    text = diag.finding(runs)
    for number in ("90.0%", "1.50 there, 0.25", "0.4% Class-IL", "scores 77.0%", "falls to 31.0%", "at 0.3%"):
        assert number in text
    assert diag.finding(runs[:1]) == ""  # no unmasked run: nothing established
    monkeypatch.setattr(diag, "load", lambda path=diag.OUTPUT_JSON: runs)
    assert "77.0%" in signal.diagnosis_note() and "prompt_diagnosis.md" in signal.diagnosis_note()
    monkeypatch.setattr(diag, "load", lambda path=diag.OUTPUT_JSON: [])
    assert signal.diagnosis_note() == ""  # the page renders as before the diagnosis


@pytest.mark.parametrize("name", ["dualprompt", "l2p", "coda-prompt"])
def test_the_oracle_forces_the_tasks_own_prompts_and_the_guard_sees_whether_it_did(name):
    timm = pytest.importorskip("timm")
    from synapse import catalog

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=10).eval()  # fmt: skip
    args = {
        "dualprompt": {"pool_size": 4, "g_prompt_layers": "0", "e_prompt_layers": "1"},
        "l2p": {"pool_size": 4, "top_k": 2},
        "coda-prompt": {"pool_size": 8, "num_tasks": 4, "prompt_layers": 2},
    }[name]
    method = catalog.get(name).cls(model, **args)
    if name == "coda-prompt":
        method.end_task()
        method.end_task()  # tasks 1 and 2's components in use: forcing task 1 zeroes task 2's
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        model(x)
        # A task (DualPrompt) or a training selection (L2P) other than what the key match chose.
        chosen = method.last_selection[0].tolist() if name != "coda-prompt" else []
        task = next(t for t in range(4) if [t] != chosen) if name == "dualprompt" else 0
        trained_with = {0: [0, 1] if sorted(chosen) != [0, 1] else [2, 3]}
        with pytest.raises(RuntimeError, match="not the ones used"):
            diag._check_forced(method, task, trained_with)
        undo = diag._oracle(method, task, trained_with)
        model(x)
        diag._check_forced(method, task, trained_with)
        undo()
        model(x)
        with pytest.raises(RuntimeError, match="not the ones used"):
            diag._check_forced(method, task, trained_with)  # undone: the method chooses again


def test_steps_counts_the_partial_last_batch_of_each_epoch():
    assert diag.steps({"train_images": 21600, "settings": {"batch_size": 64, "epochs": 10}}) == 3380
    assert diag.steps({"train_images": 54000, "settings": {"batch_size": 64, "epochs": 4}}) == 3376


def test_gap_closed_and_its_verdict():
    assert diag.gap_closed(0.1, 0.1, 0.9) == 0.0 and diag.gap_closed(0.1, 0.9, 0.9) == 1.0
    assert diag.gap_closed(0.2, 0.5, 0.8) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no gap"):
        diag.gap_closed(0.5, 0.6, 0.5)
    assert [diag.verdict(c) for c in (0.0, 0.3, 0.5, 0.7, 1.0)] == [
        "does not hold", "does not hold", "holds in part", "holds", "holds"]  # fmt: skip


def test_runs_are_found_per_backbone_and_the_older_ones_are_the_pages():
    old, new = _fake_run("default", 0.004, 0.88), {**_fake_run("default", 0.5, 0.88), "backbone": "all"}
    assert diag.find([old, new], "dualprompt", "default") == [old]
    assert diag.find([old, new], "dualprompt", "default", backbone="all") == [new]
    with pytest.raises(SystemExit, match="unknown backbone"):
        diag.weights("imagenet")


def test_the_backbone_finding_reads_both_backbones_and_is_empty_without_them(monkeypatch):
    import pretrained_signal as signal

    def final(run, average):
        return {**run, "average_accuracy": {"class_il": average}}

    runs = [final(_fake_run("default", 0.1, 0.88), 0.3), final(_fake_run("unmasked", 0.9, 0.3), 0.28)]
    assert diag.backbone_finding(runs) == ""  # the every-class backbone not run
    runs += [
        {**final(_fake_run("default", 0.7, 0.88, last_into_first=0.02), 0.66), "backbone": "all"},
        {**final(_fake_run("unmasked", 0.9, 0.3), 0.44), "backbone": "all"},
    ]
    text = diag.backbone_finding(runs)
    # masked 10% -> 70%, of the way to 90%: 75% of the gap closed
    for part in ("tasks 2-4 70.0% right after training instead of 10.0%", "unmasked there: 90.0%",
                 "75.0% of the gap closed", "such a backbone holds)", "2.0% of the last task's images into the "
                 "first task's classes instead of 90.0%", "at 66.0% final average Class-IL against 44.0% unmasked",
                 "(30.0% and 28.0% on the page's"):  # fmt: skip
        assert part in text
    monkeypatch.setattr(diag, "load", lambda path=diag.OUTPUT_JSON: runs)
    assert text in signal.diagnosis_note().replace("\n", " ")  # the page's paragraph carries the sentence


@pytest.mark.parametrize("method", diag.CONTROLS)
def test_the_controls_commands_start_from_the_chosen_backbone(method):
    import pretrained_signal as signal

    parser = build_parser()
    args = parser.parse_args(shlex.split(diag.command(method, "default", 0, "all"))[3:])
    assert os.path.join(ROOT, args.pretrained) == signal.WEIGHTS_ALL
    assert (method, "default") in diag.parse_variants([f"{method}:default"]) and method not in diag.METHODS
    if method == "sequential":  # plain fine-tuning: the training type, no method
        assert args.training_type == "sequential"
    else:
        assert (args.training_type, args.synapse_type) == ("continual", method)


def test_fitting_head_finds_a_classifier_the_continual_model_would_load():
    state = {"head.weight": torch.zeros(4, 8), "head.bias": torch.zeros(4), "blocks.0.w": torch.zeros(10)}
    assert diag.fitting_head(state, 10) == []  # the page's backbone: a 4-way head, left out by its shape
    state.update({"head.weight": torch.zeros(10, 8), "head.bias": torch.zeros(10)})
    assert diag.fitting_head(state, 10) == ["head.weight", "head.bias"]


def test_the_controls_note_reads_both_backbones_and_is_empty_without_them():
    runs = []
    for method in ("dualprompt", *diag.CONTROLS):
        for backbone, average in (("first", 0.3), ("all", 0.6)):
            average += 0.1 if method == "simplecil" else 0
            runs.append({"method": method, "variant": "default", "seed": 0, "backbone": backbone,
                         "average_accuracy": {"class_il": average}})  # fmt: skip
    text = diag.controls_note(runs)
    assert "DualPrompt (masked) 30.0% -> 60.0%" in text and "SimpleCIL 40.0% -> 70.0%" in text
    assert diag.controls_note(runs[:-1]) == ""


def test_where_errors_go_reads_each_later_task_right_after_its_training():
    def run(backbone, shares):
        points = [{"confusion": [[1.0, 0.0, 0.0]]}] + [
            {"confusion": [[1.0, 0.0, 0.0]] * t + [[share, 1 - share, 0.0]]} for t, share in enumerate(shares, 1)
        ]
        return {"method": "dualprompt", "variant": "default", "seed": 0, "backbone": backbone, "points": points}

    runs = [run("first", [0.7, 0.9]), run("all", [0.25, 0.125])]
    assert "send 25.0 / 12.5% of their images" in diag.where_errors_go(runs)
    assert "70.0 / 90.0% on the page's backbone" in diag.where_errors_go(runs)
    assert diag.where_errors_go(runs[:1]) == ""


def test_l2ps_first_task_bullet_reads_each_head_and_is_empty_without_them():
    def run(method, variant, first, second, seed=0):
        return {"method": method, "variant": variant, "seed": seed,
                "accuracy_matrix": {"class_il": [[first, 0.0], [first, second]]}}  # fmt: skip

    runs = [run("l2p", "default", 0.7, 0.01), run("l2p", "default", 0.72, 0.02, seed=1),
            run("l2p", "token_head", 0.83, 0.05), run("dualprompt", "default", 0.9, 0.3)]  # fmt: skip
    text = diag.l2p_first_task(runs)[0]
    assert "first task 71.0 ± 1.4% (seeds 0, 1) against DualPrompt's 90.0% (seed 0)" in text
    assert "`head_type=token`) it scores 83.0% (seed 0):" in text and "(5.0% with [CLS])" in text
    assert "Adam" not in text  # no authors' row: not mentioned
    assert "under its authors' Adam it is 88.0% (seed 0)" in diag.l2p_first_task(
        [*runs, run("l2p", "authors", 0.88, 0.1)]
    )[0]
    assert diag.l2p_first_task(runs[:2] + runs[3:]) == []
