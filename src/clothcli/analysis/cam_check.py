"""Do the maps mean something? The model-parameter randomisation test of Adebayo et al. (2018).

Maps that look the same for a trained model and for the same architecture with random weights show
the input's edges, not what the model learnt. The test re-initialises the network from the head
down, one group of layers more at each step (cascading), and compares each step's maps with the
trained model's by Spearman rank correlation, per image. The verdict is read at the step where the
layer the maps are drawn at, and everything above it, is random: a mean correlation below 0.5 there
says the maps depend on what was learnt. (Before that step EigenCAM cannot change at all: it reads
the layer's activations only, and nothing above the layer shapes them.)

A group is a top-level block (`blocks.5`, `layer4.1`) or a module of its own (`conv_head`,
`classifier`), in the order the forward pass runs them. Re-initialising calls each module's own
`reset_parameters` (PyTorch's default initialisation; batch norms back to identity statistics).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from clothcli.analysis.cam import CamMaker

PASS_BELOW = 0.5


@dataclass
class CascadeStep:
    """The maps once `group`, and every group above it, is re-initialised."""

    group: str
    spearman: float | None  # mean over images of the rank correlation with the trained model's maps
    constant_maps: int  # the random model's maps of one value (no ranking to agree with: correlation 0)


@dataclass
class RandomisationCheck:
    method: str
    layer: str
    images: int
    steps: list[CascadeStep] = field(default_factory=list)
    verdict_step: int = 0  # index into steps: the step where the layer and all above it are random
    spearman: float | None = None  # the mean correlation at that step
    passed: bool | None = None  # None: undecided, every trained map is of one value (a 1 x 1 map, say)
    limit: float = PASS_BELOW
    constant_trained: int = 0  # the trained model's maps of one value: left out (nothing to rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _group_key(model: nn.Module, name: str) -> str:
    """`blocks.5.0.conv_pw` -> `blocks.5` (a block of a container); `conv_head` -> `conv_head`."""
    parts = name.split(".")
    top = model.get_submodule(parts[0])
    if isinstance(top, (nn.Sequential, nn.ModuleList)) and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def cascade_groups(model: nn.Module, layer: str, images: torch.Tensor) -> tuple[list[str], int]:
    """The parameter groups from the head down (the reverse of the order the forward pass runs them),
    and how many of them lie inside or above `layer` (the steps before the verdict)."""
    order: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            hooks.append(module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name)))
    layer_done: list[int] = []
    hooks.append(model.get_submodule(layer).register_forward_hook(lambda *_: layer_done.append(len(order))))
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[str] = []
    above: set[str] = set()
    for position, name in enumerate(order):
        key = _group_key(model, name)
        if key not in groups:
            groups.append(key)
        if name == layer or name.startswith(layer + ".") or position >= layer_done[0]:
            above.add(key)
    groups.reverse()
    return groups, len([g for g in groups if g in above])


def reinitialise(module: nn.Module, seed: int) -> None:
    """Every submodule's own default initialisation, seeded (the same random model on every run)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for sub in module.modules():
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset()
                elif isinstance(sub, nn.modules.batchnorm._NormBase):
                    sub.reset_running_stats()
    finally:
        torch.random.set_rng_state(generator_state)


def rank_correlation(trained: np.ndarray, other: np.ndarray) -> float:
    """Spearman's rho of a trained model's map (not constant) and another's; 0 when the other is constant
    (it ranks nothing, so it agrees with nothing)."""
    from scipy.stats import spearmanr

    if np.ptp(other) == 0:
        return 0.0
    return float(spearmanr(trained.ravel(), other.ravel()).statistic)


def randomisation_check(
    model: nn.Module,
    layer: str,
    method: str,
    images: torch.Tensor,
    classes: Sequence[int],
    seed: int = 0,
    depth: int | None = None,
) -> RandomisationCheck:
    """The cascading randomisation test on `images` (normalised, on the model's device), with the maps
    of `classes` (the trained model's predictions) at every step; with `depth`, the first `depth` steps
    only (at least as far as the verdict)."""
    with CamMaker(model, layer, method) as maker:
        trained = maker.maps(images, classes)
    groups, verdict_steps = cascade_groups(model, layer, images)
    varied = [i for i, m in enumerate(trained) if np.ptp(m) > 0]
    found = RandomisationCheck(method, layer, len(images), constant_trained=len(trained) - len(varied))
    randomised = copy.deepcopy(model)
    if depth is not None:
        groups = groups[: max(depth, verdict_steps)]
    for step, group in enumerate(groups):
        reinitialise(randomised.get_submodule(group), seed + step)
        with CamMaker(randomised, layer, method) as maker:
            maps = maker.maps(images, classes)
        rhos = [rank_correlation(trained[i], maps[i]) for i in varied]
        constant = sum(1 for i in varied if np.ptp(maps[i]) == 0)
        found.steps.append(CascadeStep(group, float(np.mean(rhos)) if rhos else None, constant))
    found.verdict_step = max(0, verdict_steps - 1)
    found.spearman = found.steps[found.verdict_step].spearman if found.steps else None
    found.passed = None if found.spearman is None else found.spearman < PASS_BELOW
    return found
