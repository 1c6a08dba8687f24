"""Preemption: kills at any point of a run, then the same command with --resume, ends exactly as an uninterrupted run.

One seeded short run (5 tasks of 10 steps, a checkpoint every 7 steps) is killed at chosen points through the
fault-injection hook ``SYNAPSE_TEST_PAUSE`` (checkpoint.pause_for_tests): the run says on stderr that it has
reached the point and waits there, and the test sends the signal then, with no timers.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import keep_checkpoint_at
from synapse import catalog, testing
from synapse.experiments import checkpoint, run, schedule
from synapse.experiments.cli import main
from synapse.experiments.run import Config, Experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--dataset",
    "fashion-mnist",
    "--max_train_per_task",
    "100",
    "--max_test_per_task",
    "50",
    "--buffer_size",
    "30",
    "--seed",
    "2",
    "--checkpoint_every",
    "7",
    "--threads",
    "1",
    "--quiet",
]


def results(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def progress(path):
    return torch.load(path, weights_only=True)["progress"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run without a kill (in this process: one torch start-up fewer), and its output folder."""
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    assert main([*ARGS, "--output_dir", out, "--resume"]) == 0
    return out


def run_until(out_dir, where, sig):
    """Start the requeue command, wait until it pauses at ``where``, send ``sig``; the exit code and stderr."""
    cmd = [sys.executable, "-u", "cli.py", *ARGS, "--output_dir", out_dir, "--resume"]
    env = {**os.environ, "SYNAPSE_TEST_PAUSE": where}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if f"synapse test pause at {where}" in line:
                proc.send_signal(sig)
                break
        else:
            pytest.fail(f"the run ended without reaching {where}")
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, err


@pytest.mark.slow
def test_killed_anywhere_the_same_command_resumes_exactly(tmp_path, uninterrupted):
    out = str(tmp_path)
    latest, previous = os.path.join(out, "checkpoint.pt"), os.path.join(out, "checkpoint.prev.pt")
    # SIGTERM during start-up: a clear line and 128 + 15; nothing was trained, so nothing is written.
    code, err = run_until(out, "startup", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by signal 15 before training began: nothing to save" in err
    assert not glob.glob(os.path.join(out, "checkpoint*"))
    # SIGKILL during start-up (half a second in: Python is importing torch): nothing written either.
    proc = subprocess.Popen([sys.executable, "cli.py", *ARGS, "--output_dir", out, "--resume"], cwd=ROOT)
    time.sleep(0.5)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL and not glob.glob(os.path.join(out, "checkpoint*"))
    # SIGKILL inside task 2's epoch, two steps after the periodic checkpoint at step 14 (batch 4 of task 2).
    code, _ = run_until(out, "step:16", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert (progress(latest)["step"], progress(latest)["next_batch"], progress(previous)["step"]) == (14, 4, 10)
    # SIGKILL while a checkpoint is being written: the resumed run writes task 2's end (step 20), then is
    # killed inside its next write (step 21). The half-made file never replaced a good one.
    code, _ = run_until(out, "checkpoint:2", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert os.path.exists(latest + ".tmp")
    assert (progress(latest)["step"], progress(previous)["step"]) == (20, 14)
    # The same command once more, undisturbed: it finishes with the uninterrupted run's results.
    subprocess.run(
        [sys.executable, "cli.py", *ARGS, "--output_dir", out, "--resume"], cwd=ROOT, check=True, timeout=300
    )
    done, expected = results(out), results(uninterrupted)
    assert done["accuracy_matrix"] == expected["accuracy_matrix"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in expected["epoch_log"]]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in done["epoch_log"]] == strip
    # Two generations on disk, no stale temporary file.
    assert sorted(os.listdir(out)) == sorted(os.listdir(uninterrupted))


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(uninterrupted, out)
    os.remove(os.path.join(out, "results.json"))
    latest = os.path.join(out, "checkpoint.pt")
    assert progress(os.path.join(out, "checkpoint.prev.pt"))["step"] == 49  # mid task 5: one step to go
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 2)
    with pytest.warns(UserWarning, match="checkpoint.pt is corrupt.*falling back to the previous checkpoint"):
        assert main([*ARGS, "--output_dir", out, "--resume"]) == 0
    assert results(out)["accuracy_matrix"] == results(uninterrupted)["accuracy_matrix"]


def test_resume_without_a_checkpoint_starts_from_scratch_and_says_so(tmp_path, capsys):
    out = str(tmp_path / "new")
    args = [a for a in ARGS if a != "--quiet"] + ["--max_train_per_task", "20", "--output_dir", out, "--resume"]
    assert main(args) == 0
    assert f"no checkpoint in {out}: starting from scratch" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "results.json"))


