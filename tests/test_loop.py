import math

import pytest
import torch
import torch.nn.functional as F

from synapse.experiments.build import build_optimizer, describe_optimizer
from synapse.experiments.config import Config, validate
from synapse.experiments.loop import random_crop_flip, shard, train_epoch
from synapse.experiments.schedule import lr_factor, set_lr


def test_crop_and_flip_move_pixels_without_changing_them():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for x, y in zip(images, out):
        # Every output is a shifted (zero-filled) window of the image or of its mirror image.
        padded = [torch.nn.functional.pad(v, (2, 2, 2, 2)) for v in (x, x.flip(-1))]
        windows = [p[:, i : i + 8, j : j + 8] for p in padded for i in range(5) for j in range(5)]
        assert any(torch.equal(y, w) for w in windows)
    flipped = sum(not torch.equal(y, x) for x, y in zip(images, out))
    assert flipped > 32  # most images moved (a no-op augmentation would fail here)


def test_no_padding_only_flips():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).view(2, 1, 2, 3)
    out = random_crop_flip(images, torch.Generator().manual_seed(1), padding=0)
    for x, y in zip(images, out):
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))


def test_shards_cover_every_index_once_with_wrapped_padding():
    idx = torch.arange(10)
    parts = [shard(idx, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert sorted(torch.cat(parts).tolist()) == sorted(list(range(10)) + [0, 1])
    assert torch.equal(shard(idx, 0, 1), idx)


@pytest.mark.parametrize("epochs", [2, 5, 20])
def test_the_cosine_at_each_epochs_first_step_is_coda_prompts_per_epoch_curve(epochs):
    """CODA-Prompt's CosineSchedule (utils/schedulers.py) sets cos(99 pi e / (200 (K - 1))) at epoch e of K;
    per step over K steps it is the same curve: 1 at the start, cos(0.495 pi) (1.6%) at the last step."""
    factors = [lr_factor("cosine", e, epochs) for e in range(epochs)]
    assert factors == pytest.approx([math.cos(99 * math.pi * e / (200 * (epochs - 1))) for e in range(epochs)])
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.0157, abs=1e-4)
    assert all(a > b for a, b in zip(factors, factors[1:]))


def test_constant_and_one_step_tasks_keep_the_lr_and_unknown_schedules_are_refused():
    assert {lr_factor("constant", s, 10) for s in range(10)} == {1.0}
    assert lr_factor("cosine", 0, 1) == 1.0  # a one-step task: the base lr (the authors' form divides by zero)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lr_factor("step", 0, 10)


class _SlowBackbone:
    """A method with parameter groups, as SLCA's: the first layer at a tenth of the lr."""

    def __init__(self, model):
        self.model = model

    def param_groups(self, lr):
        return [{"params": self.model[1].parameters(), "lr": lr}, {"params": self.model[0].parameters(), "lr": lr / 10}]

    def own_parameters(self):
        return []


@pytest.mark.parametrize(
    "name, kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_the_optimizer_is_the_configured_one_and_the_schedule_scales_every_group_from_its_own_lr(name, kind):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = build_optimizer(Config(lr=0.5, weight_decay=0.01, optimizer=name), model, _SlowBackbone(model))
    assert type(optimizer) is kind
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.05]
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.01}
    assert {g.get("betas") for g in optimizer.param_groups} == ({None} if name == "sgd" else {(0.9, 0.999)})
    set_lr(optimizer, 0.25)
    set_lr(optimizer, 0.5)  # from each group's base, not compounded
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.025]
    fresh = build_optimizer(Config(lr=0.5, optimizer=name), model, _SlowBackbone(model))
    fresh.load_state_dict(optimizer.state_dict())  # a checkpoint carries the base lrs
    assert [g["initial_lr"] for g in fresh.param_groups] == [0.5, 0.05]


class _DoubledLoss:
    """A method whose backward pass is its own (twice the loss): the clip must act on its gradients."""

    def backward(self, loss, targets, inputs=None):
        (2 * loss).backward()


def _two_groups(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters(), "lr": 0.05}]
    return model, torch.optim.SGD(groups)


@pytest.mark.parametrize("method", [None, _DoubledLoss()])
def test_clipping_scales_the_step_as_clip_grad_norm_over_every_group(method):
    """One step of train_epoch with --clip_grad_norm 0.1 equals, parameter for parameter, backward, then
    clip_grad_norm_ over both optimizer groups, then step, by hand; and differs from the unclipped step (the
    gradients' norm is far above 0.1)."""
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)) * 10, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    clip = 0.1

    def loop(clip_grad_norm):
        model, optimizer = _two_groups(0)
        never = lambda *_: False  # noqa: E731
        train_epoch(model, optimizer, method, x, y, torch.arange(8), 8, 0, False, torch.Generator(), never,
                    lambda: None, clip_grad_norm=clip_grad_norm)  # fmt: skip
        return [p.detach() for p in model.parameters()]

    model, optimizer = _two_groups(0)
    loss = F.cross_entropy(model(x), y)
    (loss if method is None else 2 * loss).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    assert norm > 10 * clip
    optimizer.step()
    by_hand = [p.detach() for p in model.parameters()]
    clipped, unclipped = loop(clip), loop(None)
    assert all(torch.equal(a, b) for a, b in zip(clipped, by_hand))
    assert not any(torch.equal(a, b) for a, b in zip(unclipped, by_hand))


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "1.0"])
def test_a_bad_clip_grad_norm_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="clip_grad_norm must be a finite number > 0"):
        validate(Config(clip_grad_norm=bad))


def test_the_optimizer_line_says_whether_gradients_are_clipped():
    assert "no gradient clipping" in describe_optimizer(Config(lr=0.1))
    assert "gradients clipped to total L2 norm 1.0" in describe_optimizer(Config(lr=0.1, clip_grad_norm=1.0))


def test_a_method_that_trains_nothing_trains_in_eval_mode_and_without_augmentation_by_default():
    from synapse.experiments.datasets import DATASETS
    from synapse.pretrained import SimpleCIL

    class Net(torch.nn.Module):  # the program passes its batches as `inputs`
        def __init__(self):
            super().__init__()
            self.norm, self.head = torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)

        def forward(self, inputs):
            return self.head(self.norm(inputs))

    torch.manual_seed(0)
    model = Net()
    method, norm = SimpleCIL(model), model.norm
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    never = lambda batch, running: False  # noqa: E731
    train_epoch(model, optimizer, method, x, y, torch.arange(8), 4, 0, False, torch.Generator(), never, lambda: None)
    assert not model.training and norm.num_batches_tracked == 0  # BatchNorm's statistics stayed put
    train_epoch(model, optimizer, None, x, y, torch.arange(8), 4, 0, False, torch.Generator(), never, lambda: None)
    assert model.training and norm.num_batches_tracked == 2  # plain training: train mode, as before

    cifar = DATASETS["cifar10"]
    closed_form = Config(dataset="cifar10", synapse_type="simplecil").with_protocol(cifar)
    assert closed_form.augment is False and "simplecil trains nothing" in closed_form.defaults
    assert Config(dataset="cifar10", synapse_type="simplecil", augment=True).with_protocol(cifar).augment is True
    assert Config(dataset="cifar10", synapse_type="der++").with_protocol(cifar).augment is True
    joint = Config(dataset="cifar10", synapse_type="simplecil", training_type="joint").with_protocol(cifar)
    assert joint.augment is True  # no method in a joint run
