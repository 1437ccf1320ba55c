import pytest
import torch

from clothcli.config import AugmentConfig
from clothcli.data.cache import build_or_open
from clothcli.data.layout import index_dataset
from clothcli.data.loading import (
    CachedImages,
    ImageFiles,
    decode_size,
    eval_transform,
    scale_size,
    tensor_eval_transform,
    tensor_train_transform,
)
from clothcli.data.preprocess import Preprocess
from conftest import make_image

PRE = Preprocess(input_size=24, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875)


def test_cached_eval_equals_decoding_every_time(tiny_dataset, tmp_path):
    make_image(tiny_dataset / "train" / "red" / "wide.png", (200, 30, 30), size=(90, 41), fmt="PNG")
    samples = index_dataset(tiny_dataset).splits["train"].samples
    images = build_or_open([p for p, _ in samples], scale_size(PRE), "bilinear", tmp_path / "c", workers=2)
    cached = CachedImages(images, [t for _, t in samples], tensor_eval_transform(PRE))
    plain = ImageFiles(samples, eval_transform(PRE), decode_size(PRE))
    for i in range(len(samples)):
        a, b = cached[i], plain[i]
        assert a[1:] == b[1:]
        assert torch.allclose(a[0], b[0], atol=1e-6), samples[i][0]


def test_cache_is_reused_and_keyed_by_content(tiny_dataset, tmp_path):
    paths = [p for p, _ in index_dataset(tiny_dataset).splits["test"].samples]
    first = build_or_open(paths, 20, "bilinear", tmp_path / "c", workers=1)
    mtime = first.path.stat().st_mtime_ns
    again = build_or_open(paths, 20, "bilinear", tmp_path / "c", workers=1)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    make_image(paths[0], (1, 2, 3), seed=1234)
    changed = build_or_open(paths, 20, "bilinear", tmp_path / "c", workers=1)
    assert changed.path != first.path
    assert build_or_open(paths, 22, "bilinear", tmp_path / "c", workers=1).path != changed.path


def test_memory_mapped_mode_and_bad_files(tiny_dataset, tmp_path):
    bad = tiny_dataset / "test" / "red" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    paths = [p for p, _ in index_dataset(tiny_dataset).splits["test"].samples]
    images = build_or_open(paths, 20, "bilinear", tmp_path / "c", mode="disk", workers=1)
    assert not images.in_memory
    broken = paths.index(bad)
    assert images.get(broken) is None and images.errors[broken]
    dataset = CachedImages(images, [0] * len(paths), tensor_train_transform(PRE, AugmentConfig()))
    image, target, _, error = dataset[broken]
    assert target == -1 and error and image.shape == (3, 24, 24)
    image, target, _, error = dataset[(broken + 1) % len(paths)]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and error == ""


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_the_cache_travels_to_spawned_workers_as_its_file(tiny_dataset, tmp_path, mode):
    """Read in or memory-mapped alike (numpy pickles a memmap as every byte of it)."""
    import pickle

    paths = [p for p, _ in index_dataset(tiny_dataset).splits["train"].samples]
    images = build_or_open(paths, 20, "bilinear", tmp_path / "c", mode=mode, workers=1)
    assert images.in_memory == (mode == "memory")
    blob = pickle.dumps(images)
    assert len(blob) < images.nbytes / 4
    copy = pickle.loads(blob)
    assert all(torch.equal(copy.get(i), images.get(i)) for i in range(len(paths)))


def test_loader_with_spawned_workers_reads_the_cache(tiny_dataset, tmp_path):
    from torch.utils.data import DataLoader

    samples = index_dataset(tiny_dataset).splits["train"].samples
    images = build_or_open([p for p, _ in samples], scale_size(PRE), "bilinear", tmp_path / "c", mode="memory")
    dataset = CachedImages(images, [t for _, t in samples], tensor_eval_transform(PRE))
    loader = DataLoader(dataset, batch_size=len(samples), num_workers=1, multiprocessing_context="spawn")
    batch = next(iter(loader))[0]
    assert torch.equal(batch, torch.stack([dataset[i][0] for i in range(len(samples))]))


def test_eval_transform_matches_timm_within_one_level(tmp_path):
    """The tensor resize differs from timm's PIL pipeline only by rounding (one uint8 level)."""
    from PIL import Image
    from timm.data import create_transform

    from clothcli.data.images import load_rgb

    pre = Preprocess(input_size=64, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    timm_eval = create_transform(64, interpolation="bilinear", mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct)
    for size in [(300, 200), (73, 160), (73, 73)]:
        path = make_image(tmp_path / f"{size[0]}x{size[1]}.png", (120, 80, 40), size=size, fmt="PNG")
        image = load_rgb(path)
        ours, theirs = eval_transform(pre)(image), timm_eval(image)
        assert ours.shape == theirs.shape == (3, 64, 64)
        assert (ours - theirs).abs().max() <= 1 / 255 / 0.5 + 1e-6, size
    assert eval_transform(pre, uint8_out=True)(Image.new("RGB", (90, 80))).dtype == torch.uint8


def test_cache_budget_gives_up_the_least_recently_used_first(tiny_dataset, tmp_path):
    import os

    from clothcli.data.cache import CacheBudget, estimate_bytes

    folder = tmp_path / "c"
    splits = index_dataset(tiny_dataset).splits
    train, test = ([p for p, _ in splits[name].samples] for name in ("train", "test"))
    old = build_or_open(test, 20, "bilinear", folder, workers=1)
    os.utime(old.path.with_suffix(".json"), (1, 1))  # long unused
    # room for one cache only: the old one is deleted for the new one
    budget = (estimate_bytes(train, 20) + old.nbytes / 2) / 1e9
    new = build_or_open(train, 20, "bilinear", folder, workers=1, max_gb=budget)
    assert not isinstance(new, CacheBudget) and new.path.exists() and not old.path.exists()
    # a cache larger than the whole budget is not built: decoding every epoch instead
    refused = build_or_open(test, 24, "bilinear", folder, workers=1, max_gb=1e-9)
    assert isinstance(refused, CacheBudget) and not refused.fits and new.path.exists()
    assert "past data.cache_max_gb" in refused.describe()


def test_training_past_the_cache_budget_decodes_every_epoch(tiny_dataset, tmp_path):
    from clothcli.config import load_config
    from clothcli.errors import UserError
    from clothcli.training import SilentReporter, train
    from conftest import TINY_OVERRIDES

    class Messages(SilentReporter):
        def message(self, text: str) -> None:
            messages.append(text)

    base = [*TINY_OVERRIDES, "train.epochs=1", f"data.root={tiny_dataset}", f"output_dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'c'}", "data.cache_max_gb=1e-9"]  # fmt: skip
    messages = []
    result = train(load_config(None, base), reporter=Messages())
    assert result.run_dir.exists() and any("decoding the files every epoch instead" in m for m in messages)
    assert not list((tmp_path / "c").glob("*.u8"))
    try:
        train(load_config(None, [*base, "data.cache=disk"]))
    except UserError as exc:
        assert "raise data.cache_max_gb" in str(exc)
    else:
        raise AssertionError("data.cache=disk past the budget trained")