@pytest.mark.parametrize(
    ("text", "every"),
    [
        ("500", checkpoint.Every(steps=500)),
        ("30s", checkpoint.Every(seconds=30.0)),
        ("10min", checkpoint.Every(seconds=600.0)),
        ("1.5h", checkpoint.Every(seconds=5400.0)),
        ("off", checkpoint.Every()),
        ("0", checkpoint.Every()),
    ],
)
def test_checkpoint_every_parses_steps_and_times(text, every):
    assert checkpoint.parse_every(text) == every


@pytest.mark.parametrize("text", ["-5", "10 parsecs", "0s", "", "min"])
def test_bad_checkpoint_every_is_an_argparse_error(text, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint_every", text])
    assert "checkpoint_every must be a number of steps" in capsys.readouterr().err


def test_periodic_policy():
    now = [0.0]
    by_time = checkpoint.Periodic(checkpoint.Every(seconds=10.0), clock=lambda: now[0])
    now[0] = 9.9
    assert not by_time.due_by_time() and not by_time.due_by_steps(500)
    now[0] = 10.0
    assert by_time.due_by_time()
    by_time.written()
    assert not by_time.due_by_time()
    by_steps = checkpoint.Periodic(checkpoint.Every(steps=5))
    assert [s for s in range(12) if by_steps.due_by_steps(s)] == [5, 10] and not by_steps.due_by_time()


# ---------------------------------------------------------------------------- every method
def _tiny(method, out, **changes):
    return Config(
        dataset="fashion-mnist",
        synapse_type=method,
        buffer_size=20,
        max_train_per_task=40,
        max_test_per_task=20,
        seed=1,
        batch_size=10,  # the MLP protocol's, also for the ViT (whose family default is 32): 4 steps a task
        checkpoint_every="3",
        output_dir=out,
        quiet=True,
        threads=1,
        **changes,
    )


@pytest.fixture(scope="module")
def fashion(fashion_tasks):
    """load_split's answer and read_tasks' images, read from disk once for all the methods' runs."""
    from synapse.experiments.datasets import load_split

    return load_split("fashion-mnist", "/nonexistent-dataset-dir"), fashion_tasks


def _copy_checkpoint_at(step, full, snap, monkeypatch, fashion):
    """Runs read ``fashion`` (no disk reads, no figure); the run writing under ``full`` copies its checkpoint
    of global step ``step`` into ``snap``, for a second run to resume from."""
    split, images = fashion
    monkeypatch.setattr(run, "load_split", lambda *_, **__: split)
    monkeypatch.setattr(run, "read_tasks", lambda _: images)
    monkeypatch.setattr(run.report, "plot_accuracy", lambda *_: None)  # the figure is not under test (1 s a run)
    keep_checkpoint_at(monkeypatch, step, full, snap)


def _same_run(resumed, expected):
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    losses = [[row["train_loss"], row["train_accuracy"]] for row in expected["epoch_log"]]
    assert [[row["train_loss"], row["train_accuracy"]] for row in resumed["epoch_log"]] == losses


@pytest.mark.parametrize("method", catalog.names())
def test_every_method_resumes_exactly_from_a_mid_task_checkpoint(tmp_path, method, monkeypatch, fashion):
    """The uninterrupted run keeps a copy of its checkpoint at step 6 (task 2, batch 2 of 4); a run resumed
    from that copy ends with the same accuracy matrices and the same per-epoch losses."""
    full, snap = str(tmp_path / "full"), str(tmp_path / "snap")
    _copy_checkpoint_at(6, full, snap, monkeypatch, fashion)
    # the harness's small settings (RanPAC's 10000-wide projection: 800 MB checkpoints), and a short GDumb
    # retraining (its default 128 epochs: 5 s here)
    args = {**catalog.get(method).harness_hparams, **({"retrain_epochs": 8} if method == "gdumb" else {})}
    model = testing.experiment_model(catalog.get(method))  # the prompt methods run on a tiny ViT
    expected = Experiment(_tiny(method, full, method_args=args, **model)).run()
    assert progress(os.path.join(snap, "checkpoint.pt"))["next_batch"] == 2
    resumed = Experiment(_tiny(method, snap, method_args=args, resume=True, **model)).run()
    _same_run(resumed, expected)


def test_adam_with_a_cosine_schedule_resumes_exactly_and_restarts_at_each_task(tmp_path, monkeypatch, fashion):
    """Adam and the cosine schedule, 2 epochs of 4 steps per task: the checkpoint at step 15 is in task 2's
    second epoch (batch 3), so the lr there depends on the epoch as well as the batch, and Adam's moments on
    the task's first 7 steps only (its state restarts at each task). A run resumed from it ends as the
    uninterrupted one (gradients clipped at 0.5 throughout); resuming it with another optimizer, schedule or
    clipping is refused, naming the setting."""
    full, snap = str(tmp_path / "full"), str(tmp_path / "snap")
    _copy_checkpoint_at(15, full, snap, monkeypatch, fashion)
    adam = {"optimizer": "adam", "lr_schedule": "cosine", "lr": 0.001, "num_epochs": 2, "clip_grad_norm": 0.5}
    expected = Experiment(_tiny("er", full, **adam)).run()
    state = torch.load(os.path.join(snap, "checkpoint.pt"), weights_only=True)
    assert (state["progress"]["stage"], state["progress"]["epoch"], state["progress"]["next_batch"]) == (1, 1, 3)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {7}  # task 2's steps, not 15
    lrs = {g["lr"] / g["initial_lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs == {schedule.lr_factor("cosine", 6, 8)}  # the step it took last: the 7th of the task's 8
    for named, other in {"optimizer": "sgd", "lr_schedule": "constant", "clip_grad_norm": None}.items():
        with pytest.raises(checkpoint.CheckpointError, match=f"{named}: checkpoint has"):
            Experiment(_tiny("er", snap, resume=True, **{**adam, named: other})).run()
    resumed = Experiment(_tiny("er", snap, resume=True, **adam)).run()
    _same_run(resumed, expected)
    sgd = Experiment(_tiny("er", str(tmp_path / "sgd"), lr=0.001, num_epochs=2)).run()
    assert sgd["accuracy_matrix"] != expected["accuracy_matrix"]  # the optimizer was Adam, not the default


def test_a_checkpoint_from_before_the_optimizer_setting_resumes_as_sgd_and_refuses_adam(tmp_path, monkeypatch, fashion):
    """A checkpoint written before ``optimizer``, ``lr_schedule`` and ``clip_grad_norm`` joined the identity
    (its identity and optimizer groups without them) was written by plain SGD at a constant lr, unclipped: it
    resumes so, exactly, and a resume with Adam or with clipping is refused, naming the setting."""
    full, snap = str(tmp_path / "full"), str(tmp_path / "snap")
    _copy_checkpoint_at(6, full, snap, monkeypatch, fashion)
    expected = Experiment(_tiny("er", full)).run()
    path = os.path.join(snap, "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    for key in ("optimizer", "lr_schedule", "clip_grad_norm"):
        del state["identity"][key]
    for group in state["optimizer"]["param_groups"]:
        del group["initial_lr"]
    torch.save(state, path)
    with pytest.raises(checkpoint.CheckpointError, match="optimizer: checkpoint has 'sgd', this run has 'adam'"):
        Experiment(_tiny("er", snap, resume=True, optimizer="adam")).run()
    with pytest.raises(checkpoint.CheckpointError, match="clip_grad_norm: checkpoint has None, this run has 1.0"):
        Experiment(_tiny("er", snap, resume=True, clip_grad_norm=1.0)).run()
    _same_run(Experiment(_tiny("er", snap, resume=True)).run(), expected)
