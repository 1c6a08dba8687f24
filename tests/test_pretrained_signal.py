"""benchmarks/pretrained_signal.py: its rows come from the catalog, its commands are the experiment program's,
a row runs end to end through the program with --model_args and --pretrained, and the render's arithmetic."""

import dataclasses
import os
import shlex
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import pretrained_signal as signal  # noqa: E402
from synapse import catalog  # noqa: E402
from synapse.experiments.cli import _method_args, _model_args, build_parser  # noqa: E402

timm = pytest.importorskip("timm")


def test_rows_are_the_baselines_and_every_method_of_the_pretrained_family():
    family = {s.name for s in catalog.specs() if s.family == "pretrained"}
    rows = signal.rows()
    assert rows[:2] == [("sequential", None), ("er", signal.ER_BUFFER)] and rows[-1] == ("joint", None)
    assert {m for m, _ in rows[2:-1]} == family and family >= {"simplecil", "ranpac"}
    assert signal.rows(["simplecil"]) == [("simplecil", None)]
    with pytest.raises(SystemExit, match="unknown method"):
        signal.rows(["nope"])


def _parsed(line: str):
    words = shlex.split(line.replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "synapse.experiments"]
    parser = build_parser()
    return parser, parser.parse_args(words[3:])


def test_the_printed_commands_are_the_programs_own_settings():
    parser, args = _parsed(signal.command("er", 200, 1, signal.WEIGHTS))
    cfg = signal.config("er", 200, 1, signal.WEIGHTS)
    assert _model_args(parser, args.model_args) == cfg.model_args == signal.MODEL_ARGS
    for field in ("dataset", "model", "first_task_classes", "classes_per_task", "max_train_per_task", "seed"):
        assert getattr(args, field) == getattr(cfg, field), field
    assert (args.synapse_type, args.buffer_size, args.training_type) == ("er", 200, "continual")
    assert os.path.join(ROOT, args.pretrained) == cfg.pretrained
    assert _parsed(signal.command("joint", None, 0, signal.WEIGHTS))[1].training_type == "joint"
    values, _ = signal.ADAPTED["ranpac"]  # a method's adapted values are its own flags
    parser, args = _parsed(signal.command("ranpac", None, 0, signal.WEIGHTS))
    assert values == {"projection_dim": 2000} and _method_args(parser, args)["projection_dim"] == 2000
    assert signal.config("ranpac", None, 0, signal.WEIGHTS).method_args == values


def test_the_documented_protocol_commands_parse(tmp_path):
    from PIL import Image

    for name in ("n01", "n02"):  # a stand-in for the ImageNet-R tree, which the parser checks
        os.makedirs(tmp_path / name)
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    blocks = signal.PROTOCOL_COMMANDS.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in blocks.replace("\\\n", " ").splitlines() if line.startswith("python")]
    assert len(lines) == 2
    for line in lines:
        _, args = _parsed(line.replace("/data/imagenet-r", str(tmp_path)))
        assert args.input_size == 224 or args.image_size == 224
        assert args.model == "timm:vit_base_patch16_224" and args.pretrained


def test_a_row_runs_through_the_experiment_program_from_a_pretrained_file(tmp_path):
    from synapse.experiments.models import create_model
    from synapse.experiments.run import Experiment

    torch.manual_seed(0)
    source = create_model(signal.MODEL, 1, 28, signal.FIRST_TASK_CLASSES, (0.5,), (0.5,), model_args=signal.MODEL_ARGS)
    weights = tmp_path / "vit.pt"
    torch.save(source.backbone.state_dict(), weights)
    for method in ("simplecil", "sequential"):
        cfg = signal.config(method, None, 0, str(weights))
        small = dataclasses.replace(cfg, max_train_per_task=16, max_test_per_task=16, threads=None)
        experiment = Experiment(small)
        blocks = experiment.model.backbone.blocks
        assert len(blocks) == signal.MODEL_ARGS["depth"]
        assert torch.equal(blocks[0].attn.qkv.weight, source.backbone.blocks[0].attn.qkv.weight)  # loaded
        result = experiment.run()
        assert len(result["accuracy_matrix"]["class_il"]) == 4  # 4 + 3 x 2 classes
        assert result["test_samples_per_task"] == [16] * 4
        assert result["predictor"] == ("SimpleCIL.predict" if method == "simplecil" else "model")


