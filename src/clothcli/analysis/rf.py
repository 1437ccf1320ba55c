"""`rf`: receptive field, effective stride and effective padding of every layer.

Following Araujo, Norris and Sim, "Computing Receptive Fields of Convolutional Neural
Networks" (Distill, 2019). Per spatial axis a feature map carries:

- r: receptive field size of one unit, in input pixels;
- j: effective stride (input pixels between neighbouring units);
- c: centre of the first unit's receptive field, in input pixel coordinates.

A convolution or pooling with kernel k, stride s, dilation d and left padding p maps
(r, j, c) to (r + (d(k-1)) j, j s, c + (d(k-1)/2 - p) j); the effective padding is (r-1)/2 - c.

The model is run once under a TorchFunctionMode that follows every tensor through the real
forward pass, so branches are seen as they are: at a merge (add, multiply, concatenation) the
receptive field is the union of the inputs' fields (the largest, when they are centred alike),
and inputs whose stride or centre differ are reported as a misaligned merge. Operations with
global context (global pooling, as in squeeze-excite; attention over all tokens; a linear layer
over flattened positions) make the field the whole input: the layer is reported as "global",
and the local field, with those global branches ignored, is given beside it.

One module on purpose: the tracing mode, the per-operation rules and the gradient check share the
(r, j, c) arithmetic above, and split apart each would need the others' internals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from clothcli.analysis.tracking import ModuleTracking


@dataclass(frozen=True)
class Axis:
    r: float
    j: float
    c: float

    @property
    def padding(self) -> float:
        return (self.r - 1) / 2 - self.c


@dataclass
class RF:
    """Receptive-field state of one tensor."""

    h: Axis | None
    w: Axis | None
    spatial: tuple[int, int] | None  # tensor dims holding (H, W); None once positions are mixed/flattened
    global_from: str | None = None  # first layer whose output saw the whole input


@dataclass
class Merge:
    layer: str
    op: str
    aligned: bool
    detail: str


@dataclass
class LayerRF:
    name: str
    type: str
    rf: tuple[float, float] | None
    stride: tuple[float, float] | None
    padding: tuple[float, float] | None
    centre: tuple[float, float] | None
    global_from: str | None
    output_shape: list[int]


@dataclass
class RFReport:
    model: str
    input_size: tuple[int, int, int]
    layers: list[LayerRF] = field(default_factory=list)
    output: LayerRF | None = None
    merges: list[Merge] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)

    @property
    def misaligned(self) -> list[Merge]:
        return [m for m in self.merges if not m.aligned]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["misaligned"] = [asdict(m) for m in self.misaligned]
        return out


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) >= 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def _apply(axis: Axis, k: int, s: int, p: int, d: int) -> Axis:
    span = d * (k - 1)
    return Axis(axis.r + span * axis.j, axis.j * s, axis.c + (span / 2 - p) * axis.j)


def _union(axes: list[Axis]) -> Axis:
    lo = min(a.c - (a.r - 1) / 2 for a in axes)
    hi = max(a.c + (a.r - 1) / 2 for a in axes)
    return Axis(hi - lo + 1, axes[0].j, (lo + hi) / 2)


ROOT = "(model output)"
GLOBAL_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm"}
MERGES = {
    "add",
    "__add__",
    "__radd__",
    "__iadd__",
    "sub",
    "__sub__",
    "__rsub__",
    "mul",
    "__mul__",
    "__rmul__",
    "__imul__",
    "div",
    "__truediv__",
    "__rtruediv__",
    "where",
    "cat",
    "concat",
    "stack",
    "maximum",
    "minimum",
    "addcmul",
    "lerp",
    "add_",
    "mul_",
}
MIXERS = {"matmul", "__matmul__", "bmm", "baddbmm", "scaled_dot_product_attention", "einsum"}


class RFTracer(ModuleTracking, TorchFunctionMode):
    """Propagates RF states through a forward pass and records each module's output."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[int, RF] = {}
        self.keep: list[torch.Tensor] = []
        self.merges: list[Merge] = []
        self.unsupported: list[str] = []

    # -- bookkeeping ----------------------------------------------------------------------------
    def state(self, t: Any) -> RF | None:
        return self.states.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set(self, t: Any, rf: RF) -> None:
        if isinstance(t, torch.Tensor):
            self.states[id(t)] = rf
            self.keep.append(t)
        elif isinstance(t, (tuple, list)):
            for item in t:
                self.set(item, rf)

    def layer(self) -> str:
        names = [p for p in self.tracker.parents if p != "Global"]
        if not names:
            return "input"
        deepest = max(names, key=len)
        return deepest.split(".", 1)[1] if "." in deepest else deepest  # drop the root class name

    # -- propagation ------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        flat = [a for a in _flatten(list(args) + list(kwargs.values())) if isinstance(a, torch.Tensor)]
        inputs = [(t, self.state(t)) for t in flat if self.state(t) is not None]
        if not inputs or not isinstance(out, (torch.Tensor, tuple, list)):
            return out
        rf = self._propagate(name, func, args, kwargs, inputs, out)
        if rf is not None:
            self.set(out, rf)
        return out

    def _propagate(self, name, func, args, kwargs, inputs, out) -> RF | None:
        x, state = inputs[0]
        if func in (F.conv1d, F.conv2d, F.conv3d, torch.conv2d, torch.convolution):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            stride = _pair(_arg(args, kwargs, 3, "stride", 1))
            dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
            padding = _arg(args, kwargs, 4, "padding", 0)
            kernel = (int(weight.shape[-2]), int(weight.shape[-1])) if weight.dim() == 4 else (1, int(weight.shape[-1]))
            if isinstance(padding, str):
                pads = [(dilation[i] * (kernel[i] - 1)) // 2 if padding == "same" else 0 for i in range(2)]
            else:
                pads = list(_pair(padding))
            return self._window(state, kernel, stride, pads, dilation)
        if name in ("max_pool2d", "avg_pool2d", "max_pool2d_with_indices", "lp_pool2d"):
            kernel = _pair(_arg(args, kwargs, 1, "kernel_size", 1))
            stride_arg = _arg(args, kwargs, 2, "stride", None)
            stride = _pair(stride_arg) if stride_arg not in (None, [], ()) else kernel
            pads = list(_pair(_arg(args, kwargs, 3, "padding", 0)))
            dilation = _pair(_arg(args, kwargs, 4, "dilation", 1)) if "max" in name else (1, 1)
            return self._window(state, kernel, stride, pads, dilation)
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
            first = out[0] if isinstance(out, tuple) else out
            if state.spatial is None or first.shape[-1] * first.shape[-2] == 1:
                return self._global(state, keep_spatial=first.dim() == 4)
            # an adaptive pool to n x n is a window of ceil(in/n) with stride floor(in/n) (exact when divisible)
            ins = (x.shape[-2], x.shape[-1])
            outs = (first.shape[-2], first.shape[-1])
            if any(i % o for i, o in zip(ins, outs)):
                self.unsupported.append(f"{self.layer()}: adaptive pooling {ins} -> {outs} has uneven windows")
            kernel = tuple(-(-i // o) for i, o in zip(ins, outs))
            stride = tuple(max(1, i // o) for i, o in zip(ins, outs))
            return self._window(state, kernel, stride, [0, 0], (1, 1))
        if name == "pad":
            pad = list(_arg(args, kwargs, 1, "pad", []))
            if state.spatial and len(pad) >= 2:
                left_w = pad[0]
                top_h = pad[2] if len(pad) >= 4 else 0
                h = Axis(state.h.r, state.h.j, state.h.c - top_h * state.h.j) if state.h else None
                w = Axis(state.w.r, state.w.j, state.w.c - left_w * state.w.j) if state.w else None
                return RF(h, w, state.spatial, state.global_from)
            return state
        if name in GLOBAL_REDUCTIONS:
            dims = _arg(args, kwargs, 1, "dim", None)
            if dims is None and name in ("mean", "sum", "amax", "max", "min", "amin", "norm", "std", "var"):
                return self._global(state, keep_spatial=False)
            dims = {d % x.dim() for d in ((dims,) if isinstance(dims, int) else tuple(dims or ()))}
            if state.spatial and dims & set(state.spatial):
                keep = bool(_arg(args, kwargs, 2, "keepdim", False))
                return self._global(state, keep_spatial=keep)
            return state
        if name in MERGES:
            return self._merge(name, inputs, out)
        if name in MIXERS:
            if len(inputs) >= 2 or name == "scaled_dot_product_attention":
                return self._global(self._merge(name, inputs, out, record=False), keep_spatial=False)
            return self._positions_lost(state)
        if name in ("linear",):
            if state.spatial and x.dim() - 1 in state.spatial:
                return self._global(state, keep_spatial=False)
            return state
        if name in ("permute", "transpose", "swapaxes", "movedim"):
            if not state.spatial:
                return state
            order = _permute_dims(name, args, kwargs, x.dim())
            return RF(state.h, state.w, tuple(order.index(d) for d in state.spatial), state.global_from)
        if name in ("flatten", "reshape", "view", "unflatten", "squeeze", "unsqueeze"):
            return RF(state.h, state.w, _reshape_keep(state, x, out), state.global_from)
        if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
            self.unsupported.append(f"{self.layer()}: {name} (treated as identity)")
            return state
        if name in ("softmax", "log_softmax") and state.spatial:
            dim = _arg(args, kwargs, 1, "dim", -1)
            if dim is not None and dim % x.dim() in state.spatial:
                return self._global(state, keep_spatial=True)
        return state  # pointwise: activations, normalisation over channels, dropout, casts, copies

    def _window(self, state: RF, kernel, stride, pads, dilation) -> RF:
        if not state.spatial:
            return state
        h = _apply(state.h, kernel[0], stride[0], pads[0], dilation[0]) if state.h else None
        w = _apply(state.w, kernel[1], stride[1], pads[-1], dilation[1]) if state.w else None
        return RF(h, w, state.spatial, state.global_from)

    def _global(self, state: RF, keep_spatial: bool) -> RF:
        return RF(state.h, state.w, state.spatial if keep_spatial else None, state.global_from or self.layer())

    def _positions_lost(self, state: RF) -> RF:
        return RF(state.h, state.w, None, state.global_from)

    def _merge(self, op: str, inputs: list[tuple[torch.Tensor, RF]], out: Any, record: bool = True) -> RF:
        states = [st for _, st in inputs]
        global_from = next((st.global_from for st in states if st.global_from), None)
        out_t = out[0] if isinstance(out, (tuple, list)) else out
        # A globally pooled branch broadcast over positions (squeeze-excite) adds no local field.
        local = [st for t, st in inputs if st.h is not None and not (st.global_from and _broadcast(t, st, out_t))]
        if not local:
            return RF(None, None, None, global_from)
        if len(local) == 1:
            base = local[0]
            return RF(base.h, base.w, base.spatial, global_from)
        axes_h = [st.h for st in local]
        axes_w = [st.w for st in local]
        aligned = all(a.j == axes_h[0].j and a.c == axes_h[0].c for a in axes_h) and all(
            a.j == axes_w[0].j and a.c == axes_w[0].c for a in axes_w
        )
        if record:
            detail = "; ".join(f"r={st.h.r:g}x{st.w.r:g} j={st.h.j:g} c=({st.h.c:g},{st.w.c:g})" for st in local)
            self.merges.append(Merge(self.layer(), op, aligned, detail))
        spatial = next((st.spatial for st in local if st.spatial), None)
        return RF(_union(axes_h), _union(axes_w), spatial, global_from)


def _broadcast(t: torch.Tensor, state: RF, out: Any) -> bool:
    """True when `t` has no positions of its own in `out` (1x1, or positions lost)."""
    if state.spatial is None:
        return True
    if not isinstance(out, torch.Tensor) or out.dim() != t.dim():
        return False
    return all(t.shape[d] == 1 and out.shape[d] > 1 for d in state.spatial)


def _arg(args, kwargs, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _flatten(items: list) -> list:
    out = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(list(item)))
        else:
            out.append(item)
    return out


def _permute_dims(name: str, args, kwargs, ndim: int) -> list[int]:
    order = list(range(ndim))
    if name == "permute":
        dims = args[1:] if len(args) > 1 else kwargs.get("dims")
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
        return [d % ndim for d in dims]
    if name in ("transpose", "swapaxes"):
        a, b = (_arg(args, kwargs, 1, "dim0", 0) % ndim, _arg(args, kwargs, 2, "dim1", 1) % ndim)
        order[a], order[b] = order[b], order[a]
        return order
    return order


def _reshape_keep(state: RF, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int] | None:
    """Where the spatial dims went, if the reshape kept them as separate dims."""
    if not isinstance(out, torch.Tensor) or not state.spatial:
        return None
    hs, ws = x.shape[state.spatial[0]], x.shape[state.spatial[1]]
    before = math.prod(x.shape[: state.spatial[0]])
    for i in range(out.dim() - 1):
        if out.shape[i] == hs and out.shape[i + 1] == ws and math.prod(out.shape[:i]) == before:
            return (i, i + 1)
    return None


def trace(model: nn.Module, input_size: tuple[int, int, int], name: str = "") -> RFReport:
    """Analytic receptive fields of every module output (one forward pass on zeros)."""
    model = model.eval()
    x = torch.zeros(1, *input_size)
    report = RFReport(model=name or type(model).__name__, input_size=tuple(input_size))
    outputs: list[tuple[str, nn.Module, Any]] = []
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: outputs.append((n or ROOT, mod, o)))
        for n, m in model.named_modules()
    ]
    tracer = RFTracer()
    tracer.set(x, RF(Axis(1, 1, 0), Axis(1, 1, 0), (2, 3)))
    try:
        with torch.no_grad(), tracer:
            model(x)
    finally:
        for h in handles:
            h.remove()
    seen = set()
    for module_name, module, out in outputs:
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        state = tracer.state(first)
        if state is None or module_name in seen:
            continue
        seen.add(module_name)
        report.layers.append(_row(module_name, module, first, state))
    order = {n or ROOT: i for i, (n, _) in enumerate(model.named_modules())}
    order[ROOT] = len(order)  # the model's own output comes last
    report.layers.sort(key=lambda r: order.get(r.name, len(order)))
    report.merges = tracer.merges
    report.unsupported = tracer.unsupported
    # adaptive pools resample to a fixed size, so their field depends on the input size: not "the" output
    spatial = [
        r
        for r in report.layers
        if r.rf is not None
        and len(r.output_shape) == 4
        and r.output_shape[-1] > 1
        and not r.type.startswith("Adaptive")
    ]
    if spatial:
        # the overall field: the last feature map that still has positions (before global pooling)
        last_shape_layers = [r for r in spatial if r.name.count(".") == min(s.name.count(".") for s in spatial)]
        report.output = last_shape_layers[-1] if last_shape_layers else spatial[-1]
    return report


def _row(name: str, module: nn.Module, out: Any, state: RF) -> LayerRF:
    shape = list(out.shape) if isinstance(out, torch.Tensor) else []
    if state.h is None:
        return LayerRF(name, type(module).__name__, None, None, None, None, state.global_from, shape)
    return LayerRF(
        name,
        type(module).__name__,
        (state.h.r, state.w.r),
        (state.h.j, state.w.j),
        (state.h.padding, state.w.padding),
        (state.h.c, state.w.c),
        state.global_from,
        shape,
    )


# -- empirical check ---------------------------------------------------------------------------------


class _VerifyMode(TorchFunctionMode):
    """Forward pass for the gradient check: max pooling becomes average pooling (a max routes the
    gradient to one input only), activations become identities (no saturation), normalisation is
    skipped, and global reductions are detached so the local field is what gets measured."""

    ACTIVATIONS: ClassVar[set[str]] = {
        "relu",
        "relu6",
        "hardswish",
        "hardsigmoid",
        "sigmoid",
        "silu",
        "gelu",
        "tanh",
        "leaky_relu",
        "elu",
        "hardtanh",
        "mish",
        "softplus",
        "relu_",
        "hardswish_",
        "silu_",
        "sigmoid_",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("max_pool2d", "max_pool2d_with_indices"):
            kernel = _arg(args, kwargs, 1, "kernel_size", 1)
            stride = _arg(args, kwargs, 2, "stride", None) or kernel
            padding = _arg(args, kwargs, 3, "padding", 0)
            dilation = _pair(_arg(args, kwargs, 4, "dilation", 1))
            if dilation != (1, 1):
                return func(*args, **kwargs)
            return F.avg_pool2d(
                args[0],
                kernel,
                stride,
                padding,
                ceil_mode=bool(kwargs.get("ceil_mode", False)),
                count_include_pad=False,
            )
        if name in self.ACTIVATIONS:
            return args[0]
        if name in ("batch_norm", "layer_norm", "group_norm", "instance_norm"):
            return args[0]
        if name == "adaptive_max_pool2d":
            func, name = F.adaptive_avg_pool2d, "adaptive_avg_pool2d"
            args = args[:2]
        out = func(*args, **kwargs)
        if (name == "adaptive_avg_pool2d" and out.shape[-1] * out.shape[-2] == 1) or (
            name in GLOBAL_REDUCTIONS
            and isinstance(out, torch.Tensor)
            and out.dim() >= 3
            and out.shape[-1] == 1
            and out.shape[-2] == 1
        ):
            return out.detach()
        return out


def empirical_rf(
    model: nn.Module, input_size: tuple[int, int, int], layer: str | None = None
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Measure the field of the centre unit of `layer` (default: the model output if it is a
    feature map) from the non-zero gradient of the input: constant positive weights, float64.

    Returns (rows spanned, cols spanned, centre unit index)."""
    import copy

    probe = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for module in probe.modules():
            for pname, p in module.named_parameters(recurse=False):
                if pname == "weight" and p.dim() > 1:
                    p.fill_(1.0 / max(1, p[0].numel()))
                elif pname == "bias":
                    p.zero_()
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if layer and layer != ROOT:
        modules = dict(probe.named_modules())
        handle = modules[layer].register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    x = torch.ones(1, *input_size, dtype=torch.float64, requires_grad=True)
    with _VerifyMode():
        out = probe(x)
    if handle:
        handle.remove()
        out = captured["out"]
    if out.dim() != 4:
        raise ValueError("the chosen output has no spatial positions")
    ch, cw = out.shape[-2] // 2, out.shape[-1] // 2
    out[0, :, ch, cw].sum().backward()
    grad = x.grad[0].abs().sum(0)
    rows = torch.nonzero(grad.sum(1) > 0).flatten()
    cols = torch.nonzero(grad.sum(0) > 0).flatten()
    return (int(rows.min()), int(rows.max())), (int(cols.min()), int(cols.max())), (ch, cw)


def analytic_extent(
    row: LayerRF, unit: tuple[int, int], input_size: tuple[int, int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Input rows/cols covered by unit (i, j) of a layer, clipped to the image."""
    out = []
    for axis, idx, limit in ((0, unit[0], input_size[1]), (1, unit[1], input_size[2])):
        centre = row.centre[axis] + idx * row.stride[axis]
        half = (row.rf[axis] - 1) / 2
        lo, hi = math.ceil(centre - half), math.floor(centre + half)
        out.append((max(0, lo), min(limit - 1, hi)))
    return out[0], out[1]


def verify_output(model: nn.Module, report: RFReport) -> dict[str, Any]:
    """Empirical check of the overall field, on an input large enough to hold it whole."""
    if report.output is None:
        raise ValueError("no layer with spatial positions to verify")
    row = report.output
    c, h, w = report.input_size
    # big enough that the centre unit's whole field lies inside the image (no clipping)
    need = int(max(row.rf) + 4 * max(row.stride) + 2 * max(abs(p) for p in row.padding) + 1)
    side = max(h, w, need)
    side += (-side) % int(max(row.stride))
    size = (c, side, side)
    fresh = trace(model, size)
    at_size = next(r for r in fresh.layers if r.name == row.name)
    rows, cols, unit = empirical_rf(model, size, row.name)
    expected = analytic_extent(at_size, unit, size)
    return {
        "layer": row.name,
        "input_size": list(size),
        "unit": list(unit),
        "empirical": [list(rows), list(cols)],
        "analytic": [list(expected[0]), list(expected[1])],
        "match": (rows, cols) == expected,
    }
