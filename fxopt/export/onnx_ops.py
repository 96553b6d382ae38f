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
           "engine_friendly_symbolics", "openvino_linear_weights"]


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


def openvino_linear_weights(path) -> int:
    """In the ONNX file at ``path``: every ``MatMul(x, W)`` whose ``W`` is a 2-D float
    initializer becomes ``MatMul(x, Transpose(W'))`` with ``W' = W^T`` stored (``[out, in]``,
    the Linear layer's own layout). The TorchScript exporter folds ``F.linear``'s transpose of a
    >2-D input into the initializer; from that form OpenVINO compiled two more runtime
    Transposes and Reorders per Linear layer than from its own conversion of the model (36 each
    on convnext_tiny: 77/101 against 41/65; from this form, the same graph as its own). The
    values are the same (a transpose is exact). Returns how many MatMuls were rewritten."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    out_names = {o.name for o in graph.output}
    nodes, done, made = [], 0, {}
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        init = inits.get(w) if w else None
        if init is not None and len(init.dims) == 2 and init.data_type in floats \
                and w not in out_names:
            if w not in made:
                stored = f"{w}__out_in"
                graph.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(numpy_helper.to_array(init).T), stored))
                made[w] = f"{w}__t"
                nodes.append(helper.make_node("Transpose", [stored], [made[w]], perm=[1, 0],
                                              name=f"{w}__transpose"))
            readers[w] -= 1
            node.input[1] = made[w]
            done += 1
        nodes.append(node)
    if not done:
        return 0
    for w in made:  # the [in, out] copy goes where nothing else reads it
        if readers.get(w, 0) == 0:
            graph.initializer.remove(inits[w])
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return done