def test_overall_accuracy_weighs_each_task_by_its_test_images():
    result = {"accuracy_matrix": {"class_il": [[0.0], [0.5, 1.0]]}, "test_samples_per_task": [4000, 2000]}
    assert signal.overall_accuracy(result) == pytest.approx((0.5 * 4000 + 1.0 * 2000) / 6000)
    del result["test_samples_per_task"]
    assert signal.overall_accuracy(result, [2000, 2000]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="pass counts"):
        signal.overall_accuracy(result)


def test_the_split_has_4000_then_2000_test_images():
    assert signal.test_counts() == [4000, 2000, 2000, 2000]


def test_the_lr_grid_covers_the_rows_that_train_and_picks_the_best_validation_score(monkeypatch):
    monkeypatch.setattr(signal, "LR_GRID", (signal.DEFAULT_LR, 0.03, 0.1))
    tunable = signal.tunable()
    assert tunable[:2] == [("sequential", None), ("er", signal.ER_BUFFER)]
    assert {m for m, _ in tunable} >= {"l2p", "slca"} and not {m for m, _ in tunable} & {"simplecil", "ranpac", "joint"}
    assert signal.LR_GRID[0] == signal.DEFAULT_LR
    assert signal.best_lr({0.01: 0.5, 0.03: 0.7, 0.1: 0.6}) == 0.03
    assert signal.best_lr({0.01: 0.7, 0.03: 0.7, 0.1: 0.6}) == signal.DEFAULT_LR  # a tie keeps the default


def _entry(method, buffer, seed, lr=None, validation=False, accuracy=0.5, authors=False):
    key = signal._key(method, buffer, seed, "sha", lr, validation, authors)
    matrix = [[0.9, 0.0], [0.5, 0.5]]
    result = {"average_accuracy": {"class_il": accuracy, "task_il": 0.9}, "forgetting": {"class_il": 0.4},
              "accuracy_matrix": {"class_il": matrix}, "test_samples_per_task": [10, 10]}  # fmt: skip
    return {**key, "result": result, "wall_time_s": 1.0}


def test_a_row_whose_best_lr_is_not_the_default_gets_a_second_row(monkeypatch):
    monkeypatch.setattr(signal, "LR_GRID", (signal.DEFAULT_LR, 0.03, 0.1))
    grid = [_entry("l2p", None, 0, lr, True, acc) for lr, acc in zip(signal.LR_GRID, (0.3, 0.6, 0.5))]
    grid += [_entry("sequential", None, 0, lr, True, acc) for lr, acc in zip(signal.LR_GRID, (0.4, 0.2, 0.1))]
    runs = [_entry("l2p", None, s, accuracy=0.3) for s in (0, 1)] + [_entry("l2p", None, s, 0.03, accuracy=0.6)
                                                                      for s in (0, 1)]  # fmt: skip
    runs += [_entry("sequential", None, s, accuracy=0.2) for s in (0, 1)]
    scores = signal.chosen_lrs(grid, "sha")
    assert scores[("l2p", None)] == dict(zip(signal.LR_GRID, (0.3, 0.6, 0.5))) and len(scores) == 2
    lines, used = signal.table(grid + runs, "sha")
    rows = lines[2:]  # sequential (its best lr is the default: one row), L2P, L2P at its chosen lr
    assert len(rows) == 3 and len(used) == 6  # the validation runs are never rows
    assert rows[1].startswith("| L2P | 30.00 ± 0.00 |") and "lr 0." not in rows[0]
    assert rows[2].startswith("| L2P, lr 0.03 (chosen on a validation split) | 60.00 ± 0.00 |")
    parser, args = _parsed(signal.command("l2p", None, 0, signal.WEIGHTS, 0.03))
    assert args.lr == signal.config("l2p", None, 0, signal.WEIGHTS, lr=0.03).lr == 0.03
    held_out = signal.config("l2p", None, 0, signal.WEIGHTS, validation=True)
    assert (held_out.validation_ratio, held_out.evaluate_on) == (signal.VALIDATION_RATIO, "validation")


