"""The experiment program's data paths: held on the device, or streamed from the host by DataLoader workers."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

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


@pytest.mark.parametrize("training_type", ["continual", "joint"])
def test_the_streamed_run_equals_the_in_memory_run(tree, training_type):
    """Same seed, same batches in the same order, same augmentation and replay: the same numbers, exactly."""
    held = Experiment(config(tree, data="memory", training_type=training_type))
    streamed = Experiment(config(tree, data="stream", num_workers=1, training_type=training_type))
    assert isinstance(streamed.train_sets[0][0], Streamed) and isinstance(held.train_sets[0][0], torch.Tensor)
    a, b = held.run(), streamed.run()
    assert (a["config"]["data"], b["config"]["data"], b["config"]["num_workers"]) == ("memory", "stream", 1)
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert [r["train_loss"] for r in a["epoch_log"]] == [r["train_loss"] for r in b["epoch_log"]]
    assert [r["validation_accuracy"] for r in a["epoch_log"]] == [r["validation_accuracy"] for r in b["epoch_log"]]


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
