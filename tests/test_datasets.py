"""Your own images: folder: datasets in ImageFolder layout, class order and uneven task splits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from synapse.experiments.cli import main
from synapse.experiments.datasets import DATASETS, DatasetUnavailable, folder_spec, load_tasks

CLASSES = ("ant", "bee", "cat", "dog")


def shade(label: int) -> int:
    return 40 + 50 * label  # every image of a class has this grey level: its label can be read back


def write_images(folder: str, label: int, count: int, first: int = 0) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(count):  # sizes and modes vary: everything is read as RGB at the stated size
        mode, size = ("L", (10, 12)) if i % 2 else ("RGB", (20, 16))
        Image.new(mode, size, shade(label) if mode == "L" else (shade(label),) * 3).save(
            os.path.join(folder, f"{first + i}.png")
        )


@pytest.fixture
def split_tree(tmp_path):
    """train/ and test/, one folder per class; TinyImageNet's nested images/ folder in one class."""
    for label, name in enumerate(CLASSES):
        nested = "images" if name == "cat" else ""
        write_images(str(tmp_path / "train" / name / nested), label, 3)
        write_images(str(tmp_path / "test" / name), label, 2, first=100)
    return tmp_path


@pytest.fixture
def one_tree(tmp_path):
    for label, name in enumerate(CLASSES + ("eel",)):
        write_images(str(tmp_path / name), label, 5)
    return tmp_path


def labels_match_pixels(x: torch.Tensor, y: torch.Tensor, order=None) -> bool:
    """Each image's grey level is its class's (``order[label]``: the folder's class after a reordering)."""
    original = y if order is None else torch.tensor(order)[y]
    return bool((x.float().mean((1, 2, 3)).round() == torch.tensor([shade(int(c)) for c in original])).all())


def test_a_train_test_tree_loads_resized_with_classes_in_sorted_order(split_tree):
    spec, tensors, _ = load_tasks(f"folder:{split_tree}", "unused", image_size=16)
    assert (spec.num_classes, spec.in_channels, spec.image_size, spec.augment) == (4, 3, 16, True)
    assert spec.num_tasks == 4 and spec.task_classes()[2] == (2,)  # 4 classes: one per task
    train_x = torch.cat([t[0] for t in tensors])
    assert train_x.shape == (12, 3, 16, 16) and train_x.dtype == torch.uint8
    assert sum(len(t[3]) for t in tensors) == 8
    for train_x, train_y, test_x, test_y in tensors:
        assert labels_match_pixels(train_x, train_y) and labels_match_pixels(test_x, test_y)


def test_one_tree_holds_out_a_fixed_fraction_of_every_class(one_tree):
    spec, tensors, _ = load_tasks(f"folder:{one_tree}", "unused", image_size=8, test_fraction=0.4)
    assert spec.num_tasks == 5 and spec.classes_per_task == 1
    assert [len(t[1]) for t in tensors] == [3] * 5 and [len(t[3]) for t in tensors] == [2] * 5
    _, again, _ = load_tasks(f"folder:{one_tree}", "unused", image_size=8, test_fraction=0.4)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(tensors, again))  # the same held-out items every run


def test_class_order_and_an_uneven_first_task(split_tree):
    spec, tensors, _ = load_tasks(
        f"folder:{split_tree}", "unused", image_size=8, classes_per_task=1, first_task_classes=2, class_order_seed=3
    )
    assert spec.num_tasks == 3 and spec.task_classes() == {0: (0, 1), 1: (2,), 2: (3,)}
    order = spec.class_order
    assert sorted(order) == [0, 1, 2, 3] and list(order) != [0, 1, 2, 3]
    assert [len(t[1]) for t in tensors] == [6, 3, 3]
    for train_x, train_y, _, _ in tensors:
        assert labels_match_pixels(train_x, train_y, order)  # class i holds the folder's class order[i]
    cifar100 = DATASETS["cifar100"].with_split(10, 50)
    assert cifar100.num_tasks == 6 and cifar100.task_classes()[1] == tuple(range(50, 60))
    with pytest.raises(ValueError, match="multiple of classes_per_task"):
        DATASETS["cifar100"].with_split(10, 45)
    with pytest.raises(ValueError, match="not split by class"):
        DATASETS["perm-mnist"].with_split(classes_per_task=2)


