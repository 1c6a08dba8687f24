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
