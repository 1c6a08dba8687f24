"""End-to-end runs of the experiment program on a Split Fashion-MNIST subset."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from synapse import catalog, testing
from synapse.experiments.cli import SMALL_MODEL_THREADS, default_threads, main
from synapse.experiments.run import Config, Experiment

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


@pytest.mark.parametrize("synapse_type", catalog.names())
def test_continual(tmp_path, synapse_type):
    spec = catalog.get(synapse_type)
    small = [f"{k}={v}" for k, v in spec.harness_hparams.items()]  # RanPAC's projection: 64 wide on the CPU
    args = ["--training_type", "continual", "--synapse_type", synapse_type, "--buffer_size", "100"]
    # --method_args must not swallow the model flags: they come first (L2P's prompts need the tiny ViT).
    r = run_cli(tmp_path, *testing.cli_model_args(spec), *args, *(["--method_args", *small] if small else []))
    check_results(r, 5)
    assert r["config"]["synapse_type"] == synapse_type
    # results.json records every hyperparameter the method ran with, defaults included.
    assert r["config"]["method_args"] == spec.resolve(spec.harness_hparams)


def test_method_hyperparameters_by_flag_and_by_name(tmp_path):
    r = run_cli(tmp_path, "--synapse_type", "der++", "--alpha", "0.2", "--method_args", "beta=0.7")
    assert r["config"]["method_args"] == {**catalog.get("der++").defaults(), "alpha": 0.2, "beta": 0.7}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--synapse_type", "si", "--beta", "0.5"], "--beta is not a hyperparameter of si"),
        (["--synapse_type", "der++", "--alpha", "-1"], "alpha must be finite and >= 0"),
        (["--synapse_type", "ewc", "--method_args", "lambda=3"], "ewc has no hyperparameter lambda"),
        (["--synapse_type", "er", "--method_args", "alpha"], "KEY=VALUE"),
        (["--synapse_type", "er-ace", "--mask", "all"], "mask must be one of"),
        (["--training_type", "joint", "--alpha", "0.1"], "need --training_type continual"),
    ],
)
def test_bad_method_hyperparameters_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_validation_split_is_reported(tmp_path):
    r = run_cli(tmp_path, "--training_type", "sequential", "--validation_ratio", "0.2")
    assert all(0 <= row["validation_accuracy"] <= 1 for row in r["epoch_log"])


def test_protocol_defaults_and_config_printed(tmp_path, capsys):
    assert main(["--max_train_per_task", "50", "--max_test_per_task", "50", "--output_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert '"model": "mlp"' in printed and '"batch_size": 10' in printed and "summary" in printed
    assert '"optimizer": "sgd"' in printed and '"lr_schedule": "constant"' in printed
    assert "optimizer: sgd (no momentum, weight decay 0.0) at lr 0.03, schedule constant" in printed


def test_clip_grad_norm_reaches_the_run(tmp_path):
    r = run_cli(tmp_path, "--training_type", "sequential", "--clip_grad_norm", "0.5")
    assert r["config"]["clip_grad_norm"] == 0.5
    assert run_cli(tmp_path / "unclipped", "--training_type", "sequential")["config"]["clip_grad_norm"] is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-0.1"], "--lr"),
        (["--validation_ratio", "1"], "--validation_ratio"),
        (["--model", "nonsense"], "unknown model"),
        (["--dataset", "imagenet"], "--dataset"),
        (["--batch_size", "0"], "--batch_size"),
        (["--resume"], "--resume needs --output_dir"),
        (["--optimizer", "rmsprop"], "--optimizer"),
        (["--lr_schedule", "step"], "--lr_schedule"),
        (["--clip_grad_norm", "0"], "--clip_grad_norm"),
        (["--clip_grad_norm", "-1"], "--clip_grad_norm"),
        (["--clip_grad_norm", "nan"], "--clip_grad_norm"),
        (["--clip_grad_norm", "inf"], "--clip_grad_norm"),
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
        "--method_args",
        "--normalize",
        "--init",
        "--weight_decay",
        "--optimizer",
        "--lr_schedule",
        "--clip_grad_norm",
        "--seed",
        "--device",
        "--num_workers",
        "--output_dir",
        "--resume",
        "--checkpoint_every",
        *(f"--{h.name}" for spec in catalog.specs() for h in spec.hparams),
    ):
        assert flag in proc.stdout
    for spec in catalog.specs():  # one group per method, with its paper
        assert f"{spec.name}: {spec.summary}" in proc.stdout


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
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # both generations unreadable: nothing to fall back to
        with open(os.path.join(out, name), "wb") as f:
            f.write(b"not a checkpoint")
    with pytest.warns(UserWarning, match="corrupt"):
        assert main([*args, "--resume"]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the cli extra
# Runs cli.py as a user would, with the extra's modules made unimportable: None in sys.modules is what
# Python itself uses to block an import.
WITHOUT_EXTRAS = (
    "import runpy, sys; sys.modules.update(dict.fromkeys(sys.argv[1].split(','))); "
    "sys.argv = sys.argv[2:]; runpy.run_path('cli.py', run_name='__main__')"
)


def run_without(modules, *args):
    cmd = [sys.executable, "-c", WITHOUT_EXTRAS, ",".join(modules), "cli.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_without_its_extra_is_one_clear_line_and_exit_2(tmp_path):
    proc = run_without(["tqdm", "matplotlib", "torchvision"], "--quiet", "--output_dir", str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "pip install -e '.[cli]'" in lines[0] and "torchvision, matplotlib, tqdm are not installed" in lines[0]
    assert not os.listdir(tmp_path)  # nothing ran


def test_cli_names_only_the_missing_modules(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tqdm is not installed" in err and "matplotlib" not in err.split("installed")[0]


def test_help_works_without_the_extra_and_names_it(capsys, monkeypatch):
    for name in ("tqdm", "matplotlib", "torchvision"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--threads" in out and "pip install -e '.[cli]'" in out


# ---------------------------------------------------------------------------- --threads
@pytest.fixture
def keep_threads():
    """--threads sets torch's thread count for the whole process: put it back for the other tests."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_threads_are_argparse_errors(value, capsys, keep_threads):
    before = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:
        main(["--threads", value])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err
    assert torch.get_num_threads() == before


