"""``fuse_act``: convolution and linear layers with their epilogue become one ``fxopt`` op call.

    act(conv(x))          ->  torch.ops.fxopt.conv2d_act(x, w, b, stride, padding, dilation,
                                                         groups, act="relu")
    act(conv(x) + y)      ->  torch.ops.fxopt.conv2d_act(x, w, b, ..., y, act="relu")
    act(linear(x) [+ y])  ->  torch.ops.fxopt.linear_act(x, w, b[, y], act=...)
    act(deconv(x) [+ y])  ->  torch.ops.fxopt.conv_transpose2d_act(x, w, b, stride, padding,
                                  output_padding, groups, dilation[, y], act=...)

Rules (``RULES``, tried in this order at each node): ``conv_act``, ``conv_transpose_act`` and
``linear_act`` (an activation after the layer), ``conv_add``, ``conv_transpose_add`` and
``linear_add`` (a residual added to the layer's output, either side of the ``+``),
``fused_act`` (an activation after a fused op that has none yet: ``act(conv(x) + y)`` is
``conv_add`` then ``fused_act``) and ``fused_add``. Layers are ``nn.Conv1d``/``nn.Conv2d``/
``nn.ConvTranspose2d`` (zero padding mode; a transposed conv called with ``output_size`` is
left alone) and ``nn.Linear`` modules, each onto its op (``_CONVS``), and ``torch.conv1d``/
``torch.conv2d`` (= ``F.conv2d``) calls whose weight and bias are graph constants
(``get_attr``): timm's ``ScaledStdConv2d`` computes its weight in forward, which constant
folding turns into such a call (rules ``conv_fn_act``, ``conv_fn_add``; ``lowered_fn`` in
``lower_convs``); activations are the
canonical ones (the activation table, ``fxopt.ir.activations``) and ``torch.clamp``. The
fused op reads the layer's own weight and bias (``get_attr``), so parameters are shared, not
copied; it is written through the op schema (``CONV2D_ACT.emit``).

The CPU pipeline (``fxopt.pipelines.cpu_layout_phase``) follows it with ``lower_convs`` (this
module: every other ``nn.Conv2d`` becomes ``conv2d_act(..., act="none")``, rule ``lowered``, so
that every 2-D convolution takes oneDNN's kernel with a prepacked weight; with
``precision="bf16"`` every other ``nn.Linear`` becomes ``linear_act``, rule ``lowered_linear``)
and ``to_channels_last`` (``layout.py``); measured in ``bench/results/``.

    >>> fuse_act(gm, PassContext(example_inputs=(x,))).stats      # resnet18
    {'conv_act': 9, 'conv_add': 8, 'fused_act': 8}
"""
from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.infra.rewrite import Builder, Match, Rule, apply_rules, call, module
from fxopt.ir.activations import CAPTURE_FORMS, fused_activation
from fxopt.ir.canonical import activation_of
from fxopt.ir.graph import tensor_meta
from fxopt.ops.fused import (CONV1D_ACT, CONV2D_ACT, CONV_TRANSPOSE2D_ACT, FUSED_OPS,
                              LINEAR_ACT, FusedLayer)

__all__ = ["fuse_act", "lower_convs", "RULES", "LOWER_RULES", "act_spec"]

_conv = module("conv", nn.Conv1d, nn.Conv2d)
_conv2d = module("conv", nn.Conv2d)
_conv_transpose = module("conv", nn.ConvTranspose2d)
_conv_fn = call("conv", torch.conv1d, torch.conv2d)  # F.conv2d is torch.conv2d
_linear = module("linear", nn.Linear)
_act = call("act", *(row.canonical for row in CAPTURE_FORMS.values()), torch.clamp)
_fused = call("fused", *FUSED_OPS)
_add = call("add", operator.add)

