"""On ``target="onnxruntime"``, a layer's activation that ONNX Runtime cannot fuse into its int8
kernel is split off before ``quantize_int8`` plans, and runs in int8 the way ONNX Runtime's own
quantizer (``quantize_static``) lays it out:

- ``conv2d_act(x, act="sigmoid")`` becomes ``conv2d_act(x)`` (int8 out, on a grid of its own)
  and ``torch.sigmoid`` of it, requantized onto a grid of its own (``activation_int8``);
- SiLU and Hardswish become their gate times the value, ``y * sigmoid(y)`` and
  ``y * hardsigmoid(y)``: the gate is such an activation, the product a ``mul_int8``.

ONNX Runtime runs a QDQ file's ``DequantizeLinear -> Conv -> QuantizeLinear`` as one
``QLinearConv`` only when the conv's own output is quantized; it folds a ReLU or a Clip into
that QuantizeLinear (their range is the grid's), nothing else, and it runs
``DequantizeLinear -> Sigmoid -> QuantizeLinear`` and ``-> Mul ->`` as QLinearSigmoid and
QLinearMul. A fused ``conv + hardswish`` layer with only its post-activation grid ran as a float
Conv: fxopt's QDQ file of mobilenet_v3_large was 2.5x slower in ONNX Runtime than
``quantize_static``'s. The activation calls made here carry ``OWN_GRID_ACTIVATION`` in their
meta: the planner's ``activation`` row (``fxopt.quant.roles``) matches only those, so the CPU
target's plan (oneDNN fuses these activations) is unchanged.

    >>> split_unfused_activations(gm)       # number of layers split
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.ir.activations import ACTIVATIONS
from fxopt.ir.graph import copy_meta
from fxopt.quant.plan import QuantizableFused
from fxopt.quant.roles import OWN_GRID_ACTIVATION

__all__ = ["ORT_FUSED_ACTIVATIONS", "split_unfused_activations"]

# what ONNX Runtime's QDQ fusion folds into the QuantizeLinear after an int8 kernel
ORT_FUSED_ACTIVATIONS = frozenset({"none", "relu", "relu6", "hardtanh", "clamp"})
# activations written as the value times a gate (ONNX Runtime's quantizer sees them so)
_GATED = {"silu": torch.sigmoid, "hardswish": F.hardsigmoid}


def _call(gm: fx.GraphModule, fn, args: tuple, kwargs: dict, like: fx.Node,
          own_grid: bool) -> fx.Node:
    node = gm.graph.call_function(fn, args, kwargs)
    copy_meta(node, like)
    if own_grid:
        node.meta[OWN_GRID_ACTIVATION] = True
    return node


def split_unfused_activations(gm: fx.GraphModule,
                              fused: frozenset = ORT_FUSED_ACTIVATIONS) -> int:
    """Rewrites each fused layer whose activation is not in ``fused`` (and has a canonical
    call) into the layer without it and the activation after it (a gated one as the value
    times its gate); returns how many."""
    count = 0
    for n in list(gm.graph.nodes):
        v = QuantizableFused.match(n)
        if v is None or v.act in fused or ACTIVATIONS[v.act].canonical is None:
            continue
        act, row = v.act, ACTIVATIONS[v.act]
        kwargs = dict(zip(row.params, v.act_args))
        v.apply(act="none", act_args=[])
        with gm.graph.inserting_after(n):
            if act in _GATED:
                gate = _call(gm, _GATED[act], (n,), {}, n, own_grid=True)
                with gm.graph.inserting_after(gate):
                    out = _call(gm, operator.mul, (n, gate), {}, n, own_grid=False)
                new = {gate, out}
            else:
                out = _call(gm, row.canonical, (n,), kwargs, n, own_grid=True)
                new = {out}
        n.replace_all_uses_with(out, delete_user_cb=lambda u: u not in new)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
