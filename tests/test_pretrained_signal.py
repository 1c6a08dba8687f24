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
