"""Dynamic int8 linear (``fxopt.linear_int8_dynamic``) as ONNX: the run-time grid in the graph.

fxopt picks the input's grid per call as PyTorch's dynamic quantized linear does
(``fxopt.ops_int8_dynamic.dynamic_qparams``: the range widened to hold 0, ATen's scale and
zero point, 7-bit codes with ``reduce_range=True``, the default). ONNX's
``DynamicQuantizeLinear`` always uses the full 8-bit range, so:

- ``reduce_range=False``: ``DynamicQuantizeLinear(x) -> DequantizeLinear`` (ONNX Runtime fuses
  it with the MatMul into its dynamic int8 kernel);
- ``reduce_range=True``: the grid is computed in the graph, step for step as ATen does
  (ReduceMin/ReduceMax, Div, Round, Where, in float64), then ``QuantizeLinear`` /
  ``DequantizeLinear`` with those run-time scale and zero point.

Both then run the float linear on ``DequantizeLinear(w_int8, w_scale, 0, axis=0)``, the float
bias, the residual and the activation. Not reproduced: ATen's widening of scales below
6.1e-5 (an input whose whole range is below ~8e-3); the file then uses the plain scale.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.ir.activations import apply_activation

__all__ = ["dynamic_linear_qdq", "DynamicQuantizeLinear", "aten_dynamic_grid"]


class DynamicQuantizeLinear(torch.autograd.Function):
    """ONNX DynamicQuantizeLinear: (uint8 codes, scale, zero point) over the full 0..255 range."""

    @staticmethod
    def forward(ctx, x):
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.clamp(torch.round(-lo / scale), 0, 255)
        q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
        return q.to(torch.uint8), scale.float(), zp.to(torch.uint8)

    @staticmethod
    def symbolic(g, x):
        return g.op("DynamicQuantizeLinear", x, outputs=3)


def dynamic_quantize_linear(x):
    """fx-callable :class:`DynamicQuantizeLinear` (returns a tuple of three tensors)."""
    return DynamicQuantizeLinear.apply(x)


def aten_dynamic_grid(x: torch.Tensor, reduce_range: bool = True):
    """(scale float32 0-d, zero point uint8 0-d) as ATen's ``ChooseQuantizationParams`` picks
    them, written with traceable ops only (each becomes an ONNX op)."""
    qmin, qmax = (0, 127) if reduce_range else (0, 255)
    x_min = torch.clamp(torch.amin(x).double(), max=0.0)
    x_max = torch.clamp(torch.amax(x).double(), min=0.0)
    scale = (x_max - x_min) / float(qmax - qmin)
    scale = torch.where(scale.float() == 0, torch.full_like(scale, 0.1), scale)
    zp_min = qmin - x_min / scale
    zp_max = qmax - x_max / scale
    err_min = abs(qmin) - torch.abs(x_min / scale)
    err_max = abs(qmax) - torch.abs(x_max / scale)
    initial = torch.where(err_min < err_max, zp_min, zp_max)
    zp = torch.clamp(torch.round(initial), qmin, qmax)
    return scale.float(), zp.to(torch.uint8)


def dynamic_linear_qdq(writer, n: fx.Node) -> fx.Node:
    """The QDQ form of one ``linear_int8_dynamic`` call, inserted before ``n``."""
    from fxopt.export.qdq import dequantize_linear, quantize_linear

    g, a, kw = writer.g, n.args, n.kwargs
    x = a[0]
    residual = a[4] if len(a) > 4 else kw.get("residual")
    reduce_range = kw.get("reduce_range", True)
    if reduce_range:
        grid = g.call_function(aten_dynamic_grid, (x, True))
        scale = g.call_function(operator.getitem, (grid, 0))
        zp = g.call_function(operator.getitem, (grid, 1))
        codes = g.call_function(quantize_linear, (x, scale, zp))
    else:
        dq = g.call_function(dynamic_quantize_linear, (x,))
        codes, scale, zp = (g.call_function(operator.getitem, (dq, i)) for i in range(3))
    xf = g.call_function(dequantize_linear, (codes, scale, zp, None))
    wf = writer.weight(writer.value(a[1]), writer.value(a[2]), n.name)
    b = None if a[3] is None else writer.const(("b", n.name), writer.value(a[3]).float(), "bias")
    y = g.call_function(F.linear, (xf, wf, b))
    if residual is not None:
        y = g.call_function(operator.add, (y, residual))
    act = kw.get("act", "none")
    if act != "none":
        y = g.call_function(apply_activation, (y, act, tuple(kw.get("act_args", ()))))
    return y
