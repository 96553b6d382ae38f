"""``fuse_act``: convolution and linear layers with their epilogue become one ``fxopt`` op call.

    act(conv(x))          ->  torch.ops.fxopt.conv2d_act(x, w, b, stride, padding, dilation,
                                                         groups, act="relu")
    act(conv(x) + y)      ->  torch.ops.fxopt.conv2d_act(x, w, b, ..., y, act="relu")
    act(linear(x) [+ y])  ->  torch.ops.fxopt.linear_act(x, w, b[, y], act=...)

Rules (``RULES``, tried in this order at each node): ``conv_act`` and ``linear_act`` (an
activation after the layer), ``conv_add`` and ``linear_add`` (a residual added to the layer's
output, either side of the ``+``), ``fused_act`` (an activation after a fused op that has none
yet: ``act(conv(x) + y)`` is ``conv_add`` then ``fused_act``) and ``fused_add``. Layers are
``nn.Conv1d``/``nn.Conv2d`` (zero padding mode) and ``nn.Linear`` modules; activations are the
canonical ones (the activation table, ``fxopt.ir.activations``) and ``torch.clamp``. The fused op reads the
layer's own weight and bias (``get_attr``), so parameters are shared, not copied.

For the CPU target two more steps make the fused ops fast (options ``lower_convs`` and
``channels_last``, both on by default for ``target="cpu"``, off otherwise; measured in
``bench/results/``):
- every other ``nn.Conv2d`` becomes ``conv2d_act(..., act="none")`` (rule ``lowered``), so that
  every 2-D convolution takes oneDNN's kernel with a prepacked weight;
- a 2-D fused op whose input is not already channels-last (the output of another one, or of an
  elementwise, pooling or ``cat`` op over such outputs) gets it converted
  (``x.contiguous(memory_format=torch.channels_last)``), and 4-D graph outputs get
  ``.contiguous()`` back, so outputs keep eager's layout. The op keeps its input's layout, so
  activations stay channels-last from one conv to the next. A graph that reads strides
  (``view``, ``as_strided``, ``stride()``, ``data_ptr``, ...) keeps its layout, with a note.

    >>> fuse_act(gm, PassContext(example_inputs=(x,))).stats      # resnet18
    {'conv_act': 9, 'conv_add': 8, 'fused_act': 8, 'lowered': 3, 'to_channels_last': 1}
"""
from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.infra.rewrite import Builder, Match, Rule, apply_rules, call, module
from fxopt.ir.activations import CAPTURE_FORMS, fused_activation
from fxopt.ir.canonical import activation_of
from fxopt.ir.graph import copy_meta, get_attr_value, tensor_meta
from fxopt.ops.fused import CONV1D_ACT, CONV2D_ACT, FUSED_OPS, LINEAR_ACT, FusedLayer

__all__ = ["fuse_act", "RULES", "LOWER_RULES", "act_spec", "to_channels_last"]

CONV2D = CONV2D_ACT.overload

_conv = module("conv", nn.Conv1d, nn.Conv2d)
_conv2d = module("conv", nn.Conv2d)
_linear = module("linear", nn.Linear)
_act = call("act", *(row.canonical for row in CAPTURE_FORMS.values()), torch.clamp)
_fused = call("fused", *FUSED_OPS)
_add = call("add", operator.add)

# Graph ops whose result depends on memory layout: with any of them the layout stays as it was.
_STRIDE_METHODS = {"view", "view_as", "stride", "is_contiguous", "data_ptr", "storage",
                   "untyped_storage", "as_strided", "numpy", "set_"}
_STRIDE_FUNCTIONS = {torch.as_strided, torch.Tensor.view, torch.Tensor.stride,
                     torch.Tensor.is_contiguous, torch.Tensor.data_ptr}
# Ops that keep a channels-last input channels-last (only a hint for where to convert):
# elementwise ops (a full-size input decides), pooling and per-channel ops (the first input).
_ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.clamp,
                *(row.canonical for row in CAPTURE_FORMS.values())}
