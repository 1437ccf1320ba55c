"""Mixup and cutmix in training: timm's Mixup on each batch, soft targets through the same loss."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from clothcli.config import load_config
from clothcli.data.loading import IGNORE_INDEX
from clothcli.training import prepare, train, training_step
from clothcli.training.setup import mix_batch
from conftest import TINY_OVERRIDES, make_dataset


def config(data, out, *extra):
    return load_config(None, [*TINY_OVERRIDES, f"data.root={data}", f"output_dir={out}", *extra])


def test_unreadable_images_and_an_odd_one_are_left_out_before_mixing(tmp_path):
    setup = prepare(config(make_dataset(tmp_path / "data"), tmp_path, "augment.mixup=0.4"))
    images = torch.randn(5, 3, 32, 32)
    targets = torch.tensor([0, IGNORE_INDEX, 1, 2, 0])
    mixed, soft = mix_batch(setup.mix, images.clone(), targets)
    assert mixed.shape[0] == 4 and soft.shape == (4, 3)
    assert torch.allclose(soft.sum(1), torch.ones(4))
    # timm mixes each image with its mirror in the batch: rows 0 and 3 share classes 0 and 0
    assert soft[0, 0] == pytest.approx(1.0) and soft[1, 1] + soft[1, 2] == pytest.approx(1.0)


def test_the_step_trains_on_mixed_images_with_soft_targets(tmp_path):
    cfg = config(make_dataset(tmp_path / "data"), tmp_path, "augment.mixup=0.4", "train.label_smoothing=0.1")
    setup = prepare(cfg)
    images, targets, _, _ = next(iter(setup.train_loader))
    np.random.seed(0)
    mixed, soft = setup.mix(images.clone(), targets)
    with torch.no_grad():
        logits = setup.model(mixed)
    smoothed = soft * 0.9 + 0.1 / 3
    expected = -(smoothed * F.log_softmax(logits, 1)).sum(1).mean()
    np.random.seed(0)
    _, loss, counted = training_step(setup, images, targets)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    assert torch.equal(counted, soft.argmax(1))


def test_a_run_with_cutmix_and_mixup_trains_and_is_reproducible(tmp_path):
    data = make_dataset(tmp_path / "data")
    extra = ["augment.mixup=0.2", "augment.cutmix=1.0", "train.epochs=2"]
    first = train(config(data, tmp_path / "a", *extra))
    second = train(config(data, tmp_path / "b", *extra))
    losses = [row["train_loss"] for row in first.history]
    assert all(np.isfinite(losses))
    assert losses == [row["train_loss"] for row in second.history]
