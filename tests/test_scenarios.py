"""Domain-incremental and task-free scenarios (synapse.scenarios) and their datasets in the CLI."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from synapse import catalog
from synapse.experiments.cli import main
from synapse.experiments.datasets import read_idx
from synapse.experiments.run import Config, Experiment
from synapse.scenarios import (
    Permuted,
    Rotated,
    mnist360,
    mnist360_test_angles,
    rotate,
    rotation_index_map,
    scenario,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def images():
    """Twelve real Fashion-MNIST test images, uint8 (12, 1, 28, 28)."""
    return torch.from_numpy(read_idx(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz"))[:12].copy()).unsqueeze(1)


# ---------------------------------------------------------------------------- Permuted
def test_each_permutation_is_a_bijection_reproducible_from_its_seed():
    a, b, c = Permuted(20, seed=3), Permuted(20, seed=3), Permuted(20, seed=4)
    for row in a.index:
        assert torch.equal(row.sort().values, torch.arange(784))  # every pixel exactly once
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert len({tuple(r.tolist()) for r in a.index}) == 20  # distinct tasks
    # Task t's permutation depends on the seed and t only, not on how many tasks follow.
    assert torch.equal(Permuted(5, seed=3).index, a.index[:5])
    # The authors' protocol permutes the first task too; first_identity keeps it as it is.
    assert not torch.equal(a.index[0], torch.arange(784))
    assert torch.equal(Permuted(3, seed=3, first_identity=True).index[0], torch.arange(784))


def test_permuted_transform_moves_every_pixel_and_back(images):
    scenario_ = Permuted(4, seed=0)
    out = scenario_.transform(images, 2)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    flat, perm = images.flatten(1), scenario_.index[2]
    assert torch.equal(out.flatten(1), flat[:, perm])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(784)
    assert torch.equal(out.flatten(1)[:, inverse], flat)  # a bijection: undone by its inverse
    # One task per image (a joint run) gives each image its own task's permutation.
    tasks = torch.tensor([0, 1, 2, 3] * 3)
    mixed = scenario_.transform(images, tasks)
    for i, t in enumerate(tasks.tolist()):
        assert torch.equal(mixed[i], scenario_.transform(images[i : i + 1], t)[0])


def test_too_many_tasks_for_the_permutations_there_are():
    assert len({tuple(r.tolist()) for r in Permuted(6, seed=0, image_size=(1, 3)).index}) == 6  # all 3! of them
    with pytest.raises(ValueError, match="7 is more than the 6 distinct permutations of a 1x3 image"):
        Permuted(7, seed=0, image_size=(1, 3))
    with pytest.raises(ValueError, match="num_tasks must be an int >= 1"):
        Permuted(0)
    with pytest.raises(ValueError, match="seed must be an int"):
        Permuted(2, seed=-1)


def test_bad_transform_arguments_are_named(images):
    scenario_ = Permuted(3, seed=0)
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 3\), got 3"):
        scenario_.transform(images, 3)
    with pytest.raises(ValueError, match=r"task indices must be in \[0, 3\)"):
        scenario_.transform(images, torch.full((12,), 5))
    with pytest.raises(ValueError, match=r"inputs are \(32, 32\) images"):
        scenario_.transform(torch.zeros(2, 3, 32, 32), 0)
    with pytest.raises(ValueError, match="unknown scenario 'shuffled'; choose from permuted, rotated"):
        scenario("shuffled", 5)


# ---------------------------------------------------------------------------- Rotated
def test_rotate_turns_counter_clockwise():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    # 90 degrees counter-clockwise is torch.rot90 over (H, W); exact, from the geometry alone.
    assert torch.equal(rotate(x, 90.0), torch.rot90(x, 1, (2, 3)))
    assert torch.equal(rotate(x, 180.0), torch.rot90(x, 2, (2, 3)))
    assert torch.equal(rotate(x, -90.0), torch.rot90(x, -1, (2, 3)))


@pytest.mark.parametrize("angle", [17.3, 45.0, 123.456, 179.9, 251.0, -30.0])
def test_rotation_matches_torchvision_on_real_images(images, angle):
    """The authors rotate PIL images with torchvision's ``rotate`` (nearest, zero fill). Nearest sampling copies
    pixels, so the two can only differ where a source coordinate falls within float rounding of a half-pixel
    boundary: over 300 random angles x 20 images at most 0.24% of one image's pixels differed (mean 0.006%).
    The tolerance, 1% of the pixels, leaves room for that and fails for a wrong direction or centre, or an
    angle 3 degrees off (which changes 12-25% of the pixels of these images). Bilinear: torchvision's tensor
    path computes the same interpolation, so the uint8 results differ by at most 1 (rounding)."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    ours = rotate(images, angle)
    pil = torch.stack(
        [torch.from_numpy(np.array(tvf.rotate(Image.fromarray(x[0].numpy(), mode="L"), angle)))[None] for x in images]
    )
    assert (ours != pil).float().mean() <= 0.01
    assert (ours != tvf.rotate(images, angle)).float().mean() <= 0.01
    assert (rotate(images, angle + 3) != pil).float().mean() > 0.05  # the tolerance does catch a wrong angle
    bilinear = tvf.rotate(images, angle, interpolation=InterpolationMode.BILINEAR)
    assert (rotate(images, angle, "bilinear").int() - bilinear.int()).abs().max() <= 1


