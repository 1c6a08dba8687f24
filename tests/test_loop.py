import torch

from synapse.experiments.loop import random_crop_flip, shard


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