def test_bad_folders_are_refused_before_any_work(tmp_path):
    with pytest.raises(DatasetUnavailable, match="not a directory"):
        folder_spec(str(tmp_path / "missing"))
    write_images(str(tmp_path / "only"), 0, 2)
    with pytest.raises(DatasetUnavailable, match="1 class folder"):
        folder_spec(str(tmp_path))
    with pytest.raises(ValueError, match="apply to folder: datasets"):
        load_tasks("fashion-mnist", "unused", image_size=32)
    with pytest.raises(SystemExit):
        main(["--dataset", f"folder:{tmp_path / 'missing'}"])


def test_the_experiment_program_runs_on_an_image_folder(split_tree, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", f"folder:{split_tree}", "--image_size", "8", "--model", "mlp", "--classes_per_task", "2"]
    assert main([*args, "--buffer_size", "8", "--threads", "1", "--quiet", "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["scenario"]["num_tasks"] == 2 and len(results["accuracy_matrix"]["class_il"]) == 2
    assert results["config"]["augment"] is True and results["config"]["replay_augment"] is True
    assert results["test_samples_per_task"] == [4, 4]


def test_tiny_imagenet_layout_reads_as_it_is(tmp_path):
    """train/<wnid>/images/, val/images/ labelled by val_annotations.txt, and an unlabelled test/images/."""
    wnids = ("n01", "n02", "n03")
    lines = []
    for label, wnid in enumerate(wnids):
        write_images(str(tmp_path / "train" / wnid / "images"), label, 3)
        write_images(str(tmp_path / "val" / "images"), label, 2, first=10 * label)
        lines += [f"{10 * label + i}.png\t{wnid}\t0\t0\t8\t8\n" for i in range(2)]
    (tmp_path / "val" / "val_annotations.txt").write_text("".join(lines))
    write_images(str(tmp_path / "test" / "images"), 0, 2)  # TinyImageNet's test set has no labels
    spec, tensors, _ = load_tasks(f"folder:{tmp_path}", "unused", image_size=8)
    assert spec.num_classes == 3
    assert [len(t[1]) for t in tensors] == [3, 3, 3] and [len(t[3]) for t in tensors] == [2, 2, 2]
    for train_x, train_y, test_x, test_y in tensors:
        assert labels_match_pixels(train_x, train_y) and labels_match_pixels(test_x, test_y)


def test_imagenet_r_layout_is_one_tree_with_a_held_out_fraction(tmp_path):
    """ImageNet-R: one folder per WordNet id, JPEGs named by rendition; 20 % of every class held out."""
    for label, wnid in enumerate(("n01443537", "n01484850", "n01494475")):
        folder = tmp_path / wnid
        folder.mkdir()
        for i, kind in enumerate(("art", "cartoon", "sketch", "toy", "painting")):
            Image.new("RGB", (24, 18), (shade(label),) * 3).save(folder / f"{kind}_{i}.jpg", quality=100)
    spec, tensors, _ = load_tasks(f"folder:{tmp_path}", "unused", image_size=8)
    assert spec.num_classes == 3 and [(len(t[1]), len(t[3])) for t in tensors] == [(4, 1)] * 3
    for train_x, train_y, test_x, test_y in tensors:
        assert labels_match_pixels(train_x, train_y) and labels_match_pixels(test_x, test_y)


def test_the_download_code_keeps_its_offline_error(tmp_path, monkeypatch):
    """Nothing can be downloaded here: torchvision's downloader fails, and the error says how to get the data."""
    import urllib.error

    import torchvision

    class Offline:
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DatasetUnavailable, match="could not be downloaded .*URLError.*internet access"):
        DATASETS["cifar10"].load(str(tmp_path))
