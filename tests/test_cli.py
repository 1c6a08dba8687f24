"""End-to-end runs of the experiment program on a Split Fashion-MNIST subset."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from synapse.experiments.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dataset", "fashion-mnist", "--max_train_per_task", "300", "--max_test_per_task", "200", "--quiet"]


def run_cli(tmp_path, *args):
    out = str(tmp_path)
    assert main([*SMALL, "--output_dir", out, *args]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def check_results(r, rows):
    for setting in ("class_il", "task_il"):
        matrix = r["accuracy_matrix"][setting]
        assert len(matrix) == rows and all(len(row) == 5 for row in matrix)
        assert all(0.0 <= a <= 1.0 for row in matrix for a in row)
    for key in ("average_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "fwt"):
        assert set(r[key]) == {"class_il", "task_il"}
    assert r["wall_time_s"] > 0 and r["config"]["dataset"] == "fashion-mnist"


@pytest.mark.parametrize("training_type", ["joint", "sequential"])
def test_baselines(tmp_path, training_type):
    r = run_cli(tmp_path, "--training_type", training_type)
    check_results(r, 1 if training_type == "joint" else 5)
    if training_type == "sequential":
        # fine-tuning forgets: only the last task survives in Class-IL
        assert r["forgetting"]["class_il"] > 0.5
    assert os.path.isfile(tmp_path / "accuracy_matrix.png")
    assert (tmp_path / "epoch_log.csv").read_text().startswith("task,epoch,train_loss")


@pytest.mark.parametrize("synapse_type", ["er", "der", "der++", "agem", "si"])
def test_continual(tmp_path, synapse_type):
    r = run_cli(tmp_path, "--training_type", "continual", "--synapse_type", synapse_type, "--buffer_size", "100")
    check_results(r, 5)
    assert r["config"]["synapse_type"] == synapse_type


def test_validation_split_is_reported(tmp_path):
    r = run_cli(tmp_path, "--training_type", "sequential", "--validation_ratio", "0.2")
    assert all(0 <= row["validation_accuracy"] <= 1 for row in r["epoch_log"])


def test_protocol_defaults_and_config_printed(tmp_path, capsys):
    assert main(["--max_train_per_task", "50", "--max_test_per_task", "50", "--output_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert '"model": "mlp"' in printed and '"batch_size": 10' in printed and "summary" in printed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-0.1"], "--lr"),
        (["--validation_ratio", "1"], "--validation_ratio"),
        (["--model", "nonsense"], "unknown model"),
        (["--dataset", "imagenet"], "--dataset"),
        (["--batch_size", "0"], "--batch_size"),
        (["--resume"], "--resume needs --output_dir"),
    ],
)
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_dataset_offline_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "cli.py", "--dataset", "cifar10", "--dataset_dir", str(tmp_path), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "CIFAR-10 is not in" in proc.stderr and "internet" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_explains_every_flag():
    proc = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in (
        "--dataset_dir",
        "--dataset",
        "--model",
        "--lr",
        "--training_type",
        "--synapse_type",
        "--num_epochs",
        "--batch_size",
        "--validation_ratio",
        "--buffer_size",
        "--buffer_sample_size",
        "--alpha",
        "--beta",
        "--xi",
        "--seed",
        "--device",
        "--num_workers",
        "--output_dir",
        "--resume",
    ):
        assert flag in proc.stdout


RESUME_ARGS = [
    "--dataset",
    "fashion-mnist",
    "--max_train_per_task",
    "600",
    "--max_test_per_task",
    "200",
    "--training_type",
    "continual",
    "--synapse_type",
    "der++",
    "--buffer_size",
    "100",
    "--seed",
    "3",
]


def cli(out_dir, *extra):
    """Run the CLI to completion in a subprocess with the resume-test arguments."""
    cmd = [sys.executable, "cli.py", *RESUME_ARGS, "--output_dir", out_dir, "--quiet", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)


def accuracy_matrices(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)["accuracy_matrix"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    cli(out)
    return accuracy_matrices(out)


def start(out_dir, **popen):
    cmd = [sys.executable, "-u", "cli.py", *RESUME_ARGS, "--output_dir", out_dir]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, **popen)


def wait_for(proc, marker):
    """Read the run's output until ``marker`` (no timers: the run says when it got there)."""
    for line in proc.stdout:
        if marker in line:
            return
    pytest.fail(f"the run ended without printing {marker!r}")


@pytest.mark.slow
def test_killed_and_resumed_equals_uninterrupted(tmp_path, uninterrupted):
    killed = str(tmp_path)
    proc = start(killed, stderr=subprocess.DEVNULL)
    try:
        wait_for(proc, "checkpoint saved: task 2")
        proc.kill()
    finally:
        proc.kill()
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, "results.json"))
    cli(killed, "--resume")
    assert accuracy_matrices(killed) == uninterrupted


@pytest.mark.slow
def test_sigterm_mid_task_stops_cleanly_and_resumes_exactly(tmp_path, uninterrupted):
    stopped = str(tmp_path)
    proc = start(stopped, stderr=subprocess.PIPE)
    wait_for(proc, "checkpoint saved: task 1")
    proc.send_signal(signal.SIGTERM)  # lands somewhere in task 2 (or at its end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err
    cli(stopped, "--resume")
    assert accuracy_matrices(stopped) == uninterrupted


def test_checkpoints_load_with_weights_only_and_mismatches_are_named(tmp_path, capsys):
    out = str(tmp_path)
    args = [*SMALL, "--output_dir", out, "--synapse_type", "der++", "--buffer_size", "50"]
    assert main(args) == 0
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert state["progress"]["stage"] == 5
    capsys.readouterr()
    assert main([*SMALL, "--output_dir", out, "--synapse_type", "er", "--buffer_size", "50", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "synapse_type: checkpoint has 'der++', this run has 'er'" in err
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    assert main([*args, "--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main([*SMALL, "--output_dir", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
