import json

import timm
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from clothcli.analysis.rf import analytic_extent, empirical_rf, trace, verify_output
from clothcli.cli import app


def check(model, size, layer=None):
    report = trace(model, (3, size, size))
    row = next(r for r in report.layers if r.name == (layer or report.output.name))
    rows, cols, unit = empirical_rf(model, (3, size, size), layer or report.output.name)
    assert (rows, cols) == analytic_extent(row, unit, (3, size, size))
    return report, row


def test_vgg16_matches_distill_table():
    report, _ = check(torchvision.models.vgg16().features, 256)
    assert report.output.rf == (212, 212) and report.output.stride == (32, 32) and report.output.padding == (90, 90)


def test_torchvision_resnet50_and_global_pool():
    report = trace(torchvision.models.resnet50(), (3, 224, 224))
    assert report.output.name == "layer4" and report.output.rf == (427, 427) and report.output.stride == (32, 32)
    assert not report.misaligned and len(report.merges) == 16
    fc = next(r for r in report.layers if r.name == "fc")
    assert fc.global_from == "avgpool"


def test_resnet18_empirical():
    check(torchvision.models.resnet18(), 256, "layer4")


def test_squeeze_excite_is_global_with_local_field():
    model = timm.create_model("tf_mobilenetv3_small_100")
    report = trace(model, (3, 224, 224))
    assert report.output.global_from == "blocks.0.0.se"
    assert verify_output(model, report)["match"]


def test_misaligned_merge_is_reported():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(3, 4, 2, stride=2, padding=0)

        def forward(self, x):
            return self.a(x) + self.b(x)

    report = trace(Branches(), (3, 16, 16))
    assert len(report.misaligned) == 1
    # the union of both fields: [-1, 1] and [0, 1] -> 3 pixels
    assert report.output.rf == (3, 3)


def test_asymmetric_kernels_strides_dilation():
    model = nn.Sequential(
        nn.Conv2d(3, 4, (3, 5), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
        nn.MaxPool2d((2, 3), stride=(2, 1)),
        nn.Conv2d(4, 4, (1, 3), padding="same"),
    )
    _, row = check(model, 48)
    assert row.rf == (6, 13) and row.stride == (2, 2)


def test_attention_is_global():
    report = trace(timm.create_model("test_vit"), (3, 160, 160))
    assert any(r.global_from and "attn" in r.global_from for r in report.layers)


layer_spec = st.tuples(
    st.sampled_from(["conv", "maxpool", "avgpool"]),
    st.integers(1, 5),
    st.integers(1, 5),  # kernel h, w
    st.integers(1, 3),
    st.integers(1, 3),  # stride h, w
    st.integers(1, 2),  # dilation
    st.integers(0, 2),  # padding
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(layer_spec, min_size=1, max_size=5))
def test_random_stacks_analytic_equals_empirical(specs):
    layers = []
    for kind, kh, kw, sh, sw, dil, pad in specs:
        pad = min(pad, kh // 2, kw // 2)
        if kind == "conv":
            layers.append(nn.Conv2d(2, 2, (kh, kw), stride=(sh, sw), padding=pad, dilation=dil))
        elif kind == "maxpool":
            layers.append(nn.MaxPool2d((kh, kw), stride=(sh, sw), padding=pad))
        else:
            layers.append(nn.AvgPool2d((kh, kw), stride=(sh, sw), padding=pad))
        layers.append(nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 2, 1), *layers)
    size = 96
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, size, size))
    except RuntimeError:
        return  # the stack shrinks the input to nothing
    if out.shape[-1] < 1 or out.shape[-2] < 1:
        return
    report = trace(model, (3, size, size))
    assert verify_output(model, report)["match"]


def test_cli_verify_and_json(tmp_path):
    out = tmp_path / "rf.json"
    result = CliRunner().invoke(app, ["rf", "torchvision:vgg11", "--verify", "--json", str(out), "--depth", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["verify"]["match"] is True
    assert data["output"]["stride"] == [32, 32]