_PER_CHANNEL = {F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                F.adaptive_max_pool2d, F.batch_norm, F.interpolate}
_PER_CHANNEL_MODULES = {nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                        nn.Dropout, nn.Identity, nn.BatchNorm2d, nn.Upsample}


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


def _conv_params(conv: nn.Module) -> tuple[list, list, list, int] | str:
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
    return list(conv.stride), padding, list(d), conv.groups


def _float_input(node, ndim: int | None) -> bool:
    tm = tensor_meta(node)
    return tm is not None and tm.dtype.is_floating_point and (ndim is None or len(tm.shape) == ndim)


def _check_layer(m: Match) -> bool:
    """The layer call is plain and its input is a batched floating tensor."""
    key = "conv" if "conv" in m.nodes else "linear"
    node = m.nodes[key]
    if len(node.args) != 1 or node.kwargs:
        return False
    layer = m.module(key)
    if key == "conv":
        params = _conv_params(layer)
        if isinstance(params, str):
            return m.reject(f"'{node.target}' is not fused: {params}")
        ndim = 3 if isinstance(layer, nn.Conv1d) else 4
        if not _float_input(node.args[0], ndim):
            return False  # unbatched or non-float input: not this op's business
        m.data["conv"] = params
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
    layer = m.module(key)
    weight = b.get_attr(f"{node.target}.weight")
    bias = b.get_attr(f"{node.target}.bias") if layer.bias is not None else None
    values = {"x": node.args[0], "weight": weight, "bias": bias}
    if key == "linear":
        return LINEAR_ACT, values, node.name
    stride, padding, dilation, groups = m.data["conv"]
    values.update(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (CONV1D_ACT if isinstance(layer, nn.Conv1d) else CONV2D_ACT), values, node.name


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
    Rule("linear_act", lambda x: _act(_linear(x)), _replace_layer_act,
         lambda m: _check_layer(m) and _check_act(m)),
    Rule("conv_add", lambda x, y: _add(_conv(x), y), _replace_layer_add,
         lambda m: _check_layer(m) and _check_residual(m, m.nodes["conv"])),
    Rule("linear_add", lambda x, y: _add(_linear(x), y), _replace_layer_add,
         lambda m: _check_layer(m) and _check_residual(m, m.nodes["linear"])),
    Rule("fused_act", lambda x: _act(_fused(x)), _replace_fused_act,
         lambda m: _fused_without(m, residual=False) and _check_act(m)),
    Rule("fused_add", lambda x, y: _add(_fused(x), y), _replace_fused_add,
         lambda m: _fused_without(m, residual=True) and _check_residual(m, m.nodes["fused"])),
]


def _replace_lower(m: Match, b: Builder) -> fx.Node:
    op, values, name = _layer_call(m, b)
    return op.emit(b, name=f"{name}_op", **values)


# CPU: the remaining 2-D convolutions take the fused op too (oneDNN, prepacked weights).
LOWER_RULES = [Rule("lowered", lambda x: _conv2d(x), _replace_lower, _check_layer)]


# -- layout -------------------------------------------------------------------------------------
def _is_to_channels_last(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "contiguous"
            and node.kwargs.get("memory_format") is torch.channels_last)


def _stride_readers(gm: fx.GraphModule) -> list[str]:
    found = []
    for n in gm.graph.nodes:
        if (n.op == "call_method" and n.target in _STRIDE_METHODS) or (
                n.op == "call_function" and n.target in _STRIDE_FUNCTIONS):
            found.append(n.name)
    return found


def _keeps_channels_last(gm: fx.GraphModule, node: fx.Node, cl: set[fx.Node]) -> bool:
    """Whether ``node``'s output is channels-last given which of its inputs are (``cl``)."""
    inputs = node.all_input_nodes
    if not inputs:
        return False
    if node.op == "call_module":
        return type(get_attr_value(gm, node.target)) in _PER_CHANNEL_MODULES and inputs[0] in cl
    if node.op != "call_function":
        return False
    if node.target in _PER_CHANNEL:
        return inputs[0] in cl
    if node.target is torch.cat:
        return all(a in cl for a in inputs)
    if node.target in _ELEMENTWISE:
        tm = tensor_meta(node)
        return tm is not None and any(
            a in cl and tensor_meta(a) is not None and tuple(tensor_meta(a).shape) == tuple(tm.shape)
            for a in inputs)
    return False


