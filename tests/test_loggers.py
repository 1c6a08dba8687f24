"""The experiment program's loggers: each backend writes what it is given, read back with its own reader."""

import builtins
import os

import pytest

from synapse.experiments.loggers import LoggerUnavailable, create_loggers


def test_tensorboard_events_hold_the_tags_and_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = create_loggers(["tensorboard"], str(tmp_path), {"lr": 0.1})
    loggers.scalars({"step/loss": 2.5, "step/lr": 0.1}, step=10)
    loggers.scalars({"step/loss": 1.5, "step/lr": 0.1}, step=20)
    loggers.histogram("memory/classes", [3, 0, 5], step=1)
    loggers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"step/loss", "step/lr"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [(10, 2.5), (20, 1.5)]
    assert "memory/classes" in events.Tags()["histograms"]
    histogram = events.Histograms("memory/classes")[0].histogram_value
    assert histogram.num == 8 and histogram.min == 0 and histogram.max == 2


def test_csv_writes_the_step_scalars(tmp_path):
    loggers = create_loggers(["csv"], str(tmp_path), {})
    loggers.scalars({"step/loss": 2.0, "step/lr": 0.1}, step=5)
    loggers.scalars({"task/class_il": 0.5}, step=1)  # not a step scalar: epoch_log.csv has those
    loggers.close()
    assert (tmp_path / "steps.csv").read_text().splitlines() == ["step,loss,lr", "5,2.0,0.1"]


def test_wandb_offline_writes_its_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = create_loggers(["wandb"], str(tmp_path), {"lr": 0.1})
    loggers.scalars({"step/loss": 2.0}, step=1)
    loggers.close()
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run")]
    assert len(runs) == 1 and os.listdir(tmp_path / "wandb" / runs[0])


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(LoggerUnavailable, match=r"pip install -e '\.\[cli\]'"):
        create_loggers(["tensorboard"], str(tmp_path), {})


def test_bad_backends_are_rejected_before_any_is_made(tmp_path):
    with pytest.raises(ValueError, match="unknown log backend"):
        create_loggers(["csv", "mlflow"], str(tmp_path), {})
    with pytest.raises(ValueError, match="--output_dir"):
        create_loggers(["csv"], None, {})
    assert not os.listdir(tmp_path)


def test_a_cli_run_logs_steps_tasks_memory_and_the_figure(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from synapse.experiments.cli import main

    out = tmp_path / "run"
    args = ["--dataset", "fashion-mnist", "--max_train_per_task", "100", "--max_test_per_task", "50", "--quiet"]
    args += ["--synapse_type", "er", "--buffer_size", "50", "--output_dir", str(out)]
    assert main([*args, "--log", "csv", "tensorboard", "--log_interval", "5"]) == 0
    rows = (out / "steps.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and len(rows) == 1 + 5 * 10 // 5  # 10 steps a task, every 5th logged
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"step/loss", "step/lr", "epoch/train_accuracy", "task/class_il/average", "task/task_il/forgetting"} <= set(
        tags["scalars"]
    )
    assert "memory/classes" in tags["histograms"] and "accuracy_matrix" in tags["images"]
    assert [e.step for e in events.Scalars("task/class_il/average")] == [1, 2, 3, 4, 5]
    with open(out / "results.json") as f:
        import json

        final = json.load(f)["average_accuracy"]["class_il"]
    assert events.Scalars("task/class_il/average")[-1].value == pytest.approx(final, abs=1e-6)


def test_log_needs_an_output_dir(capsys):
    from synapse.experiments.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--log", "csv", "--quiet"])
    assert e.value.code == 2 and "--log needs --output_dir" in capsys.readouterr().err