def test_the_prompt_methods_third_rows_run_under_their_authors_optimizer():
    assert set(signal.AUTHORS_OPTIMIZER) == {"l2p", "dualprompt", "coda-prompt"}
    for method, (values, source) in signal.AUTHORS_OPTIMIZER.items():
        cfg = signal.config(method, None, 0, signal.WEIGHTS, authors=True)
        assert {k: getattr(cfg, k) for k in values} == values and source
        parser, args = _parsed(signal.command(method, None, 0, signal.WEIGHTS, authors=True))
        assert {k: getattr(args, k) for k in values} == values  # the printed flags are the run's settings
        assert (cfg.optimizer, cfg.num_epochs, cfg.batch_size) == ("adam", None, None)  # epochs, batch: the rows'
    assert signal.config("l2p", None, 0, signal.WEIGHTS).optimizer == "sgd"
    assert signal.AUTHORS_OPTIMIZER["l2p"][0]["lr"] == 0.03 * 32 / 256  # their batch/256 scaling at batch 32
    assert signal.AUTHORS_OPTIMIZER["coda-prompt"][0]["lr_schedule"] == "cosine"
    # L2P's and DualPrompt's authors clip the gradient norm at 1.0; CODA-Prompt's do not clip
    clips = {
        m: signal.config(m, None, 0, signal.WEIGHTS, authors=True).clip_grad_norm for m in signal.AUTHORS_OPTIMIZER
    }
    assert clips == {"l2p": 1.0, "dualprompt": 1.0, "coda-prompt": None}
    assert signal.config("l2p", None, 0, signal.WEIGHTS).clip_grad_norm is None


def test_a_third_row_reads_only_the_runs_under_the_authors_optimizer():
    runs = [_entry("coda-prompt", None, s, accuracy=0.3) for s in (0, 1)]
    runs += [_entry("coda-prompt", None, s, accuracy=0.4, authors=True) for s in (0, 1, 2)]
    lines, used = signal.table(runs, "sha")
    rows = lines[2:]
    assert len(rows) == 2 and len(used) == 5
    assert rows[0].startswith("| CODA-Prompt | 30.00 ± 0.00 |") and rows[0].endswith("| 2 | 1 |")
    assert rows[1].startswith("| CODA-Prompt, Adam, lr 0.001, cosine (its authors') | 40.00 ± 0.00 |")
    assert rows[1].endswith("| 3 | 1 |")


def test_the_every_class_backbone_has_its_own_file_and_the_same_recipe_but_its_epochs():
    first, every = signal.PRETRAIN_CLASSES["first"], signal.PRETRAIN_CLASSES["all"]
    assert first == (signal.WEIGHTS, signal.PRETRAIN) and every[0] != signal.WEIGHTS

    def same(settings):
        return {k: v for k, v in settings.items() if k not in ("epochs", "save_head")}

    assert same(every[1]) == same(first[1])
    assert every[1]["save_head"] is False and "save_head" not in first[1]  # the page's backbone as it was made
    state = {"blocks.0.w": 1, "head.weight": 2, "head.bias": 3, "norm.bias": 4}
    assert signal.without_head(state) == {"blocks.0.w": 1, "norm.bias": 4}
    assert signal.without_head(state, keep=True) == state
    with pytest.raises(SystemExit, match="choose from"):
        signal.pretrain("datasets", "some")
