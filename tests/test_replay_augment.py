"""Replay that re-augments: synapse.augment, and the replay_transform of the replay methods."""

from __future__ import annotations

import copy
import io
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synapse import named_batches
from synapse.augment import Compose, PerImage, RandomCropFlip, apply_transform, random_crop_flip
from synapse.gradient import AGEM
from synapse.rehearsal import ER, MIR, XDER, BiC, GDumb, ICaRL

PAD = 2


class Recorder(nn.Module):
    """A linear classifier on uint8 images that records the inputs of every training forward."""

    def __init__(self, classes: int = 4, size: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(size * size, classes)
        self.seen: List[Tensor] = []

    def forward(self, inputs: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            self.seen.append(inputs.detach().clone())
        return self.fc(inputs.float().flatten(1) / 255.0)


def images(n: int, seed: int, size: int = 6) -> Tensor:
    return torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def views(image: Tensor, padding: int = PAD) -> List[Tensor]:
    """Every crop-and-flip view of one (C, H, W) image: what RandomCropFlip(padding) may return."""
    c, h, w = image.shape
    padded = F.pad(image, (padding,) * 4)
    crops = [padded[:, i : i + h, j : j + w] for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
    return crops + [crop.flip(-1) for crop in crops]


def is_view_of(view: Tensor, image: Tensor) -> bool:
    return any(torch.equal(view, v) for v in views(image))


def step(method, model: Recorder, x: Tensor, y: Tensor, augment=None, gen=None) -> None:
    """One training step of the user's loop: the forward sees ``augment(x)``, backward stores ``x``."""
    seen = x if augment is None else augment(x, gen)
    loss = F.cross_entropy(model(seen), y)
    model.zero_grad()
    method.backward(loss, y, inputs=x)


# ---------------------------------------------------------------------------- synapse.augment
def test_random_crop_flip_gives_every_image_its_own_view_from_the_generator():
    x = images(64, 0)
    out = random_crop_flip(x, torch.Generator().manual_seed(3), padding=PAD)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert all(is_view_of(out[i], x[i]) for i in range(len(x)))
    same = random_crop_flip(x, torch.Generator().manual_seed(3), padding=PAD)
    assert torch.equal(out, same)  # the generator decides everything
    # Per image, not per batch: copies of one image get different views.
    copies = random_crop_flip(x[:1].expand(64, -1, -1, -1), torch.Generator().manual_seed(3), padding=PAD)
    assert len({tuple(v.flatten().tolist()) for v in copies}) > 10


def test_compose_hands_its_generator_on_and_accepts_any_callable():
    x = images(8, 1)
    augment = Compose(RandomCropFlip(padding=PAD), lambda t: 255 - t)
    out = augment(x, torch.Generator().manual_seed(5))
    expected = 255 - random_crop_flip(x, torch.Generator().manual_seed(5), padding=PAD)
    assert torch.equal(out, expected)
    assert torch.equal(apply_transform(lambda t: t + 1, x, torch.Generator()), x + 1)  # no generator for it
    with pytest.raises(TypeError, match="transform 1 must be callable"):
        Compose(RandomCropFlip(), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="padding must be a non-negative int"):
        RandomCropFlip(padding=-1)


# ---------------------------------------------------------------------------- replay_transform
def test_a_stored_item_replayed_at_two_steps_arrives_with_different_augmentations():
    torch.manual_seed(0)
    model = Recorder()
    method = ER(model, buffer_size=1, buffer_sample_size=1, method="er", replay_transform=RandomCropFlip(PAD))
    x, y = images(1, 0), torch.zeros(1, dtype=torch.long)
    replayed = []
    for _ in range(6):  # the same item every step: the memory always holds it, raw
        model.seen.clear()
        step(method, model, x, y)
        if len(model.seen[0]) > 1:
            replayed.append(model.seen[0][1])  # fused: the replay row follows the batch's
    assert len(replayed) == 5 and all(is_view_of(r, x[0]) for r in replayed)
    assert torch.equal(method.buffer.stored(["input:inputs"])["input:inputs"][0], x[0])
    distinct = {tuple(r.flatten().tolist()) for r in replayed}
    assert len(distinct) >= 4  # 50 views: five draws repeat one at most now and then, never all


def test_stored_rows_equal_the_raw_inputs_and_logits_come_from_the_augmented_forward():
    torch.manual_seed(0)
    model = Recorder()
    method = ER(model, buffer_size=16, buffer_sample_size=4, method="der", replay_transform=RandomCropFlip(PAD))
    gen = torch.Generator().manual_seed(1)
    augment = RandomCropFlip(PAD)
    x, y = images(8, 0), torch.arange(8) % 4
    seen = augment(x, gen)
    assert not torch.equal(seen, x)
    logits = model(seen)
    method.backward(F.cross_entropy(logits, y), y, inputs=x)
    stored = method.buffer.stored(["input:inputs", "logits"])
    assert torch.equal(stored["input:inputs"][:8], x)
    assert torch.allclose(stored["logits"][:8], logits.detach())


def _run(fused: bool, steps: int, method_name: str = "der++", start=None):
    """A short run; returns (method, model, replay inputs per step, gradient after the last step)."""
    torch.manual_seed(0)
    model = Recorder()
    method = ER(
        model,
        buffer_size=6,
        buffer_sample_size=3,
        method=method_name,
        fused=fused,
        replay_transform=RandomCropFlip(PAD),
    )
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        method.load_state_dict(start["method"])
        first = start["step"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    replays, grad = [], None
    for s in range(first, first + steps):
        model.seen.clear()
        x, y = images(4, 100 + s), torch.arange(4)
        step(method, model, x, y)
        grad = model.fc.weight.grad.clone()
        optimizer.step()
        if len(method.buffer) and s > 0:
            replays.append(model.seen[0][4:] if fused else torch.cat(model.seen[1:]))
    return method, model, replays, grad


def test_a_resumed_run_replays_the_same_augmentations_as_an_uninterrupted_one():
    _, _, uninterrupted, _ = _run(True, 6)
    method, model, before, _ = _run(True, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "method": method.state_dict(), "step": 3}, buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # the resumed process's global RNG is elsewhere
    _, _, after, _ = _run(True, 3, start=torch.load(buffer, weights_only=False))
    assert len(before + after) == len(uninterrupted) == 5
    for a, b in zip(before + after, uninterrupted):
        assert torch.equal(a, b)


def test_fused_and_unfused_replay_agree():
    _, _, fused, g_fused = _run(True, 4)
    _, _, unfused, g_unfused = _run(False, 4)
    assert len(fused) == len(unfused) == 3
    for a, b in zip(fused, unfused):
        assert torch.equal(a, b)
    assert torch.allclose(g_fused, g_unfused, atol=1e-6)


@pytest.mark.parametrize("cls", [AGEM, MIR, XDER])
def test_other_replay_methods_augment_their_replay(cls):
    torch.manual_seed(0)
    model = Recorder()
    kwargs = {"buffer_candidates": 4} if cls is MIR else {}
    method = cls(model, buffer_size=4, buffer_sample_size=4, replay_transform=RandomCropFlip(PAD), **kwargs)
    x, y = images(4, 0), torch.arange(4)
    step(method, model, x, y)
    model.seen.clear()
    step(method, model, images(4, 1), y)
    rows = torch.cat([t for t in model.seen if t.shape[0] >= 4])
    replayed = [r for r in rows if any(is_view_of(r, x[i]) for i in range(4))]
    assert len(replayed) >= 4
    assert sum(not any(torch.equal(r, x[i]) for i in range(4)) for r in replayed) >= 2  # augmented, not raw


@pytest.mark.parametrize("cls", [ICaRL, BiC])
def test_a_frozen_copy_distils_on_the_view_the_model_trained_on_not_the_raw_one_stored(cls):
    torch.manual_seed(0)
    model = Recorder()
    kwargs = {"bias_epochs": 1} if cls is BiC else {}
    method = cls(model, buffer_size=8, buffer_sample_size=2, replay_transform=RandomCropFlip(PAD), **kwargs)
    augment, gen = RandomCropFlip(PAD), torch.Generator().manual_seed(1)
    x, y = images(8, 0), torch.arange(8) % 2
    step(method, model, x, y, augment, gen)
    method.end_task(named_batches([(x, y)]))
    assert method.teacher is not None
    seen = []
    method.teacher.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["inputs"]), with_kwargs=True)
    x2, y2 = images(4, 1), torch.tensor([2, 3, 2, 3])
    model.seen.clear()
    step(method, model, x2, y2, augment, gen)
    trained_on = model.seen[0][:4]
    assert not torch.equal(trained_on, x2)
    assert len(seen) == 1 and torch.equal(seen[0][:4], trained_on)


def test_gdumb_retrains_on_augmented_views_of_its_memory():
    torch.manual_seed(0)
    model = Recorder()
    method = GDumb(model, buffer_size=4, retrain_epochs=2, retrain_batch_size=4, replay_transform=RandomCropFlip(PAD))
    x, y = images(4, 0), torch.arange(4)
    step(method, model, x, y)
    model.seen.clear()
    method.end_task()
    rows = torch.cat(model.seen)
    assert len(rows) == 8 and all(any(is_view_of(r, x[i]) for i in range(4)) for r in rows)
    assert sum(not any(torch.equal(r, x[i]) for i in range(4)) for r in rows) >= 4


def test_state_must_match_the_transform_and_a_rejected_load_changes_nothing():
    torch.manual_seed(0)
    plain = ER(Recorder(), buffer_size=4, buffer_sample_size=2)
    assert "replay_rng" not in plain.state_dict()["state"]  # None: today's state dict, unchanged
    model = Recorder()
    method = ER(model, buffer_size=4, buffer_sample_size=2, replay_transform=RandomCropFlip(PAD))
    step(method, model, images(4, 0), torch.arange(4))
    before = copy.deepcopy(method.state_dict())
    # strict loading (declared state): the generator's state goes with the transform
    with pytest.raises(ValueError, match=r"missing \['replay_rng'\]"):
        method.load_state_dict(plain.state_dict())
    after = method.state_dict()
    assert torch.equal(before["state"]["replay_rng"], after["state"]["replay_rng"]) and len(method.buffer) == 4
    with pytest.raises(ValueError, match=r"unexpected \['replay_rng'\]"):
        plain.load_state_dict(before)
    with pytest.raises(TypeError, match="replay_transform must be a callable"):
        ER(Recorder(), replay_transform=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the experiment program
@pytest.mark.parametrize("replay_augment", [True, False])
def test_the_experiment_program_stores_raw_images_when_it_re_augments_replay(replay_augment):
    from synapse.experiments.run import Config, Experiment

    cfg = Config(
        dataset="fashion-mnist",
        model="mlp",
        augment=True,
        replay_augment=replay_augment,
        buffer_size=30,
        max_train_per_task=20,
        max_test_per_task=5,
        threads=1,
        quiet=True,
    )
    experiment = Experiment(cfg)
    experiment.run()
    assert experiment.cfg.replay_augment is replay_augment
    method = experiment.synapse
    assert (method.replay_transform is not None) is replay_augment
    raw = torch.cat([x for x, _ in experiment.train_sets]).flatten(1)
    stored = method.buffer.stored(["input:inputs"])["input:inputs"].flatten(1)
    is_raw = (stored[:, None, :] == raw[None, :, :]).all(-1).any(1)
    assert len(stored) == 30
    # Stored raw, or (today's behaviour without re-augmentation) the augmented view the model trained on.
    assert bool(is_raw.all()) if replay_augment else int(is_raw.sum()) < 10


def test_replay_augment_needs_augment():
    from synapse.experiments.run import Config, Experiment

    with pytest.raises(ValueError, match="it needs augment"):
        Experiment(Config(dataset="fashion-mnist", replay_augment=True, max_train_per_task=10, max_test_per_task=5))


# ---------------------------------------------------------------------------- misuse
class Scaled(nn.Module):
    """A classifier on float images in [0, 1]: the user's loop scales uint8 batches before the forward."""

    def __init__(self, size: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(size * size, 4)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.fc(inputs.flatten(1))


@pytest.mark.parametrize("fused", [True, False])
def test_replayed_rows_that_would_skip_the_loops_preprocessing_are_refused_before_any_change(fused):
    torch.manual_seed(0)
    model = Scaled()
    method = ER(model, buffer_size=8, buffer_sample_size=4, method="er", replay_transform=RandomCropFlip(PAD),
                fused=fused)  # fmt: skip
    x, y = images(4, 0), torch.arange(4)
    method.backward(F.cross_entropy(model(x.float() / 255), y), y, inputs=x)  # stores the uint8 view

    def replay_step(seen):  # fused: the forward refuses; unfused: backward, before its replay forward
        method.backward(F.cross_entropy(model(seen), y), y, inputs=x)

    stored = copy.deepcopy(method.buffer.state_dict())
    with pytest.raises(ValueError, match=r"'inputs' rows are torch.uint8 .* forward's 'inputs' is torch.float32"):
        replay_step(x.float() / 255)  # the replayed uint8 rows would reach the model unscaled
    assert method.buffer.state_dict().keys() == stored.keys() and method.num_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(method.buffer.state_dict().values(), stored.values())
               if isinstance(a, Tensor))  # fmt: skip
    with pytest.raises(ValueError, match=r"of shape \(1, 6, 6\) per item, but .* shape \(1, 8, 8\)"):
        model.fc = nn.Linear(64, 4)
        replay_step(F.interpolate(x.float(), size=8))  # a resize in the loop, not in the replay transform
    if not fused:
        return

    # The same preprocessing inside the replay transform: the rows arrive as the forward's, and join it.
    model = Scaled()
    scaled = Compose(RandomCropFlip(PAD), lambda t: t.float() / 255)
    method = ER(model, buffer_size=8, buffer_sample_size=4, method="er", replay_transform=scaled)
    method.backward(F.cross_entropy(model(x.float() / 255), y), y, inputs=x)
    method.backward(F.cross_entropy(model(x.float() / 255), y), y, inputs=x)  # with the replay joined
    assert method.last_replay is not None and method.last_replay["input:inputs"].dtype == torch.float32


def test_a_torchvision_transform_is_warned_about_and_per_image_draws_one_view_per_image():
    v2 = pytest.importorskip("torchvision.transforms.v2")
    crop = v2.Compose([v2.RandomCrop(6, padding=PAD), v2.RandomHorizontalFlip()])
    with pytest.warns(UserWarning, match=r"once per call.*PerImage") as caught:
        ER(Recorder(), buffer_size=8, buffer_sample_size=4, method="er", replay_transform=crop)
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match="once per call"):  # inside our Compose too
        ER(Recorder(), buffer_size=8, buffer_sample_size=4, method="er", replay_transform=Compose(crop))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ER(Recorder(), buffer_size=8, buffer_sample_size=4, method="er", replay_transform=PerImage(crop))

    same = images(1, 3).expand(16, -1, -1, -1).contiguous()
    assert len({tuple(v.flatten().tolist()) for v in crop(same)}) == 1  # the trap: one view for the batch
    before = torch.get_rng_state()
    first = PerImage(crop)(same, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's global RNG is left as it was
    assert len({tuple(v.flatten().tolist()) for v in first}) > 4 and all(is_view_of(v, same[0]) for v in first)
    assert torch.equal(PerImage(crop)(same, torch.Generator().manual_seed(7)), first)  # the generator decides
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        PerImage(crop)(same[0])


def test_a_transform_class_in_place_of_an_instance_is_refused_naming_the_fix():
    model = Recorder()
    with pytest.raises(TypeError, match=r"the class RandomCropFlip, not a transform: .* RandomCropFlip\(\)"):
        ER(model, buffer_size=8, buffer_sample_size=4, method="er", replay_transform=RandomCropFlip)
    ER(model, buffer_size=8, buffer_sample_size=4, method="er", replay_transform=RandomCropFlip())  # nothing hooked
