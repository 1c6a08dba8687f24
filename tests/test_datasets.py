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
    listing = tmp_path / "val" / "val_annotations.txt"
    for bad, says in (("99.png\tn01\t0\t0\t8\t8\n", r"line 7: no file .*99.png"),
                      ("0.png\tn09\t0\t0\t8\t8\n", r"line 7: '0.png\\tn09.*' names no class of train/")):  # fmt: skip
        listing.write_text("".join(lines) + bad)
        with pytest.raises(DatasetUnavailable, match=says):
            load_tasks(f"folder:{tmp_path}", "unused", image_size=8)


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


WNIDS = ("n01443537", "n01484850", "n01494475")
KINDS = ("art", "cartoon", "sketch", "toy", "painting")


@pytest.fixture
def imagenet_r(tmp_path):
    """ImageNet-R's layout (one folder per WordNet id, JPEGs named by rendition) in tree/, and a generated
    split: each class's sketch and toy images are its test set; painting is in neither list."""
    tree = tmp_path / "imagenet-r"
    for label, wnid in enumerate(WNIDS):
        (tree / wnid).mkdir(parents=True)
        for i, kind in enumerate(KINDS):
            Image.new("RGB", (24, 18), (shade(label),) * 3).save(tree / wnid / f"{kind}_{i}.jpg", quality=100)
    parts = {
        part: [f"{wnid}/{kind}_{i}.jpg" for wnid in WNIDS for i, kind in enumerate(KINDS) if kind in chosen]
        for part, chosen in (("train", ("art", "cartoon")), ("test", ("sketch", "toy")))
    }
    return tree, parts


def write_lists(folder, parts, form: str = "txt", prefix: str = "") -> None:
    """The split in a format :mod:`synapse.experiments.split_lists` reads: plain lists, or CODA-Prompt's YAML
    (its targets are numbers the loader must not read: here every one is 7)."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, paths in parts.items():
        if form == "txt":
            # as a Windows editor may save it: a byte-order mark, CRLF line ends
            text = "\ufeff# generated\r\n" + "".join(f"{prefix}{p}\r\n" for p in paths) + "\r\n"
            (folder / f"{part}.txt").write_bytes(text.encode("utf-8"))
        else:
            lines = ["data:"] + [f"- {prefix}{p}" for p in paths] + ["targets:"] + ["- 7"] * len(paths)
            (folder / f"imagenet-r_{part}.yaml").write_text("\n".join(lines) + "\n")


def files_of(split_dataset, part: str, tree) -> list:
    """Every task's files of ``part`` (``train_set``/``test_set``), relative to ``tree``."""
    return sorted(
        os.path.relpath(getattr(task, part).dataset.files[i], tree)
        for task in split_dataset.values()
        for i in getattr(task, part).indices.tolist()
    )


@pytest.mark.parametrize("form,prefix", [("txt", ""), ("yaml", "data/imagenet-r/")])
def test_imagenet_r_reads_the_split_lists_beside_its_tree(imagenet_r, form, prefix):
    """Plain lists of relative paths, or CODA-Prompt's YAML (paths under its data/imagenet-r/, targets not
    read): the test set is exactly the listed images, labelled by their folders, and the run says so."""
    tree, parts = imagenet_r
    write_lists(tree, parts, form, prefix)
    spec, tensors, split = load_tasks(f"folder:{tree}", "unused", image_size=8)
    assert spec.num_classes == 3 and [(len(t[1]), len(t[3])) for t in tensors] == [(2, 2)] * 3
    assert files_of(split, "train_set", tree) == sorted(parts["train"])
    assert files_of(split, "test_set", tree) == sorted(parts["test"])
    for train_x, train_y, test_x, test_y in tensors:
        assert labels_match_pixels(train_x, train_y) and labels_match_pixels(test_x, test_y)
    name = "test.txt" if form == "txt" else "imagenet-r_test.yaml"
    assert spec.test_split.startswith("the split lists") and f"{name} (6 images)" in spec.test_split


def test_without_lists_the_seeded_hold_out_is_used_and_said(imagenet_r):
    tree, _ = imagenet_r
    spec, tensors, _ = load_tasks(f"folder:{tree}", "unused", image_size=8)
    assert [(len(t[1]), len(t[3])) for t in tensors] == [(4, 1)] * 3
    assert spec.test_split.startswith("0.2 of every class held out")


