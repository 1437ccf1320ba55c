"""Batch-norm folding: same outputs, fewer modules, and no fold where the structure forbids it."""

import timm
import torch
from torch import nn

from clothcli.models.fusion import fuse_batchnorm, prepare_for_inference


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial statistics, so a wrong fold cannot hide behind identity norms."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model.eval()


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_timm_model_folds_every_conv_norm_pair_with_the_same_outputs():
    model = _randomise_norms(timm.create_model("test_efficientnet", num_classes=3))
    before = _norms(model)
    fused, folded = fuse_batchnorm(model, torch.randn(1, 3, 32, 32))
    assert folded == before > 0
    assert _norms(fused) == 0
    assert _norms(model) == before, "the original model is left as it was"
    images = torch.randn(4, 3, 40, 40)
    with torch.inference_mode():
        torch.testing.assert_close(fused(images), model(images), rtol=1e-4, atol=1e-4)


class ResidualAroundNorm(nn.Module):
    """The conv's output also feeds the residual: folding the norm would change that branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """One conv used twice, each time followed by a different norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))


class NormBeforeConv(nn.Module):
    """Pre-activation order: no conv feeds a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_structures_that_cannot_be_folded_are_returned_unchanged():
    sample = torch.randn(2, 3, 8, 8)
    for model in (ResidualAroundNorm(), SharedConv(), NormBeforeConv()):
        model = _randomise_norms(model)
        fused, folded = fuse_batchnorm(model, sample)
        assert (fused, folded) == (model, 0), type(model).__name__


def test_prepare_for_inference_gives_channels_last_eval_model_with_the_same_outputs():
    model = _randomise_norms(timm.create_model("test_efficientnet", num_classes=3)).train()
    reference = timm.create_model("test_efficientnet", num_classes=3)
    reference.load_state_dict(model.state_dict())
    prepared = prepare_for_inference(model, 32)
    assert not prepared.training and _norms(prepared) == 0
    assert prepared.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(images), reference.eval()(images), rtol=1e-4, atol=1e-4)
