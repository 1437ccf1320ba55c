import json
import shutil

from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.data.audit import audit_dataset, balance_weights
from conftest import make_dataset, make_image

runner = CliRunner()


def test_counts_imbalance_and_weights(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": 4, "test": 2})
    for i in range(4, 8):
        make_image(root / "train" / "red" / f"extra{i}.jpg", (200, 30, 30), seed=100 + i)
    result = audit_dataset(root)
    train = result.splits["train"]
    assert train["total"] == 16 and train["classes"]["red"] == 8 and train["imbalance_ratio"] == 2.0
    weights = result.balance["class_weights"]
    assert abs(sum(w * c for w, c in zip(weights, [4, 4, 8])) - 16) < 1e-9


def test_balance_weights_formula():
    out = balance_weights([10, 30])
    assert out["class_weights"] == [2.0, 40 / 60]
    assert out["sampler_weights"] == [0.1, 1 / 30]


def test_unreadable_files_are_listed_with_reasons(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": 2})
    (root / "train" / "red" / "zero.jpg").write_bytes(b"")
    (root / "train" / "red" / "text.jpg").write_text("not an image at all")
    good = make_image(root / "train" / "red" / "full.jpg", (10, 200, 10), size=(64, 64), seed=7)
    data = good.read_bytes()
    (root / "train" / "red" / "cut.jpg").write_bytes(data[: len(data) // 2])
    result = audit_dataset(root)
    reasons = {p["path"].rsplit("/", 1)[1]: p["reason"] for p in result.unreadable}
    assert "0 bytes" in reasons["zero.jpg"]
    assert "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["cut.jpg"]
    assert "full.jpg" not in reasons


def test_exact_and_near_duplicates_across_splits(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": 3, "test": 3})
    shutil.copy(root / "train" / "red" / "red_0.jpg", root / "test" / "red" / "copy.jpg")
    # the same picture re-encoded smaller under another label: near duplicate, conflicting labels
    from PIL import Image, ImageDraw

    picture = Image.linear_gradient("L").resize((120, 90)).convert("RGB")
    draw = ImageDraw.Draw(picture)
    draw.rectangle((20, 10, 60, 70), fill=(250, 200, 0))
    draw.ellipse((70, 30, 110, 80), fill=(0, 90, 200))
    picture.save(root / "train" / "blue" / "big.png")
    picture.resize((60, 45)).save(root / "test" / "green" / "small.jpg", quality=90)
    result = audit_dataset(root)
    groups = result.duplicates
    exact = [g for g in groups if g["kind"] == "exact"]
    assert any(g["cross_split"] and any("copy.jpg" in p for p in g["paths"]) for g in exact)
    near = [g for g in groups if any("small.jpg" in p for p in g["paths"])]
    assert near and near[0]["conflicting_labels"] and near[0]["cross_split"]


def test_cli_json_and_plot(tmp_path, tiny_dataset):
    out = tmp_path / "a.json"
    png = tmp_path / "a.png"
    result = runner.invoke(app, ["analyze-data", str(tiny_dataset), "--json", str(out), "--plot", str(png), "--deep"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["splits"]["train"]["total"] == 24
    assert data["splits"]["test"]["classes"]["red"] == 4
    assert data["classes"] == ["blue", "green", "red"]
    assert data["unreadable"] == [] and isinstance(data["duplicates"], list)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "Images per class" in result.output


def test_cli_missing_folder_exit_2(tmp_path):
    result = runner.invoke(app, ["analyze-data", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "not found" in result.output
    assert "Traceback" not in result.output


def planted_hashes(n: int, clustered: int, seed: int = 0, most: int = 20):
    """n random 256-bit hashes with near copies planted (0 to `most` bits flipped, so some fall just past
    the 18-bit threshold) and `clustered` of them sharing their first 60 bits, as photos on one background
    do."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, (n, 256)).astype(bool)
    bits[:clustered, :60] = False
    for source, target in rng.integers(0, n, (n // 8, 2)):
        row = bits[source].copy()
        row[rng.choice(256, rng.integers(0, most + 1), replace=False)] ^= True
        bits[target] = row
    return bits


def test_near_duplicate_index_finds_exactly_the_all_pairs_groups(monkeypatch):
    import numpy as np

    from clothcli.data import near_duplicates as index

    def reference(bits, max_bits):
        return index.groups_of(len(bits), index.all_pairs(bits, max_bits))

    for n, clustered in ((1, 0), (2, 0), (50, 0), (3000, 600)):
        bits = planted_hashes(n, clustered)
        for max_bits in (0, 1, 12, 18, 25):  # exact substrings, and one bit apart
            assert index.near_groups(bits, max_bits) == reference(bits, max_bits), (n, max_bits)
    assert len(reference(planted_hashes(3000, 600), 12)) > 100
    # buckets too large to check pair by pair go through matrix products: one group against the rest
    # when they are few, every pair when they are many, and two large neighbouring buckets one against
    # the other. 900 hashes on one "background" (20 free bits) make buckets of many groups.
    monkeypatch.setattr(index, "DENSE_BUCKET", 64)
    calls = {"dense": 0, "cross": 0}
    dense, dense_pairs = index._Search.dense, index._dense_pairs

    def counted_dense(self, groups):
        calls["dense"] += 1
        return dense(self, groups)

    def counted_pairs(bits, members, max_bits, others=None):
        calls["cross"] += others is not None
        return dense_pairs(bits, members, max_bits, others=others)

    monkeypatch.setattr(index._Search, "dense", counted_dense)
    monkeypatch.setattr(index, "_dense_pairs", counted_pairs)
    bits = planted_hashes(1500, 0, seed=2)
    bits[:900, :236] = False
    for max_bits in (0, 3, 6, 12):
        assert index.near_groups(bits, max_bits) == reference(bits, max_bits), max_bits
    assert calls["dense"] > 10 and calls["cross"] > 10
    # two large groups of copies one bit apart, joined into one
    twins = np.repeat(bits[:1], 300, axis=0)
    twins[150:, 7] ^= True
    both = np.concatenate([twins, bits])
    assert index.near_groups(both, 18) == reference(both, 18)
    assert set(range(300)) <= set(index.near_groups(both, 18)[0])


def test_ranges_use_32_bit_positions_only_where_they_fit():
    import numpy as np

    from clothcli.data.near_duplicates import _ranges

    first, count = np.array([5, 0, 9]), np.array([2, 0, 3])
    small = _ranges(first, count)
    assert small.tolist() == [5, 6, 9, 10, 11] and small.dtype == np.int32
    large = _ranges(np.array([2**31 - 2, 2**33]), np.array([3, 1]))  # past int32: int64, no wrap-around
    assert large.tolist() == [2**31 - 2, 2**31 - 1, 2**31, 2**33] and large.dtype == np.int64
    assert _ranges(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).size == 0
