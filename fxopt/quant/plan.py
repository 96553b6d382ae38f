"""Where the int8 regions of a graph are, on which grids, and the float model they simulate.

``quantize_int8`` decides in three steps, all on the float graph (after ``fuse_act``):

1. :func:`find_layers`: the quantizable layers (``nn.Conv2d`` / ``nn.Linear`` calls and the
   fused ``conv2d_act`` / ``linear_act`` ops, grouped and depthwise convolutions included).
2. :func:`make_plan` for a chosen set of layers: which values are int8, and each layer's
   bias on its int32 accumulator grid (``x_scale * w_scale``, what int8 kernels add, ONNX
   Runtime's QLinearConv included: ``fxopt.quant.qparams.on_accumulator_grid``). A quantized
   layer's output is int8; max pooling, flatten/reshape, windowed average pooling (DenseNet's
   transitions) and nearest-neighbour upsampling (FPN and U-Net decoders, YOLO necks) of an
   int8 value stay int8 on its grid; adaptive average pooling (the global pool before a
   classifier) of an int8 value is int8 on its own observed grid (an ``own_grid`` row: the
   average of a wide, sparse activation spans a small part of its input's range, and on the
   input's grid most pooled codes equal the zero point: 13.3 dB SQNR on such a CNN, 32.8 dB
   on its own grid, ``tests/fxopt/quant/test_int8_accuracy.py``); an add of two int8 values,
   a product of two int8 values (broadcasting: a squeeze-excitation gate ``x * gate``), a
   concatenation of int8 values, or an eval BatchNorm of an int8 value (one no convolution
   absorbed: DenseNet's after each concat), is int8 on its own observed grid; a ReLU that is
   such a BatchNorm's only reader is its clamp (the pair on the ReLU's grid, PyTorch's
   ``batch_norm2d_relu``). A layer with a fused
   residual (``act(conv(x) + r)``) is split: the convolution writes int8 on a grid of its own
   (the *pre-add* value), then an int8 add with the activation, as PyTorch's quantized kernels
   and ONNX QDQ want it. A float value read by a quantized op is
   quantized on its observed grid (a region entry); an int8 value read by a float op is
   dequantized (an exit).
3. ``fxopt.quant.simulate.SimulatedInt8``: the reference of DESIGN.md section 4, the float
   graph run with fake quantization wherever the plan puts int8.

Every grid comes from one calibration over all candidate values (:func:`observed_values`),
so plans for different layer sets (the sensitivity search) share it.

    >>> layers = find_layers(gm)
    >>> plan = make_plan(gm, layers, grids)       # grids: value key -> QParams
    >>> SimulatedInt8(gm, plan)(x)                # the fake-quant model
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.graph import get_attr_value, module_path
from fxopt.ops.fused import CONV2D_ACT, LINEAR_ACT
from fxopt.ir.activations import ACTIVATIONS
from fxopt.ops.int8 import (ACTIVATION_INT8, AVG_POOL2D_INT8, AVGPOOL_INT8, MAXPOOL_INT8,
                             UPSAMPLE_NEAREST2D_INT8)
from fxopt.ops.schema import OpSchema, OpView
from fxopt.quant.qparams import QParams, on_accumulator_grid
from fxopt.quant.zero_point import signed_like

__all__ = ["Layer", "Plan", "find_layers", "make_plan", "observed_values", "pass_kind", "PRE",
           "with_accumulator_biases", "batch_norm_of", "fused_relu",
           "QuantizableFused", "SAME_GRID", "SameGridRole", "same_grid_role",
           "avg_pool2d_args", "maxpool_args", "upsample_nearest_args", "OWN_GRID_ACTIVATION",
           "activation_args"]

PRE = "pre"  # grids key ("pre", node): a residual layer's output before the add


class QuantizableFused(OpView):
    """The fused ops ``quantize_int8`` quantizes: ``conv2d_act`` and ``linear_act``."""

    ops = (CONV2D_ACT, LINEAR_ACT)


@dataclass
class Layer:
    node: fx.Node
    kind: str  # "conv2d" | "linear"
    x: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    conv: tuple | None  # (stride, padding, dilation, groups)
    residual: fx.Node | None
    act: str
    act_args: list
    path: str
    module_type: type

    @property
    def label(self) -> str:
        return self.path or self.node.name


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    """Conv2d / Linear calls and fused conv2d_act / linear_act ops with constant fp32 weights."""
    layers = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
                continue
            if type(m) is nn.Conv2d and m.padding_mode == "zeros" \
                    and not isinstance(m.padding, str):
                layers.append(Layer(n, "conv2d", n.args[0], m.weight.detach(),
                                    None if m.bias is None else m.bias.detach(),
                                    (list(m.stride), list(m.padding), list(m.dilation), m.groups),
                                    None, "none", [], str(n.target), type(m)))
            elif type(m) is nn.Linear:
                layers.append(Layer(n, "linear", n.args[0], m.weight.detach(),
                                    None if m.bias is None else m.bias.detach(), None, None,
                                    "none", [], str(n.target), type(m)))
        elif (v := QuantizableFused.match(n)) is not None:
            conv = v.schema is CONV2D_ACT
            if not (isinstance(v.weight, fx.Node) and v.weight.op == "get_attr"):
                continue
            if v.bias is not None and not (isinstance(v.bias, fx.Node) and v.bias.op == "get_attr"):
                continue
            if v.residual is not None and not isinstance(v.residual, fx.Node):
                continue
            weight = get_attr_value(gm, v.weight.target).detach()
            bias = None if v.bias is None else get_attr_value(gm, v.bias.target).detach()
            # A fused node carries its root's path (the activation's: "layer1.0.relu"); the
            # layer is the module that owns the weight ("layer1.0.conv1"), which keep_float
            # and the report name.
            path = module_path(v.weight) or module_path(n)
            layers.append(Layer(n, "conv2d" if conv else "linear", v.x, weight, bias,
                                (v.stride, v.padding, v.dilation, v.groups) if conv else None,
                                v.residual, v.act, list(v.act_args), path,
                                nn.Conv2d if conv else nn.Linear))
    return [l for l in layers if l.weight.dtype == torch.float32 and isinstance(l.x, fx.Node)]


# -- ops that keep a value int8: one row per role ---------------------------------------------
@dataclass(frozen=True)
class SameGridRole:
    """A float op that maps an int8 value onto its own grid, and the int8 IR op it becomes.

    ``match(gm, n)`` recognises the float call (its first argument is the value); ``args(gm,
    n)`` gives the int8 op's arguments other than the codes ``q`` (and the grid, when
    ``on_grid``: ``scale``, ``zp``, ``qmin``, ``qmax``, for an op that rounds or names its
    grid). ``op=None`` re-issues the same call on the codes (reshapes); ``passthrough`` hands
    the codes on (``nn.Identity``). ``exact_on_codes``: the simulation runs the op's reference
    on the codes, as the int8 op computes it (an average whose float form would round
    differently), rather than the float op. ``own_grid``: the output is requantized onto a
    grid of its own, observed at calibration (the op takes it as ``y_scale`` / ``y_zp``), not
    its input's. ``count`` names the rewrite's counter (a new name is a new counter). The
    rewrite (``passes/quant/rewrite.py``) and the simulation (``fxopt.quant.simulate``) read
    the row; a new same-grid int8 op is a row here."""

    name: str
    match: Callable[[fx.GraphModule, fx.Node], bool]
    op: OpSchema | None = None
    args: Callable[[fx.GraphModule, fx.Node], dict] = lambda gm, n: {}
    on_grid: bool = False
    exact_on_codes: bool = False
    passthrough: bool = False
    own_grid: bool = False
    count: str = "pool"


SAME_GRID: dict[str, SameGridRole] = {}


def same_grid_role(name: str, match, **kw) -> SameGridRole:
    """Registers a :class:`SameGridRole` (a name is declared once)."""
    if name in SAME_GRID:
        raise ValueError(f"same-grid role {name!r} is declared twice")
    SAME_GRID[name] = row = SameGridRole(name, match, **kw)
    return row


def _module(gm: fx.GraphModule, n: fx.Node, cls) -> nn.Module | None:
    """The ``cls`` module a one-argument ``call_module`` node calls, else None."""
    if n.op != "call_module" or len(n.args) != 1:
        return None
    m = gm.get_submodule(n.target)
    return m if isinstance(m, cls) else None


def _function(n: fx.Node, *targets) -> bool:
    return n.op == "call_function" and n.target in targets


def _pair(v) -> list:
    return list(v) * (2 // len(v)) if isinstance(v, (tuple, list)) else [v, v]


def _named(n: fx.Node, names: tuple, defaults: dict) -> dict:
    """A builtin functional's arguments by name (``F.max_pool2d`` and ``F.avg_pool2d`` are
    declared ``(*args, **kwargs)``: name their parameters here)."""
    a = dict(defaults)
    a.update(zip(names, n.args))
    a.update(n.kwargs)
    return a


def maxpool_args(gm: fx.GraphModule, n: fx.Node) -> dict:
    """``max_pool2d_int8``'s arguments of an ``nn.MaxPool2d`` or ``F.max_pool2d`` call (sizes
    as pairs; the stride defaults to the kernel)."""
    m = _module(gm, n, nn.MaxPool2d)
    if m is not None:
        a = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                 dilation=m.dilation, ceil_mode=m.ceil_mode)
    else:
        a = _named(n, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                   {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False})
    k = _pair(a["kernel_size"])
    s = k if a["stride"] in (None, [], ()) else _pair(a["stride"])
    return dict(kernel_size=k, stride=s, padding=_pair(a["padding"]),
                dilation=_pair(a["dilation"]), ceil_mode=bool(a["ceil_mode"]))


def avg_pool2d_args(gm: fx.GraphModule, n: fx.Node) -> dict:
    """``avg_pool2d_int8``'s arguments of an ``nn.AvgPool2d`` or ``F.avg_pool2d`` call, and its
    ``divisor_override`` (sizes as pairs; the stride defaults to the kernel)."""
    m = _module(gm, n, nn.AvgPool2d)
    if m is not None:
        a = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                 ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                 divisor_override=m.divisor_override)
    else:
        a = _named(n, ("input", "kernel_size", "stride", "padding", "ceil_mode",
                       "count_include_pad", "divisor_override"),
                   dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                        divisor_override=None))
    k = _pair(a["kernel_size"])
    s = k if a["stride"] in (None, [], ()) else _pair(a["stride"])
    return dict(kernel_size=k, stride=s, padding=_pair(a["padding"]),
                ceil_mode=bool(a["ceil_mode"]), count_include_pad=bool(a["count_include_pad"]),
                divisor_override=a["divisor_override"])


def _adaptive_size(gm: fx.GraphModule, n: fx.Node) -> dict:
    m = _module(gm, n, nn.AdaptiveAvgPool2d)
    if m is not None:
        size = m.output_size
    else:
        size = n.args[1] if len(n.args) > 1 else n.kwargs["output_size"]
    if isinstance(size, int):
        size = (size, size)
    tm = n.meta.get("tensor_meta")
    return {"output_size": [int(s) if s is not None else int(tm.shape[-2 + i])
                            for i, s in enumerate(size)]}


same_grid_role(
    "maxpool",
    lambda gm, n: ((m := _module(gm, n, nn.MaxPool2d)) is not None and not m.return_indices)
    or (_function(n, F.max_pool2d) and not n.kwargs.get("return_indices", False)),
    op=MAXPOOL_INT8, args=maxpool_args)
same_grid_role(
    # adaptive (the global pool before a classifier): requantized onto its own observed grid.
    # Every adaptive pool, not only 1x1: its windows average many values (a DenseNet's or
    # ResNet's 7x7 plane), and the observer fits the pooled distribution, never worse than the
    # input's grid for it; windowed 2x2 pooling (avg_pool2d) keeps its input's range
    "avgpool",
    lambda gm, n: _module(gm, n, nn.AdaptiveAvgPool2d) is not None
    or _function(n, F.adaptive_avg_pool2d),
    op=AVGPOOL_INT8, args=_adaptive_size, on_grid=True, own_grid=True)
same_grid_role(
    # a divisor_override is not an average: it stays float
    "avg_pool2d",
    lambda gm, n: (_module(gm, n, nn.AvgPool2d) is not None or _function(n, F.avg_pool2d))
    and avg_pool2d_args(gm, n)["divisor_override"] is None,
    op=AVG_POOL2D_INT8, on_grid=True, exact_on_codes=True,
    args=lambda gm, n: {k: v for k, v in avg_pool2d_args(gm, n).items()
                        if k != "divisor_override"})


def _interpolate_args(gm: fx.GraphModule, n: fx.Node) -> dict | None:
    """``F.interpolate``'s arguments of an ``nn.Upsample`` call (``nn.UpsamplingNearest2d``
    too) or an ``F.interpolate`` one, else None."""
    m = _module(gm, n, nn.Upsample)
    if m is not None:
        return dict(size=m.size, scale_factor=m.scale_factor, mode=m.mode,
                    align_corners=m.align_corners,
                    recompute_scale_factor=m.recompute_scale_factor)
    if not _function(n, F.interpolate):
        return None
    return _named(n, ("input", "size", "scale_factor", "mode", "align_corners",
                      "recompute_scale_factor", "antialias"),
                  dict(size=None, scale_factor=None, mode="nearest", align_corners=None,
                       recompute_scale_factor=None, antialias=False))


def _is_4d(n: fx.Node) -> bool:
    return len(getattr(n.meta.get("tensor_meta"), "shape", ())) == 4


def _upsample_nearest(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A 2-D nearest-neighbour interpolation with a size or a scale factor. A recomputed scale
    factor (``recompute_scale_factor=True``: the size is derived, then the scale dropped) stays
    float."""
    a = _interpolate_args(gm, n)
    return a is not None and a["mode"] == "nearest" and not a["recompute_scale_factor"] \
        and (a["size"] is None) != (a["scale_factor"] is None) and _is_4d(n.args[0])


