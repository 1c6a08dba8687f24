"""The experiment program's data paths: held on the device, or streamed from the host by DataLoader workers."""

from __future__ import annotations

import functools
import os
from typing import Any, List

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import keep_checkpoint_at
from synapse.experiments import streaming
from synapse.experiments.cli import main
from synapse.experiments.datasets import DATASETS, load_split
from synapse.experiments.run import Config, Experiment
from synapse.experiments.streaming import Streamed, choose, data_bytes


def write_tree(root: str, classes: int = 4, train: int = 10, test: int = 4) -> str:
    """train/ and test/ of noisy images whose brightness follows the class: learnable, and never all alike."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        for part, n in (("train", train), ("test", test)):
            folder = os.path.join(root, part, f"class{c}")
            os.makedirs(folder)
            for i in range(n):
                pixels = (torch.rand(10, 10, 3, generator=g) * 80 + 50 * c).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(str(tmp_path_factory.mktemp("images")))


def config(tree: str, **changes) -> Config:
    fields = dict(
        dataset=f"folder:{tree}",
        image_size=8,
        model="mlp",
        classes_per_task=2,
        num_epochs=1,
        batch_size=4,
        buffer_size=8,
        validation_ratio=0.2,
        threads=1,
        device="cpu",
        quiet=True,
    )
    return Config(**{**fields, **changes})


def _started(path: str, worker_id: int) -> None:  # a DataLoader worker's first act: say so in a file
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def count_workers(monkeypatch, path: str) -> List[Any]:
    """Every DataLoader the streaming path makes, its workers noting their start in ``path``."""
    made: List[Any] = []

    def loader(*args, **kwargs):
        made.append(DataLoader(*args, worker_init_fn=functools.partial(_started, path), **kwargs))
        return made[-1]

    monkeypatch.setattr(streaming, "DataLoader", loader)
    return made


def numbers(result):
    rows = result["epoch_log"]
    return result["accuracy_matrix"], [(r["train_loss"], r.get("validation_accuracy")) for r in rows]


@pytest.mark.parametrize("training_type", ["continual", "joint"])
def test_the_streamed_run_equals_the_in_memory_run_and_starts_its_workers_once(
    tree, training_type, monkeypatch, tmp_path
):
    """Same seed, same batches in the same order, same augmentation and replay: the same numbers, exactly,
    over several epochs; the training set's workers (also the validation sets') and the test sets' start once
    for the whole run, and end with it."""
    starts = str(tmp_path / "starts")
    made = count_workers(monkeypatch, starts)
    held = Experiment(config(tree, data="memory", training_type=training_type, num_epochs=3))
    streamed = Experiment(config(tree, data="stream", num_workers=2, training_type=training_type, num_epochs=3))
    assert isinstance(streamed.train_sets[0][0], Streamed) and isinstance(held.train_sets[0][0], torch.Tensor)
    a, b = held.run(), streamed.run()
    assert (a["config"]["data"], b["config"]["data"], b["config"]["num_workers"]) == ("memory", "stream", 2)
    assert numbers(a) == numbers(b)
    assert len(b["epoch_log"]) == (6 if training_type == "continual" else 3)
    assert all(row["validation_accuracy"] is not None for row in b["epoch_log"])
    # Two datasets (the train and test images), one loader and 2 workers each: 4 starts, not some per epoch.
    with open(starts) as f:
        pids = [int(pid) for pid in f.read().split()]
    assert len(pids) == 4 and len(made) == 2
    for pid in pids:  # the workers ended with the run (joined, so not even a zombie is left)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_streamed_run_resumes_exactly_from_a_mid_epoch_checkpoint(tree, tmp_path, monkeypatch):
    """A checkpoint written mid-epoch (task 1's second epoch, batch 2 of 4) resumes streamed, with new workers,
    to the uninterrupted streamed run's numbers, which are the in-memory run's."""
    full, snap = str(tmp_path / "full"), str(tmp_path / "snap")

    keep_checkpoint_at(monkeypatch, 6, full, snap)
    streamed = dict(data="stream", num_workers=1, num_epochs=2, checkpoint_every="3")
    uninterrupted = Experiment(config(tree, output_dir=full, **streamed)).run()
    state = torch.load(os.path.join(snap, "checkpoint.pt"), weights_only=True)["progress"]
    assert (state["stage"], state["epoch"], state["next_batch"]) == (0, 1, 2)
    resumed = Experiment(config(tree, output_dir=snap, resume=True, **streamed)).run()
    assert numbers(resumed) == numbers(uninterrupted)
    assert numbers(uninterrupted) == numbers(Experiment(config(tree, data="memory", num_epochs=2)).run())


def test_a_pass_draws_nothing_from_the_global_rng_and_a_new_pass_ends_the_old(tree):
    """The loader's seeds come from its own generator: a dropout layer or a foreign replay transform draws
    the same numbers from torch's global RNG on either path, and after a resume."""
    spec, tasks = load_split(f"folder:{tree}", "unused", image_size=8, classes_per_task=2)
    part = tasks[0].train_set
    whole = Streamed(part.dataset, part.indices.numpy(), part.targets, torch.device("cpu"), workers=1)
    order = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4])]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = [y for _, y in whole.batches(order)]
    again = [y for _, y in whole[:5].batches(order)]  # a set cut from it: the same workers, another pass
    assert torch.equal(torch.get_rng_state(), before)
    assert [y.tolist() for y in first] == [y.tolist() for y in again] == [part.targets[b].tolist() for b in order]
    abandoned = whole.batches(order)
    next(abandoned)
    assert len(list(whole.batches(order[:1]))) == 1  # a new pass, while the old one is unfinished
    with pytest.raises(RuntimeError, match="another pass over this data started"):
        next(abandoned)
    whole.close()
    assert len(list(whole.batches(order))) == 3  # closed: the next pass starts new workers
    whole.close()


