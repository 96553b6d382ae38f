"""On ``target="onnxruntime"``, a layer's activation that ONNX Runtime cannot fuse into its int8
kernel is split off before ``quantize_int8`` plans: ``conv2d_act(x, act="hardswish")`` becomes
``conv2d_act(x)`` (int8 out, on a grid of its own) and ``F.hardswish`` of it.

ONNX Runtime runs a QDQ file's ``DequantizeLinear -> Conv -> QuantizeLinear`` as one
``QLinearConv`` only when the conv's own output is quantized; it folds a ReLU or a Clip into
that QuantizeLinear (their range is the grid's), nothing else. A fused ``conv + hardswish``
layer with only its post-activation grid therefore ran as a float Conv in ORT: fxopt's QDQ file
of mobilenet_v3_large was 2.5x slower there than ORT's own ``quantize_static`` output, whose
Conv writes int8 and whose HardSwish runs between a DequantizeLinear and a QuantizeLinear. After
the split fxopt's int8 graph is that graph, and the file ONNX Runtime runs is checked against it.

    >>> split_unfused_activations(gm)       # number of layers split
"""
from __future__ import annotations

import torch.fx as fx

from fxopt.ir.activations import ACTIVATIONS
from fxopt.ir.graph import copy_meta
from fxopt.quant.plan import QuantizableFused

__all__ = ["ORT_FUSED_ACTIVATIONS", "split_unfused_activations"]

# what ONNX Runtime's QDQ fusion folds into the QuantizeLinear after an int8 kernel
ORT_FUSED_ACTIVATIONS = frozenset({"none", "relu", "relu6", "hardtanh", "clamp"})


def split_unfused_activations(gm: fx.GraphModule,
                              fused: frozenset = ORT_FUSED_ACTIVATIONS) -> int:
    """Rewrites each fused layer whose activation is not in ``fused`` (and has a canonical
    call) into the layer without it and the activation's call after it; returns how many."""
    count = 0
    for n in list(gm.graph.nodes):
        v = QuantizableFused.match(n)
        if v is None or v.act in fused or ACTIVATIONS[v.act].canonical is None:
            continue
        row = ACTIVATIONS[v.act]
        kwargs = dict(zip(row.params, v.act_args))
        v.apply(act="none", act_args=[])
        with gm.graph.inserting_after(n):
            act = gm.graph.call_function(row.canonical, (n,), kwargs)
        n.replace_all_uses_with(act, delete_user_cb=lambda u: u is not act)
        copy_meta(act, n)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