def upsample_nearest_args(gm: fx.GraphModule, n: fx.Node) -> dict:
    """``upsample_nearest2d_int8``'s ``output_size`` and ``scale_factors`` (one of them None)
    of an ``nn.Upsample`` or ``F.interpolate`` call; a size may be a value of the graph
    (``x.shape[-2:]``, FPN's)."""
    a = _interpolate_args(gm, n)
    size, factor = a["size"], a["scale_factor"]
    if isinstance(size, int):
        size = [size, size]
    elif isinstance(size, (tuple, list)):
        size = list(size)
    if factor is not None:
        factor = [float(f) for f in _pair(factor)]
    return dict(output_size=size, scale_factors=factor)


same_grid_role("upsample_nearest2d", _upsample_nearest, op=UPSAMPLE_NEAREST2D_INT8,
               args=upsample_nearest_args, on_grid=True, count="upsample")
same_grid_role("identity", lambda gm, n: _module(gm, n, nn.Identity) is not None,
               passthrough=True, count="")
same_grid_role(
    "flatten",
    lambda gm, n: _module(gm, n, nn.Flatten) is not None
    or _function(n, torch.flatten, torch.reshape)
    or (n.op == "call_method" and n.target in ("flatten", "reshape", "view")),
    count="")

# An activation call marked by the pass that split it off its layer
# (``passes/quant/split_act.py``, target="onnxruntime": the engine's int8 kernels fuse no such
# activation): its output is requantized onto a grid of its own, so what reads it (a gate's
# product, the next layer) reads int8, as ONNX Runtime's QLinearSigmoid / QLinearMul do.
OWN_GRID_ACTIVATION = "fxopt_own_grid_activation"  # node.meta key
_BY_CANONICAL = {r.canonical: r for r in ACTIVATIONS.values() if r.canonical is not None}