def test_threads_are_applied_printed_and_put_back(tmp_path, capsys, keep_threads):
    torch.set_num_threads(2)
    args = ["--max_train_per_task", "50", "--max_test_per_task", "50", "--output_dir", str(tmp_path)]
    assert main([*args, "--threads", "1"]) == 0
    assert '"threads": 1' in capsys.readouterr().out  # the count in effect, printed with the configuration
    assert json.loads((tmp_path / "results.json").read_text())["config"]["threads"] == 1
    assert torch.get_num_threads() == 2  # main() leaves the process as it found it


def test_experiment_records_the_threads_in_effect(keep_threads):
    torch.set_num_threads(3)
    assert Experiment(Config(max_train_per_task=10, max_test_per_task=10)).cfg.threads == 3
    assert Experiment(Config(max_train_per_task=10, max_test_per_task=10, threads=1)).cfg.threads == 1
    assert torch.get_num_threads() == 1


def test_default_threads(monkeypatch, keep_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_threads("fashion-mnist", None) == min(cpus, SMALL_MODEL_THREADS)
    assert default_threads("fashion-mnist", "mlp") == min(cpus, SMALL_MODEL_THREADS)
    torch.set_num_threads(3)
    assert default_threads("cifar10", None) == 3  # a larger model keeps torch's default
    assert default_threads("fashion-mnist", "resnet18-reduced") == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torchrun's setting, or the user's, is kept
    assert default_threads("fashion-mnist", None) == 3


def test_experiment_rejects_bad_threads(keep_threads):
    before = torch.get_num_threads()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive int or None"):
            Experiment(Config(threads=bad))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"optimizer": "Adam"}, "optimizer must be one of"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm must be a finite number > 0"),
        ({"clip_grad_norm": float("inf")}, "clip_grad_norm must be a finite number > 0"),
    ],
)
def test_experiment_rejects_an_unknown_optimizer_or_schedule_before_any_work(changes, message, keep_threads):
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=message):
        Experiment(Config(threads=before + 1, **changes))
    assert torch.get_num_threads() == before  # refused before set_threads, the first change it makes


def test_model_args_reach_the_timm_constructor_and_bad_ones_are_refused(tmp_path):
    pytest.importorskip("timm")
    tiny = ["--model", "timm:vit_tiny_patch16_224", "--input_size", "16"]
    r = run_cli(tmp_path, *tiny, "--model_args", "patch_size=8", "depth=1", "embed_dim=16", "num_heads=2")
    assert r["config"]["model_args"] == {"patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "fashion-mnist", *tiny, "--model_args", "depth"])
    assert e.value.code == 2
    bad = ["--max_train_per_task", "8", "--output_dir", str(tmp_path / "bad")]
    assert main(["--dataset", "fashion-mnist", "--model", "mlp", *bad, "--model_args", "depth=2"]) == 2
    assert main(["--dataset", "fashion-mnist", *tiny, *bad, "--model_args", "no_such_argument=1"]) == 2


def test_unusable_pretrained_weights_end_the_program_with_one_clear_line(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    for name, says in (("none.pt", "no such file"), ("notes.pt", "cannot be read")):
        code = main(["--dataset", "fashion-mnist", "--model", "resnet18", "--pretrained", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("synapse: error: pretrained weights") and "Traceback" not in err
        assert says in err


def test_a_method_that_refuses_the_model_ends_the_program_with_one_line_naming_its_flags(capsys):
    pytest.importorskip("timm")
    code = main(["--dataset", "fashion-mnist", "--model", "timm:vit_tiny_patch16_224", "--model_args", "patch_size=7",
                 "depth=2", "embed_dim=32", "num_heads=2", "--synapse_type", "dualprompt", "--max_train_per_task", "8",
                 "--max_test_per_task", "4", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "synapse: error: dualprompt cannot be built on timm:vit_tiny_patch16_224 with " in err
    assert "e_prompt_layers='2,3,4'" in err and "the model's depth" in err and "--help` lists them" in err


def test_a_run_whose_loss_diverges_says_so_once(capsys):
    args = ["--dataset", "fashion-mnist", "--synapse_type", "er", "--buffer_size", "8", "--lr", "1e30",
            "--max_train_per_task", "20", "--max_test_per_task", "10", "--threads", "1"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"training diverged: the mean loss of task 1, epoch 1 is nan") as caught:
        assert main(args) == 0
    assert sum("training diverged" in str(w.message) for w in caught) == 1
    assert "training diverged in task 1, epoch 1" in capsys.readouterr().out


@pytest.mark.parametrize("bad, says", [
    (["--dataset", "cifar10", "--image_size", "64"], "apply to folder: datasets, not 'cifar10'"),
    (["--evaluate_on", "validation"], "evaluate_on='validation' needs validation_ratio > 0"),
])  # fmt: skip
def test_settings_that_do_not_fit_the_dataset_are_one_line_before_any_work(bad, says, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(bad)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err and says in err.splitlines()[-1]