def test_rotated_draws_its_angles_as_the_paper_and_applies_them_exactly(images):
    r = Rotated(20, seed=5)
    assert torch.equal(r.angles, Rotated(20, seed=5).angles) and not torch.equal(r.angles, Rotated(20, seed=6).angles)
    assert bool(((r.angles >= 0) & (r.angles < 180)).all()) and r.angles.std() > 20  # uniform in [0, 180)
    for t in (0, 7, 19):  # the pixel map is rotate(), exactly
        assert torch.equal(r.transform(images, t), rotate(images, float(r.angles[t])))
    assert torch.equal(rotation_index_map([0.0], 28)[0], torch.arange(784))
    chosen = Rotated(2, angles=[10.0, 200.0], interpolation="bilinear")
    assert torch.equal(chosen.transform(images, 1), rotate(images, 200.0, "bilinear"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"degrees": (180, 0)}, "rotation range"),
        ({"degrees": (0, 400)}, "rotation range"),
        ({"degrees": (0, math.inf)}, "rotation range"),
        ({"degrees": "wide"}, "pair"),
        ({"angles": [1.0, 2.0]}, "3 finite numbers"),
        ({"angles": [1.0, 2.0, 3.0], "degrees": (0, 90)}, "not both"),
        ({"interpolation": "cubic"}, "interpolation must be one of"),
    ],
)
def test_bad_rotation_arguments_get_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rotated(3, **kwargs)


