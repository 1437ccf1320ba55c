import json

import pytest
import timm
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from clothcli.analysis.flops import count
from clothcli.cli import app


@pytest.mark.parametrize(
    "name", ["mobilenet_v3_small", "resnet18", "efficientnet_b0", "mobilenet_v2", "regnet_y_400mf", "squeezenet1_0"]
)
def test_macs_agree_with_torchvision_metadata(name):
    published = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"]
    report = count(torchvision.models.get_model(name), (3, 224, 224))
    assert round(report.macs / 1e9, 3) == pytest.approx(published, abs=1e-9)
    # cross-check: thop's module-level count equals PyTorch's own FlopCounterMode (2 FLOPs per MAC)
    assert report.thop_macs == pytest.approx(report.flop_counter_flops / 2, rel=1e-9)


def test_attention_matmuls_are_counted():
    model = timm.create_model("test_vit", num_classes=10)
    report = count(model, (3, 160, 160))
    assert report.attention_macs > 0
    assert report.macs == pytest.approx(report.thop_macs + report.attention_macs)


def test_complete_count_includes_elementwise():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))) + x

    report = count(Block(), (4, 8, 8), depth=1)
    conv_macs = 4 * 8 * 8 * 4 * 9
    assert report.macs == conv_macs
    elements = 4 * 8 * 8
    # 2/MAC + batch norm 2/element + relu 1/element + residual add 1/element
    assert report.flops_complete == 2 * conv_macs + 2 * elements + elements + elements
    rows = {r.name: r for r in report.layers}
    assert rows["conv"].macs == conv_macs and rows["conv"].params == 144 and rows["conv"].output_shape == [1, 4, 8, 8]
    assert rows["conv"].share == 1.0


def test_cli_json_on_checkpointless_timm_model(tmp_path):
    out = tmp_path / "f.json"
    result = CliRunner().invoke(
        app, ["flops", "test_efficientnet", "--input-size", "64", "--depth", "1", "--batch", "2", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["macs"] > 0 and data["params"] > 0 and data["latency"]["ms_per_image_batch2"] > 0
    assert any(layer["name"] == "conv_stem" for layer in data["layers"])
    assert "MACs" in result.output


def test_cli_unknown_model_exit_2():
    result = CliRunner().invoke(app, ["flops", "mobilenet_v9_tiny"])
    assert result.exit_code == 2 and "unknown" in result.output
