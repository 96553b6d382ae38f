"""Multiply-accumulate counts read off the graph's shapes (``tensor_meta``).

Counted: convolutions (module and functional, transposed too), linear layers, matmul family and
scaled-dot-product attention (as torch calls, and as the ATen overloads a ``capture="export"``
graph keeps), ``nn.MultiheadAttention`` leaves, PyTorch's quantized CPU ops, and the ops
registered in ``MAC_COUNTERS`` (every ``fxopt`` op declares its counter in the op schema,
``fxopt.ops.schema``). Everything else is taken as free, as the usual tools do.

    >>> count_macs(fxopt.capture(torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224)))
    1814073344
"""
from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.graph import get_attr_value, tensor_meta

__all__ = ["count_macs", "node_macs", "MAC_COUNTERS"]

# target (function or op overload packet) -> fn(node, gm) -> MACs; later passes add their ops.
MAC_COUNTERS: dict[object, Callable[[fx.Node, fx.GraphModule], int]] = {}


def _numel(shape) -> int:
    return int(math.prod(shape))


def _conv_macs(out_shape, weight_shape, transposed: bool, in_shape=None) -> int:
    # weight: [C_out, C_in/groups, *k] (conv) or [C_in, C_out/groups, *k] (transposed)
    k = _numel(weight_shape[2:])
    if transposed:
        # every input element scatters into C_out/groups * k outputs
        return _numel(in_shape) * weight_shape[1] * k if in_shape is not None else 0
    return _numel(out_shape) * weight_shape[1] * k


def _shape(node) -> tuple | None:
    tm = tensor_meta(node)
    return tuple(tm.shape) if tm is not None else None


def _module_macs(node: fx.Node, mod: nn.Module) -> int:
    out = _shape(node)
    if out is None and not isinstance(mod, nn.MultiheadAttention):
        return 0
    if isinstance(mod, nn.modules.conv._ConvNd):
        inp = _shape(node.args[0]) if node.args else None
        return _conv_macs(out, tuple(mod.weight.shape), mod.transposed, inp)
    if isinstance(mod, nn.Linear):
        return _numel(out) * mod.in_features
    if isinstance(mod, nn.Bilinear):
        return _numel(out) * mod.in1_features * mod.in2_features
    if isinstance(mod, nn.MultiheadAttention):
        q = _shape(node.args[0]) if node.args else None
        k = _shape(node.args[1]) if len(node.args) > 1 else q
        if q is None or k is None:
            return 0
        if mod.batch_first:
            n, lq, e = q
            lk = k[1]
        else:
            lq, n, e = q
            lk = k[0]
        proj = n * (lq + 2 * lk) * e * e + n * lq * e * e  # q, k, v in; out projection
        attn = 2 * n * lq * lk * e  # scores and weighted sum
        return proj + attn
    return 0


_aten = torch.ops.aten
_MATMULS = (torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm",
            _aten.matmul.default, _aten.mm.default, _aten.bmm.default)
_ADDMMS = (torch.addmm, torch.baddbmm, "addmm", "baddbmm", _aten.addmm.default,
           _aten.baddbmm.default)
_SDPA = (F.scaled_dot_product_attention, _aten.scaled_dot_product_attention.default)


def node_macs(node: fx.Node, gm: fx.GraphModule) -> int:
    """MACs of one node (0 for ops that are not counted)."""
    if node.op == "call_module":
        return _module_macs(node, get_attr_value(gm, node.target))
    if node.op not in ("call_function", "call_method"):
        return 0
    target = node.target
    counter = MAC_COUNTERS.get(target) or MAC_COUNTERS.get(getattr(target, "overloadpacket", None))
    if counter is not None:
        return counter(node, gm)
    out = _shape(node)
    if out is None:
        return 0
    if target in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                  F.conv_transpose3d):
        w = _shape(node.args[1]) if len(node.args) > 1 else _shape(node.kwargs.get("weight"))
        if w is None:
            return 0
        transposed = "transpose" in target.__name__
        return _conv_macs(out, w, transposed, _shape(node.args[0]))
    if target is F.linear:
        w = _shape(node.args[1]) if len(node.args) > 1 else _shape(node.kwargs.get("weight"))
        return _numel(out) * w[-1] if w else 0
    if target in _MATMULS:
        a = _shape(node.args[0])
        return _numel(out) * a[-1] if a else 0
    if target in _ADDMMS:
        a = _shape(node.args[1])
        return _numel(out) * a[-1] if a else 0
    if target in _SDPA:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        if q and k:
            return 2 * _numel(q[:-2]) * q[-2] * k[-2] * q[-1]
    return 0


def count_macs(gm: fx.GraphModule) -> int:
    """Total MACs of one forward pass at the shapes recorded in the graph's metadata."""
    return sum(node_macs(n, gm) for n in gm.graph.nodes)


# -- PyTorch's quantized CPU ops (after lower_int8_cpu): shapes from the prepacked weights ----
def _packed_macs(node: fx.Node, gm: fx.GraphModule) -> int:
    import math

    out = _shape(node)
    packed = node.args[1] if len(node.args) > 1 else None
    if out is None or not isinstance(packed, fx.Node) or packed.op != "get_attr":
        return 0
    p = get_attr_value(gm, packed.target)
    name = str(getattr(node.target, "__name__", node.target))
    unpack = torch.ops.quantized.linear_unpack if "linear" in name else \
        torch.ops.quantized.conv2d_unpack
    try:
        w = unpack(p)[0]
    except Exception:  # noqa: BLE001 - not the packed params we know
        return 0
    return math.prod(out) * math.prod(w.shape[1:])


for _name in ("conv2d", "conv2d_relu", "linear", "linear_relu"):
    MAC_COUNTERS[getattr(torch.ops.quantized, _name)] = _packed_macs