def test_split_dir_names_lists_kept_elsewhere_and_the_run_uses_them(imagenet_r, tmp_path, capsys):
    tree, parts = imagenet_r
    write_lists(tmp_path / "splits", parts, "yaml", "data/imagenet-r/")
    out = tmp_path / "run"
    args = ["--dataset", f"folder:{tree}", "--split_dir", str(tmp_path / "splits"), "--image_size", "8"]
    args += ["--model", "mlp", "--classes_per_task", "1", "--threads", "1", "--output_dir", str(out)]
    assert main([*args, "--buffer_size", "4", "--max_train_per_task", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test_samples_per_task"] == [2, 2, 2] and results["config"]["split_dir"] == str(tmp_path / "splits")
    assert (
        f"test set: the split lists {tmp_path / 'splits' / 'imagenet-r_train.yaml'} (6 images)"
        in capsys.readouterr().out
    )


def test_split_dir_wins_over_broken_lists_beside_the_tree(imagenet_r, tmp_path, capsys):
    """Lists beside the tree are not read when --split_dir names others: the CLI's early layout check and
    the registry's spec read no lists."""
    tree, parts = imagenet_r
    (tree / "train.txt").write_text("n09999999/nowhere.jpg\n")  # half a pair, and a bad path
    with pytest.raises(DatasetUnavailable, match="holds the split list train.txt but not test.txt"):
        folder_spec(str(tree))
    assert DATASETS[f"folder:{tree}"].num_classes == 3  # the layout only
    write_lists(tmp_path / "splits", parts)
    out = tmp_path / "run"
    args = ["--dataset", f"folder:{tree}", "--split_dir", str(tmp_path / "splits"), "--image_size", "8"]
    args += ["--model", "mlp", "--classes_per_task", "1", "--threads", "1", "--output_dir", str(out)]
    assert main([*args, "--buffer_size", "4", "--max_train_per_task", "2"]) == 0
    assert json.loads((out / "results.json").read_text())["test_samples_per_task"] == [2, 2, 2]


def test_bad_split_lists_are_refused_with_what_is_wrong(imagenet_r, tmp_path):
    tree, parts = imagenet_r
    bad = {
        "unknown": {**parts, "test": parts["test"] + ["n09999999/art_0.jpg"]},
        "missing": {**parts, "test": parts["test"] + [f"{WNIDS[0]}/art_9.jpg"]},
        "twice": {**parts, "test": parts["test"] + parts["test"][:1]},
        "shared": {**parts, "test": parts["test"] + parts["train"][:1]},
    }
    messages = {
        "unknown": r"1 paths through no class folder of the tree \(e.g. 'n09999999/art_0.jpg'\)",
        "missing": rf"1 paths to files that are not there \(e.g. '{WNIDS[0]}/art_9.jpg'\)",
        "twice": "1 paths listed twice",
        "shared": r"share 1 images",
    }
    for case, lists in bad.items():
        write_lists(tmp_path / case, lists)
        with pytest.raises(DatasetUnavailable, match=messages[case]):
            folder_spec(str(tree), split_dir=str(tmp_path / case))
    (tree / "train.txt").write_text(parts["train"][0] + "\n")  # a pair's one half, beside the tree
    with pytest.raises(DatasetUnavailable, match="holds the split list train.txt but not test.txt"):
        folder_spec(str(tree))
    with pytest.raises(DatasetUnavailable, match="holds no split lists"):
        folder_spec(str(tree), split_dir=str(tmp_path))
    write_lists(tree, parts)
    with pytest.raises(DatasetUnavailable, match="test_fraction does not apply"):
        folder_spec(str(tree), test_fraction=0.3)
    assert sorted(os.listdir(tree)) == sorted([*WNIDS, "test.txt", "train.txt"])  # nothing written or moved


def test_a_train_test_tree_takes_no_split_lists(split_tree):
    with pytest.raises(DatasetUnavailable, match="that is its split, so split_dir and test_fraction do not apply"):
        folder_spec(str(split_tree), split_dir=str(split_tree))
    assert folder_spec(str(split_tree)).test_split == "the images in test/"


def test_linked_folders_16_bit_images_and_unreadable_files(split_tree, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    write_images(str(elsewhere / "more"), 1, 2, first=50)
    os.symlink(elsewhere / "more", split_tree / "train" / "bee" / "linked")  # images a user sees under bee/
    os.symlink(split_tree / "train", split_tree / "train" / "bee" / "loop")  # a link to an ancestor: no loop
    ramp = (torch.arange(16).repeat(16, 1) * 4369).numpy().astype("uint16")  # 0 .. 65535 across the image
    Image.fromarray(ramp).save(split_tree / "test" / "ant" / "deep.png")
    assert Image.open(split_tree / "test" / "ant" / "deep.png").mode.startswith("I;16")
    spec, tensors, _ = load_tasks(f"folder:{split_tree}", "unused", image_size=16)
    assert len(tensors[1][1]) == 3 + 2  # bee's own three and the two linked ones, each once
    deep = tensors[0][2][-1].float()  # the 16-bit ramp, scaled to 8 bits rather than clipped at 255
    assert deep.min() < 10 and 100 < deep.mean() < 160 and deep.max() > 245
    (split_tree / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(DatasetUnavailable, match=r"cannot read image .*dog/bad.png"):
        load_tasks(f"folder:{split_tree}", "unused", image_size=16)


def test_a_folder_that_changed_while_a_run_was_stopped_is_not_resumed(one_tree, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("run")
    args = ["--dataset", f"folder:{one_tree}", "--image_size", "8", "--model", "mlp", "--test_fraction", "0.4",
            "--buffer_size", "8", "--threads", "1", "--quiet", "--output_dir", str(out)]  # fmt: skip
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0  # the same files: resumes (here: already finished)
    write_images(str(one_tree / "eel"), 4, 1, first=99)  # one new image moves the seeded hold-out
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("synapse: error: checkpoint") and "folder_files: checkpoint has" in err


def test_train_and_test_folders_that_differ_are_named_and_a_split_that_does_not_fit_is_one_line(
    split_tree, capsys
):
    write_images(str(split_tree / "test" / "eel"), 4, 1)
    os.rename(split_tree / "test" / "ant", split_tree / "test" / "Ant")
    with pytest.raises(DatasetUnavailable, match=r"test/ differs \(only in train/: ant; only in test/: Ant, eel\)"):
        folder_spec(str(split_tree))
    os.rename(split_tree / "test" / "Ant", split_tree / "test" / "ant")
    for image in (split_tree / "test" / "eel").iterdir():
        image.unlink()
    (split_tree / "test" / "eel").rmdir()
    for bad in (["--classes_per_task", "3"], ["--first_task_classes", "6"]):  # 4 classes: neither fits
        with pytest.raises(SystemExit) as stopped:
            main(["--dataset", f"folder:{split_tree}", *bad])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and "Traceback" not in err and "synapse: error:" in err
    assert "has 4 classes: tasks of 1 and a first task of 6" in err


def test_a_quick_runs_first_items_hold_every_class_and_a_class_without_test_images_is_refused(split_tree):
    spec, tensors, _ = load_tasks(f"folder:{split_tree}", "unused", image_size=8, classes_per_task=2)
    assert tensors[0][1].tolist() == [0, 1, 0, 1, 0, 1]  # in turns: the first 2 (a --max_train_per_task 2) hold both
    for image in (split_tree / "test" / "dog").iterdir():
        image.unlink()
    with pytest.raises(DatasetUnavailable, match=r"no test images .* for class folder\(s\) \['dog'\]"):
        load_tasks(f"folder:{split_tree}", "unused", image_size=8)


def test_a_macos_zips_resource_forks_are_neither_classes_nor_images(one_tree):
    write_images(str(one_tree / "__MACOSX" / "ant"), 0, 2)
    (one_tree / "ant" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    spec, tensors, _ = load_tasks(f"folder:{one_tree}", "unused", image_size=8)
    assert spec.num_classes == 5 and sum(len(t[1]) + len(t[3]) for t in tensors) == 25


def test_a_folder_read_smaller_than_the_model_takes_is_said(one_tree):
    args = ["--dataset", f"folder:{one_tree}", "--model", "resnet18-reduced", "--max_train_per_task", "4",
            "--max_test_per_task", "2", "--num_epochs", "1", "--training_type", "joint", "--threads", "1",
            "--quiet"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"read at 32x32 \(--image_size\) and upsampled to the model's 64"):
        assert main([*args, "--input_size", "64"]) == 0
