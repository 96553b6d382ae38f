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
   Which calls keep a value int8 (pooling, reshapes, moves, marked activations) is the
   same-grid role table, ``fxopt.quant.roles``.
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

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.graph import get_attr_value, module_path
from fxopt.ops.fused import CONV2D_ACT, LINEAR_ACT
from fxopt.ops.schema import OpView
from fxopt.quant.qparams import QParams, on_accumulator_grid
from fxopt.quant.roles import SAME_GRID, called_module, calls, is_4d, pass_kind
from fxopt.quant.zero_point import signed_like

__all__ = ["Layer", "Plan", "find_layers", "make_plan", "observed_values", "PRE",
           "with_accumulator_biases", "batch_norm_of", "fused_relu", "QuantizableFused"]

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
    m = called_module(gm, n, nn.BatchNorm2d)
    if m is None or m.training or m.running_mean is None or not is_4d(n.args[0]):
        return None
    return m


def fused_relu(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The ReLU that is the only reader of the BatchNorm call ``n`` (``F.relu``, capture's
    canonical form): it runs as the BatchNorm's clamp, on its grid."""
    if len(n.users) != 1:
        return None
    (u,) = n.users
    if calls(u, F.relu) and len(u.args) == 1 and set(u.kwargs) <= {"inplace"}:
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


def without_cat_grids_before_batch_norms(gm: fx.GraphModule, grids: dict) -> tuple[dict, int]:
    """``grids`` less the grid of each concatenation whose every reader is a BatchNorm no
    convolution absorbed (DenseNet's), and how many: such a concat stays float, the exact
    values of its int8 inputs, and the BatchNorm (and its ReLU) run on them, with no rounding
    onto a grid of the concat's own in between. For OpenVINO, which runs the concat on its
    inputs' codes and folds their scales, per channel, into the BatchNorm after it; a concat
    requantized there is one more quantize a layer (densenet121 int8 at batch 1 on an AVX2
    EPYC, 2 threads: 21.69 ms against NNCF's 20.24 with the 62 of them, 19.95 against 19.89
    without; ``bench/results/cpu-deploy-ov-dense-2026-12-07.md``)."""
    cats = [n for n in gm.graph.nodes if _is_cat(n) and n in grids and n.users
            and all(batch_norm_of(gm, u) is not None and u.args[0] is n for u in n.users)]
    return {k: v for k, v in grids.items() if k not in cats}, len(cats)


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
