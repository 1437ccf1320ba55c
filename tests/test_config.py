from pathlib import Path

import pytest

from clothcli.config import Config, load_config, parse_overrides, to_dict
from clothcli.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (REPO / "conf").glob("*.yaml") if not p.name.startswith("space-"))
)
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "conf" / name)
    assert isinstance(cfg, Config)
    assert Path(cfg.data.root).is_absolute()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "conf").glob("space-*.yaml")))
def test_shipped_search_spaces_fit_their_configs(name):
    """conf/space-NAME.yaml is the sweep space of conf/NAME.yaml: every key and end valid there."""
    from clothcli.tuning.space import read_space

    config = REPO / "conf" / name.removeprefix("space-")
    assert len(read_space(REPO / "conf" / name, config)) >= 2


def test_earlier_recipe_is_carried_over():
    cfg = load_config(REPO / "conf" / "mobilenet.yaml")
    assert cfg.model.name == "tf_mobilenetv3_small_100"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.04, 0.9, 5e-4)
    assert (cfg.schedule.name, cfg.schedule.decay_epochs, cfg.schedule.decay_rate) == ("step", 7, 0.1)
    assert (cfg.train.clip_grad, cfg.train.grad_accum, cfg.train.batch_size, cfg.train.epochs) == (2.0, 2, 256, 40)
    assert cfg.train.swa.enabled and cfg.train.swa.start == 0.8
    assert load_config(REPO / "conf" / "resnet50.yaml").model.name == "resnet50"


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, "train:\n  epocs: 3\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.epocs" in message and str(path) in message and "train.epochs" in message


def test_unknown_section(tmp_path):
    with pytest.raises(UserError, match="'modle'.*'model'"):
        load_config(write(tmp_path, "modle:\n  name: resnet50\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  epochs: many\n", "train.epochs"),
        ("train:\n  epochs: 0\n", "train.epochs"),
        ("optim:\n  lr: -1\n", "optim.lr"),
        ("train:\n  mixed_precision: fp8\n", "train.mixed_precision"),
        ("augment:\n  hflip: 1.5\n", "augment.hflip"),
        ("train:\n  channels_last: 3\n", "train.channels_last"),
        ("train: 5\n", "train"),
    ],
)
def test_wrong_types_and_ranges_name_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_python_tags_are_refused(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "name: !!python/name:os.system\n"))


def test_int_accepted_for_float(tmp_path):
    assert load_config(write(tmp_path, "optim:\n  lr: 1\n")).optim.lr == 1.0


def test_overrides_and_resolved_dict(tmp_path):
    cfg = load_config(
        write(tmp_path, "train:\n  epochs: 3\n"),
        ["train.epochs=5", "model.name=resnet50", "model.kwargs={pad_type: same}"],
    )
    assert cfg.train.epochs == 5 and cfg.model.name == "resnet50"
    assert cfg.model.kwargs == {"pad_type": "same"}
    assert to_dict(cfg)["train"]["epochs"] == 5


def test_bad_override():
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_overrides(["train.epochs"])
    with pytest.raises(UserError, match="train.epochz"):
        load_config(None, ["train.epochz=3"])


def test_paths_relative_to_config_file_and_cwd(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "exp.yaml"
    path.write_text("data:\n  root: ../data/set\n")
    assert load_config(path).data.root == str((tmp_path / "data" / "set").resolve())
    monkeypatch.chdir(tmp_path)
    assert load_config(path, ["data.root=other"]).data.root == str(tmp_path / "other")


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_no_means_the_string_no(tmp_path):
    assert load_config(write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_exponent_without_a_dot_is_a_float():
    """YAML 1.1 reads 1e-4 as a string; a float key takes it as the number a user means."""
    cfg = load_config(None, ["optim.lr=1e-3", "data.cache_max_gb=2E1"])
    assert cfg.optim.lr == 0.001 and cfg.data.cache_max_gb == 20.0
    with pytest.raises(UserError, match="must be float"):
        load_config(None, ["optim.lr=1e-3x"])