def activation_args(gm: fx.GraphModule, n: fx.Node) -> dict:
    """``activation_int8``'s ``act`` and ``act_args`` for a canonical activation call."""
    row = _BY_CANONICAL[n.target]
    values = {**row.defaults, **dict(zip(row.params, n.args[1:])), **n.kwargs}
    return dict(act=row.name, act_args=[float(values[k]) for k in row.params])


same_grid_role(
    "activation",
    lambda gm, n: bool(n.meta.get(OWN_GRID_ACTIVATION)) and n.op == "call_function"
    and n.target in _BY_CANONICAL,
    op=ACTIVATION_INT8, args=activation_args, on_grid=True, own_grid=True, count="activation")

# Calls that move values without changing them (the same call on the codes keeps the grid):
# ShuffleNet's channel shuffle (view, transpose, contiguous, view) and its chunk into two
# branches. A split's tuple is int8 only when every reader takes one piece (``operator.getitem``);
# ``fxopt.export.qdq_state.CODE_MOVES`` is the exporter's table of the same calls.
_MOVES = (torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, operator.getitem)
_MOVE_METHODS = ("contiguous", "transpose", "permute", "squeeze", "unsqueeze")
_SPLITS = (torch.chunk, torch.split, torch.unbind)
_SPLIT_METHODS = ("chunk", "split", "unbind")


