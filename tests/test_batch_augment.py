"""Colour jitter and normalisation batched on the device equal torchvision's per-image pipeline."""

import itertools

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from clothcli.config import load_config
from clothcli.data.batch_augment import BatchAugment, color_jitter
from clothcli.data.loading import tensor_eval_transform, tensor_train_transform
from clothcli.data.preprocess import Preprocess
from clothcli.errors import UserError
from clothcli.training import train
from conftest import TINY_OVERRIDES, comparable

PRE = Preprocess(24, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875)


def images(n=4, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def per_image_jitter(x, factors, orders):
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    expected = []
    for i in range(len(x)):
        img = x[i]
        for op in orders[i].tolist():
            img = adjust[op](img, float(factors[op, i]))
        expected.append(img)
    return torch.stack(expected)


FACTORS = torch.tensor([[0.6, 1.0, 1.4, 0.0], [1.3, 0.7, 1.0, 2.0], [0.0, 1.2, 0.8, 1.5]])


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_jitter_matches_torchvision_per_image(order):
    x = F.to_dtype(images(), torch.float32, scale=True)
    orders = torch.tensor(order).repeat(len(x), 1)
    expected = per_image_jitter(x, FACTORS, orders)
    torch.testing.assert_close(color_jitter(x, FACTORS, orders), expected, rtol=0, atol=1e-6)


def test_each_image_gets_its_own_order_of_adjustments():
    x = F.to_dtype(images(), torch.float32, scale=True)
    orders = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]])
    expected = per_image_jitter(x, FACTORS, orders)
    torch.testing.assert_close(color_jitter(x, FACTORS, orders), expected, rtol=0, atol=1e-6)
    _, drawn = BatchAugment(PRE.mean, PRE.std, jitter=0.4).draw(64, torch.device("cpu"))
    assert all(sorted(row) == [0, 1, 2] for row in drawn.tolist())
    assert len({tuple(row) for row in drawn.tolist()}) == 6  # all six orders among 64 images


def test_normalisation_is_bit_exact_with_the_per_image_pipeline():
    batch = images(n=3, size=30)
    per_image = torch.stack([tensor_eval_transform(PRE)(img) for img in batch])
    crops = torch.stack([tensor_eval_transform(PRE, uint8_out=True)(img) for img in batch])
    assert crops.dtype == torch.uint8
    assert torch.equal(BatchAugment(PRE.mean, PRE.std)(crops), per_image)


def test_jitter_factors_differ_per_image():
    same = images(n=1).repeat(8, 1, 1, 1)
    out = BatchAugment(PRE.mean, PRE.std, jitter=0.4)(same)
    assert len({round(float(o.mean()), 5) for o in out}) > 1


def test_jitter_depends_on_seed_and_epoch_only():
    """Its own generator: the global one is neither read nor advanced, and (seed, epoch) fix the draws."""
    batch = images(n=4)
    a, b = BatchAugment(PRE.mean, PRE.std, jitter=0.4, seed=3), BatchAugment(PRE.mean, PRE.std, jitter=0.4, seed=3)
    a.set_epoch(1)
    torch.manual_seed(0)
    first = a(batch)
    b.set_epoch(1)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    assert torch.equal(b(batch), first)
    assert torch.equal(torch.get_rng_state(), state)
    b.set_epoch(2)
    assert not torch.equal(b(batch), first)


def test_uint8_train_transform_leaves_jitter_and_normalisation_out():
    from clothcli.config import AugmentConfig

    aug = AugmentConfig(color_jitter=0.4)
    out = tensor_train_transform(PRE, aug, uint8_out=True)(images(n=1, size=40)[0])
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)


def tiny(data, out, *extra):
    return load_config(
        None,
        [*TINY_OVERRIDES, f"data.root={data}", f"output_dir={out}", "train.epochs=2", "augment.color_jitter=0", *extra],
    )


def test_training_on_the_device_equals_the_workers_when_jitter_is_off(tiny_dataset, tmp_path):
    workers = train(tiny(tiny_dataset, tmp_path / "a", "data.augment_on=workers"))
    device = train(tiny(tiny_dataset, tmp_path / "b", "data.augment_on=device"))
    assert comparable(device.history) == comparable(workers.history)


def test_training_with_device_jitter_runs(tiny_dataset, tmp_path):
    result = train(tiny(tiny_dataset, tmp_path / "c", "data.augment_on=device", "augment.color_jitter=0.4"))
    assert len(result.history) == 2 and all(r["train_loss"] > 0 for r in result.history)


def test_device_augmentation_needs_the_cache(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="decode cache"):
        train(tiny(tiny_dataset, tmp_path / "d", "data.augment_on=device", "data.cache=none"))