def test_a_streamed_set_reads_the_images_held_in_memory(tree):
    spec, tasks = load_split(f"folder:{tree}", "unused", image_size=8, classes_per_task=2)
    part = tasks[1].train_set
    whole = Streamed(part.dataset, part.indices.numpy(), part.targets, torch.device("cpu"), workers=0)
    chosen = whole[torch.tensor([3, 0, 5])][1:]  # an index tensor, then a slice, as the limits and splits do
    [(x, y)] = list(chosen.batches([torch.tensor([1, 0])]))
    held = Experiment(config(tree, data="memory", validation_ratio=0.0)).train_sets[1][0]
    assert torch.equal(x, held[torch.tensor([5, 0])]) and torch.equal(y, part.targets[torch.tensor([5, 0])])
    assert x.dtype == torch.uint8 and len(chosen) == 2


def test_auto_streams_what_exceeds_the_budget_and_says_so(tree, capsys):
    spec, tasks = load_split(f"folder:{tree}", "unused", image_size=8, classes_per_task=2)
    size = data_bytes(spec, tasks, None, None)
    assert size == (40 + 16) * 3 * 8 * 8  # every train and test image, uint8
    assert data_bytes(spec, tasks, 3, 1) == 2 * (3 + 1) * 3 * 8 * 8  # 2 tasks, within the quick-run limits
    cpu = torch.device("cpu")
    assert not choose("auto", size / 1e9, spec, tasks, cpu).stream  # exactly the budget: held
    over = choose("auto", size / 2e9, spec, tasks, cpu)
    assert over.stream and "over the budget" in over.why and "--data_budget" in over.why
    assert choose("stream", None, spec, tasks, cpu).stream and not choose("memory", 0.0, spec, tasks, cpu).stream
    assert not choose("auto", None, spec, tasks, cpu).stream  # a quarter of the host's memory by default
    experiment = Experiment(config(tree, data_budget=0.0, quiet=False, num_workers=0, num_epochs=1))
    assert experiment.cfg.data == "stream"
    experiment.run()
    assert "data: streamed from the host by a DataLoader" in capsys.readouterr().out


def test_bad_data_settings_are_refused_before_any_work(tree, capsys):
    with pytest.raises(ValueError, match="data must be one of"):
        Experiment(config(tree, data="disk"))
    with pytest.raises(ValueError, match="data_budget must be"):
        Experiment(config(tree, data_budget=-1.0))
    with pytest.raises(ValueError, match="cannot stream"):
        perm = "perm-fashion-mnist"
        choose("stream", None, DATASETS[perm], load_split(perm, "unused")[1], torch.device("cpu"))
    with pytest.raises(SystemExit):
        main(["--dataset", f"folder:{tree}", "--data", "disk"])
    assert "invalid choice: 'disk'" in capsys.readouterr().err