def _moves_values(gm: fx.GraphModule, n: fx.Node) -> bool:
    if _function(n, *_MOVES) or (n.op == "call_method" and n.target in _MOVE_METHODS):
        return True
    split = _function(n, *_SPLITS) or (n.op == "call_method" and n.target in _SPLIT_METHODS)
    return split and bool(n.users) and all(_function(u, operator.getitem) for u in n.users)


same_grid_role("move", _moves_values, count="")


def pass_kind(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """The :data:`SAME_GRID` role of ``n`` (``"maxpool"``, ``"avgpool"`` (adaptive),
    ``"avg_pool2d"``, ``"identity"``, ``"flatten"``, ``"move"``, ...): ``n`` maps its first
    argument onto the same grid (max pooling, reshapes and moves exactly; average pooling with
    one rounding); None otherwise."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return None
    return next((r.name for r in SAME_GRID.values() if r.match(gm, n)), None)


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is operator.add and len(n.args) == 2
            and not n.kwargs and all(isinstance(a, fx.Node) for a in n.args)
            and _same_shape(n.args[0], n.args[1]))


def _is_mul(n: fx.Node) -> bool:
    """``a * b`` of two tensors (capture writes ``torch.mul`` / ``x.mul`` / ``*=`` as
    ``operator.mul``); broadcasting allowed, scalars not (that is a rescale, not a product of
    two grids)."""
    return (n.op == "call_function" and n.target is operator.mul and len(n.args) == 2
            and not n.kwargs and all(isinstance(a, fx.Node) and _is_float_tensor(a)
                                     for a in n.args))


def _is_float_tensor(a: fx.Node) -> bool:
    tm = a.meta.get("tensor_meta")
    return getattr(tm, "dtype", None) in (torch.float32, torch.float16, torch.bfloat16)


def _is_cat(n: fx.Node) -> bool:
    if n.op != "call_function" or n.target is not torch.cat or not n.args:
        return False
    xs = n.args[0]
    return isinstance(xs, (list, tuple)) and len(xs) > 0 and all(isinstance(a, fx.Node) for a in xs)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    ta, tb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    return ta is not None and tb is not None and hasattr(ta, "shape") and hasattr(tb, "shape") \
        and tuple(ta.shape) == tuple(tb.shape)


def _empty(n: fx.Node) -> bool:
    """A value with no elements on every input (a static 0 in its shape): Hugging Face's empty
    KV cache, ``torch.tensor([])`` concatenated with each layer's keys and values."""
    tm = n.meta.get("tensor_meta")
    return any(isinstance(d, int) and d == 0 for d in getattr(tm, "shape", ()))


def batch_norm_of(gm: fx.GraphModule, n: fx.Node) -> nn.BatchNorm2d | None:
    """The ``nn.BatchNorm2d`` an eval-mode call ``n`` runs on running statistics (a per-channel
    affine of a 4-D value: ``batch_norm2d_int8``), else None."""
    m = _module(gm, n, nn.BatchNorm2d)
    if m is None or m.training or m.running_mean is None or not _is_4d(n.args[0]):
        return None
    return m


def fused_relu(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The ReLU that is the only reader of the BatchNorm call ``n`` (``F.relu``, capture's
    canonical form): it runs as the BatchNorm's clamp, on its grid."""
    if len(n.users) != 1:
        return None
    (u,) = n.users
    if _function(u, F.relu) and len(u.args) == 1 and set(u.kwargs) <= {"inplace"}:
        return u
    return None


def observed_values(gm: fx.GraphModule, layers: list[Layer]) -> tuple[set, set]:
    """The value keys a calibration must observe for any plan over ``layers``: every layer's
    input, residual and output, every residual layer's pre-add value, every add, mul and
    cat, every BatchNorm no convolution absorbed (or the ReLU after it), and every op of an
    ``own_grid`` row (adaptive average pooling). Empty values (a static 0 in the shape) are
    left out: they hold no range, and an op that reads one stays float."""
    keys, pre = set(), set()
    for l in layers:
        keys.update([l.node, l.x])
        if l.residual is not None:
            keys.add(l.residual)
            pre.add(l.node)
    for n in gm.graph.nodes:
        if _is_add(n) or _is_mul(n):
            keys.update([n, *n.args])
        elif _is_cat(n):
            keys.update([n, *n.args[0]])
        elif batch_norm_of(gm, n) is not None:
            keys.update([n.args[0], fused_relu(gm, n) or n])
        elif (row := SAME_GRID.get(pass_kind(gm, n))) is not None and row.own_grid:
            keys.add(n)
    return {k for k in keys if not _empty(k)}, {n for n in pre if not _empty(n)}


@dataclass
class Plan:
    """``roles``: original node -> its int8 role (``layer``, a :data:`SAME_GRID` row's name,
    ``add``, ``mul``, ``cat``, ``batch_norm``; ``bn_relu``: a BatchNorm's ReLU, its codes the
    BatchNorm's, both on the ReLU's grid); ``grid(node)`` its grid."""

    layers: dict[fx.Node, Layer]
    roles: dict[fx.Node, str]
    grids: dict  # value key -> QParams (observed); pass-through values resolve to their input
    weights: dict[fx.Node, QParams] = field(default_factory=dict)

    def grid(self, key) -> QParams:
        while isinstance(key, fx.Node) and self.roles.get(key) in SAME_GRID \
                and not SAME_GRID[self.roles[key]].own_grid:
            key = key.args[0]
        if isinstance(key, fx.Node) and self.roles.get(key) == "batch_norm" \
                and (relu := self.bn_relu(key)) is not None:
            key = relu  # the pair writes the ReLU's grid
        return self.grids[key]

    def bn_relu(self, bn: fx.Node) -> fx.Node | None:
        """The ReLU fused into the int8 BatchNorm ``bn`` (its ``bn_relu`` reader), else None."""
        return next((u for u in bn.users if self.roles.get(u) == "bn_relu"), None)

    def is_int8(self, node) -> bool:
        return node in self.roles


def make_plan(gm: fx.GraphModule, layers: list[Layer], grids: dict,
              weights: dict[fx.Node, QParams]) -> Plan:
    by_node = {l.node: l for l in layers}
    roles: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        if n in by_node:
            roles[n] = "layer"
            continue
        kind = pass_kind(gm, n)
        if kind is not None and n.args[0] in roles \
                and (not SAME_GRID[kind].own_grid or n in grids):
            roles[n] = kind
        elif _is_add(n) and all(a in roles for a in n.args) and n in grids:
            roles[n] = "add"
        elif _is_mul(n) and all(a in roles for a in n.args) and n in grids:
            roles[n] = "mul"
        elif _is_cat(n) and all(a in roles for a in n.args[0]) and n in grids:
            roles[n] = "cat"
        elif batch_norm_of(gm, n) is not None and n.args[0] in roles \
                and (fused_relu(gm, n) or n) in grids:
            roles[n] = "batch_norm"
            if (relu := fused_relu(gm, n)) is not None:
                roles[relu] = "bn_relu"
    plan = Plan(by_node, roles, dict(grids), {l.node: weights[l.node] for l in layers})
    for n, role in roles.items():  # an own-grid op writes codes of its input's dtype
        if role in SAME_GRID and SAME_GRID[role].own_grid:
            plan.grids[n] = signed_like(plan.grids[n], plan.grid(n.args[0]))
    return with_accumulator_biases(plan)


def with_accumulator_biases(plan: Plan) -> Plan:
    """``plan`` with each layer's bias on its accumulator's int32 grid (input scale times
    weight scale), as int8 kernels add it (``on_accumulator_grid``)."""
    plan.layers = {n: l if l.bias is None else replace(l, bias=on_accumulator_grid(
        l.bias, plan.grid(l.x).scale, plan.weights[n].scale)) for n, l in plan.layers.items()}
    return plan
