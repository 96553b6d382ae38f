"""``to_channels_last``: fused 2-D convolutions read channels-last activations (CPU).

A 2-D fused op whose input is not already channels-last (the output of another one, or of an
elementwise, pooling or ``cat`` op over such outputs) gets it converted
(``x.contiguous(memory_format=torch.channels_last)``), and 4-D graph outputs get
``.contiguous()`` back, so outputs keep eager's layout. The op keeps its input's layout, so
activations stay channels-last from one conv to the next, and oneDNN's fused kernels take
them (``fxopt.ops.onednn``). A graph that reads strides (``view``, ``as_strided``,
``stride()``, ``data_ptr``, ...) keeps its layout, with a note. A value written in place
(``x.mul_(2)`` on an input) keeps its layout (a copy taken before the write would miss it), and
normalizations that lose accuracy on channels-last input (GroupNorm, InstanceNorm, LayerNorm on
the CPU) read a contiguous copy. The CPU pipeline runs it after
``fuse_act`` and ``lower_convs`` (``fxopt.pipelines.cpu_layout_phase``).

    >>> to_channels_last(gm, PassContext(example_inputs=(x,))).stats      # resnet18
    {'to_channels_last': 1}
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.activations import CAPTURE_FORMS
from fxopt.ir.graph import copy_meta, get_attr_value, tensor_meta
from fxopt.ir.purity import is_inplace
from fxopt.ops.fused import CONV2D_ACT

__all__ = ["to_channels_last", "convert_to_channels_last"]

CONV2D = CONV2D_ACT.overload

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
# Ops that lose accuracy on channels-last input: PyTorch's channels-last GroupNorm on the CPU
# sums in another order, 30-300x further from float64 than the contiguous kernel (measured on a
# conv -> GroupNorm(16, 16) whose activations sit far from zero: rel err 1e-4 against eager).
# Their channels-last inputs get ``.contiguous()`` back.
_CONTIGUOUS_FUNCTIONS = {F.group_norm, F.instance_norm, F.layer_norm}
_CONTIGUOUS_MODULES = {nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm}


def _wants_contiguous(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(get_attr_value(gm, node.target)) in _CONTIGUOUS_MODULES
    return node.op == "call_function" and node.target in _CONTIGUOUS_FUNCTIONS


def _written_in_place(x: fx.Node) -> bool:
    """``x`` is mutated by one of its users (``x.mul_(2)`` on an input): a channels-last copy
    taken before the write would miss it, so ``x`` keeps its layout."""
    return any(is_inplace(u) and u.args and u.args[0] is x for u in x.users)


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
            a in cl and tensor_meta(a) is not None
            and tuple(tensor_meta(a).shape) == tuple(tm.shape)
            for a in inputs)
    return False


def convert_to_channels_last(gm: fx.GraphModule) -> tuple[int, int, list[str]]:
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
            if isinstance(x, fx.Node) and x not in cl and not _written_in_place(x):
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
        elif _wants_contiguous(gm, node) and node.args and node.args[0] in cl:
            x = node.args[0]
            with gm.graph.inserting_before(node):
                back = gm.graph.call_method("contiguous", (x,))
            copy_meta(back, x)
            node.replace_input_with(x, back)
            added += 1
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



@register_pass("to_channels_last", after=("fuse_act", "lower_convs"))
def to_channels_last(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """CPU: fused 2-D convolutions get channels-last inputs; 4-D outputs stay contiguous."""
    added, outputs, notes = convert_to_channels_last(gm)
    stats = {}
    if added:
        stats["to_channels_last"] = added
    if outputs:
        stats["outputs_contiguous"] = outputs
    if added or outputs:
        gm.graph.lint()
        gm.recompile()
    # The layout changes strides (not shapes): the manager refreshes tensor_meta.
    return PassResult(gm, modified=bool(added or outputs), stats=stats, notes=notes,
                      shapes_changed=bool(added or outputs))