# ---------------------------------------------------------------------------- MNIST-360
def _labels(per_class=60, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.arange(classes).repeat_interleave(per_class)[torch.randperm(per_class * classes, generator=g)]


def test_the_360_stream_follows_its_definition():
    labels = _labels(per_class=60)
    s = mnist360(labels, batch_size=7, seed=0)
    assert s.segments == tuple((a, (a + 1) % 9) for a in range(9)) * 3  # (0,1), ..., (8,0), three rounds
    stream_labels = labels[s.indices]
    assert int(stream_labels.max()) == 8  # class 9 is left out
    assert len(set(s.indices.tolist())) == len(s)  # one pass: no item twice
    # Batches: of batch_size, except the last of each pair; never mixing two pairs.
    segment = 0
    chunks = {j: torch.nonzero(labels == j).flatten() for j in range(9)}
    appearances = {j: 0 for j in range(9)}
    drawn = {j: [] for j in range(9)}
    for b in range(s.num_batches):
        lo, hi = s.boundaries[b], s.boundaries[b + 1]
        here = set(stream_labels[lo:hi].tolist())
        if not here <= set(s.segments[segment]):
            for j in s.segments[segment]:
                appearances[j] += 1
            segment += 1
        assert here <= set(s.segments[segment]) and 1 <= hi - lo <= 7
        for i in s.indices[lo:hi].tolist():
            drawn[int(labels[i])].append((appearances[int(labels[i])], i))
    assert segment == 26
    # Each appearance of class j draws from one chunk of N//6 + 1 items, taken from the end (pop()).
    for j in range(9):
        per_chunk = 60 // 6 + 1
        for appearance, item in drawn[j]:
            k = 5 - appearance
            assert item in chunks[j][k * per_chunk : (k + 1) * per_chunk].tolist()
    # The k-th item of class j is rotated by ((j - 1) * 60 + k * 360 / N_j) mod 360 degrees.
    for j in range(9):
        angles = s.angles[stream_labels == j]
        k = torch.arange(len(angles), dtype=torch.float64)
        assert torch.allclose(angles, torch.remainder((j - 1) * 60.0 + k * 6.0, 360.0))
    # Batches mix the pair in proportion to what is left of each chunk: the first batch of (0, 1) is 4 + 3.
    assert stream_labels[: s.boundaries[1]].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_360_stream_options_replacement_and_blurry():
    labels = _labels(per_class=120)
    sharp = mnist360(labels, batch_size=8, seed=1)
    assert torch.equal(sharp.indices, mnist360(labels, batch_size=8, seed=1).indices)  # reproducible
    repeated = mnist360(labels, batch_size=8, seed=1, replacement=True)  # the authors' sampling
    assert len(set(repeated.indices.tolist())) < 0.8 * len(repeated)
    blurry = mnist360(labels, batch_size=8, seed=1, blurry=40.0)
    assert sorted(blurry.indices.tolist()) == sorted(sharp.indices.tolist())  # the same items, re-ordered

    def classes_per_batch(s):
        y = labels[s.indices]
        return [len(set(y[s.boundaries[b] : s.boundaries[b + 1]].tolist())) for b in range(s.num_batches)]

    assert max(classes_per_batch(sharp)) == 2 and max(classes_per_batch(blurry)) >= 3  # pairs overlap
    assert set(blurry.boundaries[1:-1]) == set(range(8, len(blurry), 8))
    with pytest.raises(ValueError, match="blurry must be a finite number >= 0"):
        mnist360(labels, blurry=-1.0)
    with pytest.raises(ValueError, match="too few to cut into 6 non-empty chunks"):
        mnist360(_labels(per_class=5))


def test_360_test_angles_go_round_each_class():
    labels = torch.tensor([0, 1, 0, 1, 0, 2])
    assert mnist360_test_angles(labels, 3).tolist() == [0.0, 0.0, 120.0, 180.0, 240.0, 0.0]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        mnist360_test_angles(torch.tensor([0, 3]), 3)


# ---------------------------------------------------------------------------- the CLI
QUICK = ["--max_train_per_task", "600", "--max_test_per_task", "40", "--quiet"]


def _run(tmp_path, dataset, *args):
    out = str(tmp_path / dataset)
    assert main(["--dataset", dataset, *QUICK, "--output_dir", out, *args]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("dataset, transform", [("perm-fashion-mnist", "permuted"), ("rot-fashion-mnist", "rotated")])
def test_domain_il_end_to_end_task_il_is_null(tmp_path, dataset, transform):
    r = _run(tmp_path, dataset, "--synapse_type", "der++", "--buffer_size", "50")
    assert r["scenario"]["kind"] == "domain-il" and r["scenario"]["transform"] == transform
    assert r["scenario"]["num_tasks"] == 20 and r["config"]["batch_size"] == 128 and r["config"]["lr"] == 0.2
    matrix = r["accuracy_matrix"]["class_il"]
    assert len(matrix) == 20 and all(len(row) == 20 for row in matrix)
    assert r["accuracy_matrix"]["task_il"] is None and r["untrained_accuracy"]["task_il"] is None
    for key in ("average_accuracy", "forgetting", "bwt", "fwt"):
        assert r[key]["task_il"] is None and r[key]["class_il"] is not None
    assert r["test_samples_per_task"] == [40] * 20
    assert r["average_accuracy"]["class_il"] > 0.2  # learns (measured: 0.30 permuted, 0.53 rotated); chance is 0.1


def test_domain_il_joint_sees_every_task(tmp_path):
    r = _run(tmp_path, "perm-fashion-mnist", "--training_type", "joint")
    assert len(r["accuracy_matrix"]["class_il"]) == 1 and r["accuracy_matrix"]["task_il"] is None
    assert r["epoch_log"][0]["train_accuracy"] > 0  # one stage over 20 tasks x 120 images
    assert r["average_accuracy"]["class_il"] > 0.3  # measured: 0.48


def test_task_free_stream_end_to_end(tmp_path):
    r = _run(tmp_path, "fashion-mnist-360", "--synapse_type", "er", "--buffer_size", "50")
    s = r["scenario"]
    assert s["kind"] == "task-free" and s["pairs"] == 27 and s["classes"] == list(range(9))
    assert s["length"] > 0.9 * 9 * 600 and r["config"]["batch_size"] == 16  # every class, one pass
    assert r["accuracy_matrix"] == {"class_il": [[r["average_accuracy"]["class_il"]]], "task_il": None}
    assert r["test_samples_per_task"] == [9 * 40]
    assert r["forgetting"] == {"class_il": None, "task_il": None}
    assert r["average_accuracy"]["class_il"] > 0.18  # measured: 0.29; chance is 1/9


def test_task_free_joint_shuffles_the_stream(tmp_path):
    r = _run(tmp_path, "fashion-mnist-360", "--training_type", "joint")
    assert "shuffled" in r["scenario"]["order"] and r["epoch_log"][0]["task"] == "all tasks"
    assert r["average_accuracy"]["class_il"] > 0.3  # measured 0.40 (i.i.d. order: no forgetting of early pairs)


def test_a_method_that_needs_task_boundaries_is_refused_on_the_stream(capsys):
    assert not catalog.get("gem").task_free
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "fashion-mnist-360", "--synapse_type", "gem", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "gem needs task boundaries" in err and "choose a task-free method: er" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="gem needs task boundaries"):
        Experiment(Config(dataset="fashion-mnist-360", synapse_type="gem", quiet=True))
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "fashion-mnist-360", "--num_epochs", "2", "--quiet"])
    assert e.value.code == 2 and "single pass" in capsys.readouterr().err


