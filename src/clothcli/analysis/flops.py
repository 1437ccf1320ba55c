"""`flops`: per-layer MACs and parameters, with the counting conventions spelled out.

Two counts:

(a) **MACs**: multiply-accumulates of convolutions and linear layers (thop, bias excluded, with
    rules registered for every Conv/Linear subclass a model uses), plus the matrix products
    inside attention, which are not modules thop can see (counted at the aten level with
    PyTorch's own flop formulas). This is the convention of torchvision's published
    `weights.meta["_ops"]` and equals `FlopCounterMode` total / 2.
(b) **complete FLOPs**: 2 per MAC of (a), plus every other arithmetic op at the aten level:
    1 per output element for elementwise ops (add, mul, activations, ...), 2 per element for
    inference normalisation (scale and shift), 1 per input element for pooling and reductions,
    3 per element for softmax. Data movement (view, cat, copy) counts 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import thop
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from clothcli.analysis.tracking import ModuleTracking
from clothcli.timing import steady_seconds

MATMUL_OPS = {
    "convolution",
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
    "convolution_backward",
}
ELEMENTWISE_1 = {
    "add",
    "sub",
    "mul",
    "div",
    "relu",
    "relu6",
    "hardtanh",
    "hardswish",
    "hardsigmoid",
    "sigmoid",
    "silu",
    "gelu",
    "tanh",
    "leaky_relu",
    "elu",
    "clamp",
    "clamp_min",
    "clamp_max",
    "exp",
    "rsqrt",
    "sqrt",
    "pow",
    "neg",
    "abs",
    "where",
    "maximum",
    "minimum",
    "erf",
    "log",
    "reciprocal",
    "mish",
    "softplus",
    "addcmul",
    "lerp",
}
NORMS = {
    "native_batch_norm",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "native_layer_norm",
    "native_group_norm",
    "batch_norm",
}
POOL_REDUCE = {
    "mean",
    "sum",
    "amax",
    "max_pool2d_with_indices",
    "avg_pool2d",
    "_adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "max_pool2d",
    "adaptive_avg_pool2d",
    "std",
    "var",
    "var_mean",
    "logsumexp",
}
SOFTMAX = {"_softmax", "softmax", "_log_softmax"}


def _numel(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(v) for v in x)
    return 0


class OpCounter(ModuleTracking, TorchDispatchMode):
    """Counts MACs (matrix-product class) and complete FLOPs per module, at the aten level."""

    def __init__(self) -> None:
        super().__init__()
        self.macs: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__.rstrip("_")
        macs = 0.0
        flops = 0.0
        if name.startswith("_scaled_dot_product") and func.overloadpacket not in flop_registry:
            # e.g. the CPU flash-attention kernel, which has no formula in torch.utils.flop_counter
            q, k, v = args[:3]
            macs = q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            flops = 2 * macs + 5 * q.shape[:-1].numel() * k.shape[-2]  # + scale and softmax
        elif func.overloadpacket in flop_registry and name in MATMUL_OPS:
            macs = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) / 2
            flops = 2 * macs
            if name in ("addmm", "baddbmm") or (name == "convolution" and len(args) > 2 and args[2] is not None):
                flops += _numel(out)
        elif name in ELEMENTWISE_1:
            flops = _numel(out)
        elif name in NORMS:
            flops = 2 * _numel(out[0] if isinstance(out, tuple) else out)
        elif name in POOL_REDUCE:
            flops = _numel(args[0])
        elif name in SOFTMAX:
            flops = 3 * _numel(out)
        for parent in set(self.tracker.parents):
            self.macs[parent] += macs
            self.flops[parent] += flops
        return out


def _conv_macs(m: nn.Module, x: tuple, y: torch.Tensor) -> None:
    m.total_ops += torch.DoubleTensor([y.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)])


def _linear_macs(m: nn.Module, x: tuple, y: torch.Tensor) -> None:
    m.total_ops += torch.DoubleTensor([y.numel() * m.in_features])


def _zero(m: nn.Module, x: tuple, y: Any) -> None:
    pass


def thop_rules(model: nn.Module) -> dict[type, Any]:
    """thop matches exact types: register conv/linear rules for every subclass the model uses."""
    rules: dict[type, Any] = {}
    for module in model.modules():
        kind = type(module)
        if isinstance(module, nn.modules.conv._ConvNd):
            rules[kind] = _conv_macs
        elif isinstance(module, nn.Linear):
            rules[kind] = _linear_macs
        elif not any(True for _ in module.children()):
            rules[kind] = _zero  # leaves only: thop does not descend into modules it has a rule for
    return rules


@dataclass
class LayerRow:
    name: str
    type: str
    output_shape: list[int] | None
    macs: float
    params: int
    flops_complete: float
    share: float = 0.0


@dataclass
class FlopsReport:
    model: str
    input_size: tuple[int, int, int]
    macs: float
    thop_macs: float
    attention_macs: float
    flop_counter_flops: float
    flops_complete: float
    params: int
    size_mb: float
    layers: list[LayerRow] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    conventions: str = __doc__.split("Two counts:", 1)[1].strip()

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _flatten_thop(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for name, (ops, _params, children) in tree.items():
        full = f"{prefix}.{name}" if prefix else name
        out[full] = ops
        out.update(_flatten_thop(children, full))
    return out


def count(model: nn.Module, input_size: tuple[int, int, int], depth: int = 2, name: str = "") -> FlopsReport:
    """All counts for one image of `input_size` (C, H, W); per-layer rows down to `depth`."""
    model = model.eval()
    x = torch.zeros(1, *input_size)
    shapes: dict[str, list[int]] = {}
    handles = []
    named = dict(model.named_modules())
    for module_name, module in named.items():
        if module_name and module_name.count(".") < depth:

            def hook(mod, inp, out, module_name=module_name):
                first = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(first, torch.Tensor):
                    shapes[module_name] = list(first.shape)

            handles.append(module.register_forward_hook(hook))
    try:
        total_thop, _, tree = thop.profile(
            model, inputs=(x,), custom_ops=thop_rules(model), verbose=False, ret_layer_info=True
        )
    finally:
        for h in handles:
            h.remove()
    thop_per_layer = _flatten_thop(tree)
    # Grad enabled: under no_grad, nn.MultiheadAttention takes a fused fast path that neither
    # PyTorch's flop formulas nor thop know, and its matrix products would go uncounted.
    counter = OpCounter()
    with torch.enable_grad(), counter:
        model(x)
    flop_mode = FlopCounterMode(display=False)
    with torch.enable_grad(), flop_mode:
        model(x)
    root = type(model).__name__
    dispatch_macs = counter.macs.get(root, 0.0)
    attention = max(0.0, dispatch_macs - total_thop)
    params = sum(p.numel() for p in model.parameters())
    size_mb = (
        sum(p.numel() * p.element_size() for p in model.parameters())
        + sum(b.numel() * b.element_size() for b in model.buffers())
    ) / 2**20
    report = FlopsReport(
        model=name or root,
        input_size=tuple(input_size),
        macs=total_thop + attention,
        thop_macs=total_thop,
        attention_macs=attention,
        flop_counter_flops=float(flop_mode.get_total_flops()),
        flops_complete=counter.flops.get(root, 0.0),
        params=params,
        size_mb=size_mb,
    )
    for module_name, module in named.items():
        if not module_name or module_name.count(".") >= depth:
            continue
        key = f"{root}.{module_name}"
        thop_macs = thop_per_layer.get(module_name, 0.0)
        layer_attention = max(0.0, counter.macs.get(key, 0.0) - thop_macs)
        macs = thop_macs + layer_attention
        report.layers.append(
            LayerRow(
                name=module_name,
                type=type(module).__name__,
                output_shape=shapes.get(module_name),
                macs=macs,
                params=sum(p.numel() for p in module.parameters()),
                flops_complete=counter.flops.get(key, 0.0),
                share=macs / report.macs if report.macs else 0.0,
            )
        )
    return report


def steady_latency(
    model: Any, input_size: tuple[int, int, int], batch: int, device: Any, warmup_s: float = 0.3, measure_s: float = 1.0
) -> float:
    """Milliseconds per image at `batch` (`timing.steady_seconds` of one forward pass, GPU work included)."""
    device = torch.device(device)
    images = torch.randn(batch, *input_size, device=device).contiguous(memory_format=torch.channels_last)

    def once() -> None:
        model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        return steady_seconds(once, warmup_s, measure_s) / batch * 1000


def measure_latency(
    model: nn.Module, input_size: tuple[int, int, int], batch: int = 32, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Milliseconds per image at batch 1 and at `batch`, channels_last in eval mode (`steady_latency`)."""
    device = torch.device(device)
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    return {f"ms_per_image_batch{n}": steady_latency(model, input_size, n, device) for n in (1, batch)}
