import pytest
import torch
from torch.utils.data import Dataset

from synapse import Task, TaskDict


class Labelled(Dataset):
    """Items (index, label); ``targets`` only when asked, to test both label paths."""

    def __init__(self, labels, with_targets=True):
        self._labels = list(labels)
        if with_targets:
            self.targets = list(labels)

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return i, self._labels[i]


def make(labels_train, labels_test, with_targets=True):
    class Split(TaskDict):
        def _train_set(self, root):
            return Labelled(labels_train, with_targets)

        def _test_set(self, root):
            return Labelled(labels_test, with_targets)

    return Split


@pytest.mark.parametrize("with_targets", [True, False])
def test_splits_by_class_in_task_order(with_targets):
    labels = [0, 1, 2, 3, 0, 2, 1, 3, 4]
    tasks = make(labels, [3, 2, 1, 0], with_targets)("root", {"a": [0, 1], "b": [2, 3]})
    assert list(tasks) == ["a", "b"] and len(tasks) == 2
    a = tasks["a"]
    assert isinstance(a, Task) and a.key == "a" and a.targets == (0, 1)
    assert a.train_set.indices.tolist() == [0, 1, 4, 6]
    assert [a.train_set[i][1] for i in range(len(a.train_set))] == [0, 1, 0, 1]
    assert tasks["b"].test_set.indices.tolist() == [0, 1]


def test_classes_outside_every_task_are_left_out():
    tasks = make([0, 1, 2, 9, 9], [9])("root", {0: [0], 1: [2]})
    assert sum(len(t.train_set) for t in tasks.values()) == 2
    assert len(tasks[0].test_set) == 0


def test_a_class_in_two_tasks_is_an_error():
    with pytest.raises(ValueError, match="class 1 is assigned to both task 'x' and task 'y'"):
        make([0, 1], [0])("root", {"x": [0, 1], "y": [1, 2]})


def test_bad_splits_are_errors():
    Split = make([0], [0])
    with pytest.raises(ValueError, match="non-empty"):
        Split("root", {})
    with pytest.raises(ValueError, match="at least one class"):
        Split("root", {"x": []})
    with pytest.raises(ValueError, match="non-negative ints"):
        Split("root", {"x": [-1]})
    with pytest.raises(ValueError, match="not tasks"):
        Split("root", {"x": [0]}, key_to_transform={"y": str})


def test_per_task_transforms():
    tasks = make([0, 1], [0, 1])(
        "root",
        {"a": [0], "b": [1]},
        key_to_transform={"b": lambda x: -x},
        key_to_target_transform={"a": lambda y: y + 10},
    )
    assert tasks["a"].train_set[0] == (0, 10)
    assert tasks["b"].train_set[0] == (-1, 1)


def test_sixty_thousand_labels():
    labels = torch.randint(0, 10, (60_000,))
    tasks = make(labels, labels[:10_000])("root", {t: [2 * t, 2 * t + 1] for t in range(5)})
    assert sum(len(t.train_set) for t in tasks.values()) == 60_000
    for t, task in tasks.items():
        assert set(task.train_set.targets.unique().tolist()) == {2 * t, 2 * t + 1}
        assert torch.equal(labels[task.train_set.indices], task.train_set.targets)


def test_fashion_mnist_tasks(fashion_tasks):
    assert len(fashion_tasks) == 5
    for t, (x, y, _tx, ty) in enumerate(fashion_tasks):
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 28, 28)
        assert len(y) == 12_000 and len(ty) == 2_000
        assert set(y.unique().tolist()) == {2 * t, 2 * t + 1}


class FakeCIFAR10(Dataset):
    """Stands in for ``torchvision.datasets.CIFAR10`` (no download): 32x32 RGB uint8 images, labels in
    ``targets``, and the ``root`` and ``train`` it was built with, so that tests can see them."""

    def __init__(self, root, train):
        self.root, self.train = root, train
        n = 60 if train else 20
        g = torch.Generator().manual_seed(int(train))
        self.data = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
        self.targets = [i % 10 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i], self.targets[i]


SEED_SPLIT = {"1": [0, 1], "2": [2, 3], "3": [4, 5], "4": [6, 7], "5": [8, 9]}


def check_seed_split(tasks):
    assert list(tasks) == ["1", "2", "3", "4", "5"]
    for key, task in tasks.items():
        assert task.targets == tuple(SEED_SPLIT[key])
        assert task.train_set.dataset.train and not task.test_set.dataset.train
        assert task.train_set.dataset.root == "datasets"
        assert len(task.train_set) == 12 and len(task.test_set) == 4
        assert {task.train_set[i][1] for i in range(len(task.train_set))} == set(SEED_SPLIT[key])
    x, _ = tasks["1"].train_set[0]
    assert x.shape == (32, 32, 3) and x.dtype == torch.uint8


def test_seed_readme_property_form():
    """The seed README's example, verbatim but for the dataset: properties that take no argument and read
    ``self.root``, built with keyword arguments."""
    reads = []

    class CIFAR10TaskDict(TaskDict):
        @property
        def _train_set(self):
            return self._create_dataset(train=True)

        @property
        def _test_set(self):
            return self._create_dataset(train=False)

        def _create_dataset(self, train):
            reads.append(train)
            return FakeCIFAR10(root=self.root, train=train)

    tasks = CIFAR10TaskDict(root="datasets", key_to_targets=SEED_SPLIT)
    check_seed_split(tasks)
    assert reads == [True, False]  # each property is read once


def test_method_form_with_root():
    class CIFAR10TaskDict(TaskDict):
        def _train_set(self, root):
            return FakeCIFAR10(root, train=True)

        def _test_set(self, root):
            return FakeCIFAR10(root, train=False)

    check_seed_split(CIFAR10TaskDict(root="datasets", key_to_targets=SEED_SPLIT))


def test_method_form_without_root_and_mixed_forms():
    class CIFAR10TaskDict(TaskDict):
        def _train_set(self):
            return FakeCIFAR10(self.root, train=True)

        @property
        def _test_set(self):
            return FakeCIFAR10(self.root, train=False)

    check_seed_split(CIFAR10TaskDict("datasets", SEED_SPLIT))


def test_a_source_that_is_not_a_dataset_is_a_clear_error():
    class Broken(TaskDict):
        @property
        def _train_set(self):
            return 3

        def _test_set(self, root):
            return FakeCIFAR10(root, train=False)

    with pytest.raises(TypeError, match=r"Broken._train_set gave int, not a dataset"):
        Broken("datasets", SEED_SPLIT)