def test_perm_mnist_reads_mnist_files_and_fails_clearly_offline(tmp_path, capsys):
    assert main(["--dataset", "perm-mnist", "--dataset_dir", str(tmp_path / "none"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "MNIST is not in" in err and "internet" in err
    # With the four IDX files in place (Fashion-MNIST's, in MNIST's format), it runs.
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in os.listdir(FASHION):
        os.symlink(os.path.join(FASHION, name), raw / name)
    r = _run(tmp_path, "mnist-360", "--dataset_dir", str(tmp_path / "data"), "--training_type", "sequential")
    assert r["scenario"]["stream"] == "mnist-360" and r["config"]["dataset"] == "mnist-360"


def test_protocol_tables_are_valid_catalog_arguments():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import protocols

    for protocol, rows in protocols.BEST.items():
        for (method, buffer), hp in rows.items():
            args = {k: v for k, v in hp.items() if k not in ("lr", "mb", "weight_decay", "batch_size")}
            if method in ("sequential", "joint"):
                assert not args and buffer is None
                continue
            spec = catalog.get(method)
            spec.resolve(args)  # raises on a name or value the method does not take
            assert (buffer is not None) == spec.has_buffer
            if protocol == "mnist-360":
                assert spec.task_free and "batch_size" in hp


def test_a_second_row_chosen_on_validation_is_tuned_run_and_rendered_under_its_first():
    """A preset's ``tuned`` block: tune.py searches its grid on top of the paper's row, protocols.py runs those
    values and shows them as a second row, under the paper's, with the grid and the changed comparisons."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import protocols
    import tune
    from synapse.experiments import presets

    paper = presets.values("der", "perm-mnist", 200)
    second = presets.values("der", "perm-mnist", 200, tuned=True)
    grid = presets.block("der", "perm-mnist", tuned=True)["grid"]
    assert ("der", 200, paper, grid) in tune.grids("perm-mnist")
    points = tune.grid_points(paper, grid)
    assert second in points and all({**p, **{k: paper[k] for k in grid}} == paper for p in points)
    assert protocols.TUNED["perm-mnist"][("der", 200)] == second
    stat = {"class_il": (20.0, 1.0), "task_il": (20.0, 1.0), "forgetting": (5.0, 0.5), "wall_time_s": (1.0, 0.0)}
    rows = [("sequential", None), ("er", 200), ("der", 200), ("der++", 200)]
    table = {row: stat for row in rows}
    better = {**stat, "class_il": (90.0, 1.0)}
    text = protocols.render_section("perm-mnist", rows, [0], table, 1.0, {}, tuned={("der", 200): better})
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| DER | 200 | 20.00"))
    assert (
        lines[at + 1].startswith("| DER, validation-tuned | 200 | 90.00 ± 1.00") and "validation split" in lines[at + 1]
    )
    assert "lr in {" in text and "With the validation-tuned rows (DER 200)" in text
    with pytest.raises(KeyError, match="no perm-mnist validation-tuned preset for er at buffer 200"):
        presets.values("er", "perm-mnist", 200, tuned=True)