def to_channels_last(gm: fx.GraphModule) -> tuple[int, int, list[str]]:
    """Give 2-D fused ops channels-last inputs (see the module docstring).

    Returns (conversions added, outputs made contiguous, notes). One walk in graph order tracks
    which values are (very likely) channels-last: fused convs fed channels-last, conversions, and
    layout-keeping ops (elementwise, pooling, cat) of such values. A fused conv whose input is not
    gets a conversion. A wrong guess is only a missed speed-up: the op accepts any layout.
    """
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is CONV2D]
    if not convs:
        return 0, 0, []
    readers = _stride_readers(gm)
    if readers:
        return 0, 0, [f"kept the memory layout: the graph reads strides "
                      f"({', '.join(readers[:3])})"]
    added = 0
    cl: set[fx.Node] = set()
    converted: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if _is_to_channels_last(node):
            cl.add(node)
        elif node.op == "call_function" and node.target is CONV2D:
            x = node.args[0]
            if isinstance(x, fx.Node) and x not in cl:
                conv_in = converted.get(x)
                if conv_in is None:
                    where = x
                    if x.op == "placeholder":  # after the last input, not between inputs
                        where = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
                    with gm.graph.inserting_after(where):
                        conv_in = gm.graph.call_method("contiguous", (x,),
                                                       {"memory_format": torch.channels_last})
                    copy_meta(conv_in, x)  # the same value; the manager refreshes the strides
                    converted[x] = conv_in
                    cl.add(conv_in)
                    added += 1
                node.replace_input_with(x, conv_in)
            cl.add(node)
        elif _keeps_channels_last(gm, node, cl):
            cl.add(node)
    outputs = _outputs_contiguous(gm) if added else 0
    return added, outputs, []


def _outputs_contiguous(gm: fx.GraphModule) -> int:
    """4-D outputs that eager returned contiguous get ``.contiguous()`` (a no-op when they are)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    added = 0

    def wrap(node: fx.Node) -> fx.Node:
        nonlocal added
        tm = tensor_meta(node)
        if tm is None or len(tm.shape) != 4 or tm.memory_format is not torch.contiguous_format or (
                node.op == "call_method" and node.target == "contiguous" and not node.kwargs):
            return node
        with gm.graph.inserting_before(out):
            new = gm.graph.call_method("contiguous", (node,))
        copy_meta(new, node)
        added += 1
        return new

    out.args = fx.node.map_arg(out.args, wrap)
    return added


# -- the pass -----------------------------------------------------------------------------------
@register_pass("fuse_act", after=("fold_bn",))
def fuse_act(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fuse conv/linear with their activation and residual add into one fxopt op call."""
    cpu = ctx.target == "cpu"
    result = apply_rules(gm, RULES)
    stats = dict(result.counts)
    notes = list(result.notes)
    if ctx.options.get("lower_convs", cpu):
        lowered = apply_rules(gm, LOWER_RULES)
        stats.update(lowered.counts)
        notes += [n for n in lowered.notes if n not in notes]
    layout = 0
    if ctx.options.get("channels_last", cpu):
        added, outputs, layout_notes = to_channels_last(gm)
        notes += layout_notes
        layout = added + outputs
        if added:
            stats["to_channels_last"] = added
        if outputs:
            stats["outputs_contiguous"] = outputs
        if layout:
            gm.graph.lint()
            gm.recompile()
    modified = bool(sum(stats.values()))
    # The layout step changes strides (not shapes): the manager refreshes tensor_meta.
    return PassResult(gm, modified=modified, stats=stats, notes=notes, shapes_changed=layout > 0)