def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def act_spec(node: fx.Node) -> tuple[str, list[float]] | str:
    """``(act, act_args)`` for the fused op from an activation or clamp node, or why not."""
    if len(node.args) != 1:
        return f"'{node.name}' has extra positional arguments"
    if node.target is torch.clamp:
        lo, hi = node.kwargs.get("min"), node.kwargs.get("max")
        if set(node.kwargs) - {"min", "max"} or not all(v is None or _number(v) for v in (lo, hi)):
            return f"clamp '{node.name}' has non-constant bounds"
        if lo is None and hi is None:
            return f"clamp '{node.name}' has no bounds"
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
        if lo > hi:
            return f"clamp '{node.name}' has min > max"
        return "clamp", [lo, hi]
    found = activation_of(node)
    if found is None:
        return f"'{node.name}' is not an activation"
    spec = fused_activation(*found)
    return f"{found[0]} '{node.name}' has {spec}" if isinstance(spec, str) else spec


def _conv_params(conv: nn.Module) -> dict | str:
    """The op's stride, padding, dilation and groups for a Conv1d/Conv2d module, or why not."""
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    k, d = conv.kernel_size, conv.dilation
    if conv.padding == "valid":
        padding = [0] * len(k)
    elif conv.padding == "same":
        total = [di * (ki - 1) for di, ki in zip(d, k)]
        if any(t % 2 for t in total):
            return "padding='same' with asymmetric padding"
        padding = [t // 2 for t in total]
    else:
        padding = list(conv.padding)
    return dict(stride=list(conv.stride), padding=padding, dilation=list(d), groups=conv.groups)


def _conv_transpose_params(conv: nn.Module) -> dict | str:
    """The op's stride, padding, output_padding, groups and dilation for a ConvTranspose2d."""
    if conv.padding_mode != "zeros":  # PyTorch refuses to run it: not ours to make it run
        return f"padding_mode={conv.padding_mode!r}"
    return dict(stride=list(conv.stride), padding=list(conv.padding),
                output_padding=list(conv.output_padding), groups=conv.groups,
                dilation=list(conv.dilation))


# Convolution module -> (its fused op, the op's arguments from the module or why not, the
# input's rank). Matched by exact type: a subclass may compute something else.
_CONVS = {
    nn.Conv1d: (CONV1D_ACT, _conv_params, 3),
    nn.Conv2d: (CONV2D_ACT, _conv_params, 4),
    nn.ConvTranspose2d: (CONV_TRANSPOSE2D_ACT, _conv_transpose_params, 4),
}


_FN_OPS = {torch.conv1d: (CONV1D_ACT, 3), torch.conv2d: (CONV2D_ACT, 4)}


def _conv_fn_params(node: fx.Node) -> tuple[dict, fx.Node, fx.Node | None] | str:
    """(op arguments, weight, bias) of a functional conv with constant weight and bias, or why
    not."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    if len(node.args) > len(names) or set(node.kwargs) - set(names[1:]):
        return "unexpected arguments"
    a = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
         **dict(zip(names, node.args)), **node.kwargs}
    weight, bias = a["weight"], a["bias"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or not (
            bias is None or isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return "its weight or bias is computed in the graph (not a constant)"
    tm = tensor_meta(weight)
    if tm is None:
        return "its weight has no shape metadata"
    k = list(tm.shape[2:])
    def spread(v):
        return [v] * len(k) if isinstance(v, int) else list(v)
    if any(isinstance(a[key], fx.Node) for key in ("stride", "padding", "dilation", "groups")):
        return "its settings are computed in the graph"
    d = spread(a["dilation"])
    if a["padding"] == "valid":
        padding = [0] * len(k)
    elif a["padding"] == "same":
        total = [di * (ki - 1) for di, ki in zip(d, k)]
        if any(t % 2 for t in total):
            return "padding='same' with asymmetric padding"
        padding = [t // 2 for t in total]
    else:
        padding = spread(a["padding"])
    params = dict(stride=spread(a["stride"]), padding=padding, dilation=d, groups=a["groups"])
    return params, weight, bias


def _float_input(node, ndim: int | None) -> bool:
    tm = tensor_meta(node)
    return tm is not None and tm.dtype.is_floating_point and (ndim is None or len(tm.shape) == ndim)


def _check_layer(m: Match) -> bool:
    """The layer call is plain and its input is a batched floating tensor."""
    key = "conv" if "conv" in m.nodes else "linear"
    node = m.nodes[key]
    if node.op == "call_function":  # torch.conv1d/conv2d with constant weight and bias
        op, ndim = _FN_OPS[node.target]
        found = _conv_fn_params(node)
        if isinstance(found, str):
            return m.reject(f"'{node.name}' is not fused: {found}")
        if not _float_input(node.args[0], ndim):
            return False
        m.data["conv"] = op, found[0]
        m.data["fn_weights"] = found[1:]
        return True
    layer = m.module(key)
    if len(node.args) != 1 or node.kwargs:
        if isinstance(layer, nn.ConvTranspose2d):  # output_size picks output_padding per call
            return m.reject(f"'{node.target}' is not fused: called with output_size")
        return False
    if key == "conv":
        op, params_of, ndim = _CONVS[type(layer)]
        params = params_of(layer)
        if isinstance(params, str):
            return m.reject(f"'{node.target}' is not fused: {params}")
        if not _float_input(node.args[0], ndim):
            return False  # unbatched or non-float input: not this op's business
        m.data["conv"] = op, params
    elif not _float_input(node.args[0], None):
        return False
    return True


def _check_act(m: Match) -> bool:
    spec = act_spec(m.nodes["act"])
    if isinstance(spec, str):
        return m.reject(f"not fused: {spec}")
    m.data["act"] = spec
    return True


def _check_residual(m: Match, produced: fx.Node) -> bool:
    y = m["y"]
    if not isinstance(y, fx.Node) or y is produced:
        return False
    ty, tp = tensor_meta(y), tensor_meta(produced)
    # Same shape and dtype: the epilogue adds in place, without broadcasting.
    return ty is not None and tp is not None and tuple(ty.shape) == tuple(tp.shape) and \
        ty.dtype == tp.dtype


def _layer_call(m: Match, b: Builder) -> tuple:
    """(op schema, argument values, name) of the fused op for the matched layer module."""
    key = "conv" if "conv" in m.nodes else "linear"
    node = m.nodes[key]
    if node.op == "call_function":  # the call's own constant weight and bias nodes
        weight, bias = m.data["fn_weights"]
        op, params = m.data["conv"]
        return op, {"x": node.args[0], "weight": weight, "bias": bias, **params}, node.name
    layer = m.module(key)
    weight = b.get_attr(f"{node.target}.weight")
    bias = b.get_attr(f"{node.target}.bias") if layer.bias is not None else None
    values = {"x": node.args[0], "weight": weight, "bias": bias}
    if key == "linear":
        return LINEAR_ACT, values, node.name
    op, params = m.data["conv"]
    return op, {**values, **params}, node.name


# -- rules --------------------------------------------------------------------------------------
def _replace_layer_act(m: Match, b: Builder) -> fx.Node:
    op, values, name = _layer_call(m, b)
    act, act_args = m.data["act"]
    return op.emit(b, name=f"{name}_{act}", **values, act=act, act_args=act_args)


def _replace_layer_add(m: Match, b: Builder) -> fx.Node:
    op, values, name = _layer_call(m, b)
    return op.emit(b, name=f"{name}_add", **values, residual=m["y"])


def _replace_fused_act(m: Match, b: Builder) -> fx.Node:
    fused = FusedLayer.of(m.nodes["fused"])
    act, act_args = m.data["act"]
    return fused.emit(b, name=f"{fused.node.name}_{act}", act=act, act_args=act_args)


def _replace_fused_add(m: Match, b: Builder) -> fx.Node:
    fused = FusedLayer.of(m.nodes["fused"])
    return fused.emit(b, name=f"{fused.node.name}_add", residual=m["y"])


def _fused_without(m: Match, *, residual: bool) -> bool:
    fused = FusedLayer.of(m.nodes["fused"])
    return fused.act == "none" and (not residual or fused.residual is None)


RULES = [
    Rule("conv_act", lambda x: _act(_conv(x)), _replace_layer_act,
         lambda m: _check_layer(m) and _check_act(m)),
    Rule("conv_transpose_act", lambda x: _act(_conv_transpose(x)), _replace_layer_act,
         lambda m: _check_layer(m) and _check_act(m)),
    Rule("linear_act", lambda x: _act(_linear(x)), _replace_layer_act,
         lambda m: _check_layer(m) and _check_act(m)),
    Rule("conv_add", lambda x, y: _add(_conv(x), y), _replace_layer_add,
         lambda m: _check_layer(m) and _check_residual(m, m.nodes["conv"])),
    Rule("conv_transpose_add", lambda x, y: _add(_conv_transpose(x), y), _replace_layer_add,
         lambda m: _check_layer(m) and _check_residual(m, m.nodes["conv"])),
    Rule("linear_add", lambda x, y: _add(_linear(x), y), _replace_layer_add,
         lambda m: _check_layer(m) and _check_residual(m, m.nodes["linear"])),
    Rule("conv_fn_act", lambda x: _act(_conv_fn(x)), _replace_layer_act,
         lambda m: _check_layer(m) and _check_act(m)),
    Rule("conv_fn_add", lambda x, y: _add(_conv_fn(x), y), _replace_layer_add,
         lambda m: _check_layer(m) and _check_residual(m, m.nodes["conv"])),
    Rule("fused_act", lambda x: _act(_fused(x)), _replace_fused_act,
         lambda m: _fused_without(m, residual=False) and _check_act(m)),
    Rule("fused_add", lambda x, y: _add(_fused(x), y), _replace_fused_add,
         lambda m: _fused_without(m, residual=True) and _check_residual(m, m.nodes["fused"])),
]


def _replace_lower(m: Match, b: Builder) -> fx.Node:
    op, values, name = _layer_call(m, b)
    return op.emit(b, name=f"{name}_op", **values)


def _check_bf16_linear(m: Match) -> bool:
    """A bfloat16 ``nn.Linear`` (``precision="bf16"``): its op runs oneDNN's matmul on a weight
    packed once; a float32 one stays ``F.linear``, which is as fast as anything it would take."""
    return _check_layer(m) and m.module("linear").weight.dtype == torch.bfloat16


# CPU: the remaining 2-D convolutions take the fused op too (oneDNN, prepacked weights), and so
# do bfloat16 linear layers (PyTorch's bf16 F.linear repacks the weight every call: 5-20% slower
# on ConvNeXt's and ViT-B's layers at batch 1).
LOWER_RULES = [Rule("lowered", lambda x: _conv2d(x), _replace_lower, _check_layer),
               Rule("lowered_fn", lambda x: call("conv", torch.conv2d)(x), _replace_lower,
                    _check_layer),
               Rule("lowered_linear", lambda x: _linear(x), _replace_lower, _check_bf16_linear)]


# -- the pass -----------------------------------------------------------------------------------
@register_pass("fuse_act", after=("fold_bn",))
def fuse_act(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fuse conv/linear with their activation and residual add into one fxopt op call."""
    result = apply_rules(gm, RULES)
    return PassResult(gm, modified=result.count > 0, stats=dict(result.counts),
                      notes=list(result.notes))


@register_pass("lower_convs", after=("fuse_act",))
def lower_convs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """CPU: every remaining 2-D convolution becomes a conv2d_act call (oneDNN, packed weight),
    and every remaining bfloat16 linear layer a linear_act call."""
    result = apply_rules(gm, LOWER_RULES)
    return PassResult(gm, modified=result.count > 0, stats=dict(result.counts),
                      notes=list(result.notes))
