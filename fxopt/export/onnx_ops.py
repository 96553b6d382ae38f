"""Standard ONNX quantization operators as traceable torch functions.

``torch.onnx.export`` (the TorchScript exporter) writes an ``autograd.Function`` with a
``symbolic`` method as the ONNX node that method names. Each function here computes in PyTorch
exactly what its ONNX operator computes, so the QDQ graph runs (and is checked) in PyTorch
before it is exported::

    q = quantize_linear(x, scale, zp)            # QuantizeLinear: round(x / s) + zp, saturated
    y = dequantize_linear(w_q, w_s, w_zp, 0)     # DequantizeLinear, per channel along axis 0
    q, s, z = dynamic_quantize_linear(x)         # DynamicQuantizeLinear: uint8, full range

fx cannot name ``Function.apply`` as a call target; the lower-case functions are the names the
QDQ graphs call. :func:`aten_dynamic_grid` is ATen's run-time grid for dynamic quantization
written with standard ops only (each becomes an ONNX op): ONNX's DynamicQuantizeLinear always
uses the full 8-bit range, fxopt (like PyTorch) a 7-bit one by default.

Nothing here knows fx graphs or fxopt ops: the QDQ rule tables (``fxopt.export.qdq_ir``,
``fxopt.export.qdq_cpu``) call these.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "quantize_linear",
           "dequantize_linear", "dynamic_quantize_linear", "aten_dynamic_grid",
           "engine_friendly_symbolics"]


class QuantizeLinear(torch.autograd.Function):
    """``clamp(round(x / scale) + zp)`` into the zero point's dtype; ONNX QuantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zp):
        info = torch.iinfo(zp.dtype)
        q = torch.round(x.float() * torch.reciprocal(scale.float())) + zp.float()
        return q.clamp(info.min, info.max).to(zp.dtype)

    @staticmethod
    def symbolic(g, x, scale, zp):
        return g.op("QuantizeLinear", x, scale, zp)


class DequantizeLinear(torch.autograd.Function):
    """``(q - zp) * scale``, per tensor, or per channel along ``axis``; ONNX DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zp, axis):
        if scale.dim() == 1:
            shape = [1] * q.dim()
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return (q.float() - zp.float()) * scale.float()

    @staticmethod
    def symbolic(g, q, scale, zp, axis):
        if axis is None:
            return g.op("DequantizeLinear", q, scale, zp)
        return g.op("DequantizeLinear", q, scale, zp, axis_i=axis)


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


def quantize_linear(x, scale, zp):
    """fx-callable :class:`QuantizeLinear`."""
    return QuantizeLinear.apply(x, scale, zp)


def dequantize_linear(q, scale, zp, axis=None):
    """fx-callable :class:`DequantizeLinear` (``axis=None``: per tensor)."""
    return DequantizeLinear.apply(q, scale, zp, axis)


def dynamic_quantize_linear(x):
    """fx-callable :class:`DynamicQuantizeLinear` (returns a tuple of three tensors)."""
    return DynamicQuantizeLinear.apply(x)


def aten_dynamic_grid(x: torch.Tensor, reduce_range: bool = True):
    """(scale float32 0-d, zero point uint8 0-d) as ATen's ``ChooseQuantizationParams`` picks
    them, written with traceable ops only (each becomes an ONNX op). Not reproduced: ATen's
    widening of scales below 6.1e-5 (an input whose whole range is below ~8e-3)."""
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


@contextlib.contextmanager
def engine_friendly_symbolics(opset: int, enabled: bool = True):
    """While exporting: ``aten::hardsigmoid`` written as ``Div(Clip(Add(x, 3), 0, 6), 6)``, ATen's
    own formula, rather than ONNX ``HardSigmoid(alpha=1/6)``.

    OpenVINO recognises the Clip form as its ``HSigmoid`` and fuses it (and the gate's
    QuantizeLinear) into the convolution before it; ONNX ``HardSigmoid`` runs as a separate
    reference kernel in float32 with reorders around it. On mobilenet_v3_large's 8
    squeeze-excitation gates that was ~10% of its int8 latency on OpenVINO (fxopt's file, 1
    thread). ONNX Runtime runs either form. A user's own symbolic for ``aten::hardsigmoid`` (a
    custom one registered for ``opset``) is left in place. ``enabled=False``: nothing changes
    (ONNX Runtime: its ``HardSigmoid`` is one kernel, the Clip form three).
    """
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic
    from torch.onnx._internal.torchscript_exporter import registration
    group = registration.registry.get_function_group("aten::hardsigmoid")
    if not enabled or (group is not None and group._functions.overridden(opset)):
        yield
        return

    def hardsigmoid(g, x):
        def const(v: float):
            return g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32))
        clipped = g.op("Clip", g.op("Add", x, const(3.0)), const(0.0), const(6.0))
        return g.op("Div", clipped, const(6.0))

    register_custom_op_symbolic("aten::hardsigmoid", hardsigmoid, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::hardsigmoid", opset)
