"""QDQ rows for the fxopt int8 IR: one row per int8 op, its arguments read through the schema.

``quantize_int8`` writes the device-neutral int8 IR (``fxopt.ops.int8``: codes between ops,
grids as buffers); ``quantize_int8_dynamic`` writes ``linear_int8_dynamic``. Each row turns one
call into standard ops between QuantizeLinear and DequantizeLinear, the pattern ONNX Runtime
fuses back into its own int8 kernels (QLinearConv, QGemm, QLinearAdd, QLinearMul, ...)::

    conv2d_int8(q, w_q, w_s, b, ..., x_scale, x_zp, y_scale, y_zp, act="relu", out_int8=True)
      ->  QuantizeLinear(Relu(Conv(DequantizeLinear(q, x_scale, x_zp),
                                   DequantizeLinear(w_q, w_s, 0, axis=0), b)), y_scale, y_zp)

A row is ``op_rule(<schema name>, <view>.targets(), replace, check)``: the row's name is the op's
name (the key of ``QDQRewrite.translated``), ``replace`` reads the call through its view
(``view_of(m.root)``: the same rows then serve the CPU lowering's twins of these ops, which
take the same arguments, ``fxopt.export.qdq_cpu``)
and builds with the shared :class:`~fxopt.export.qdq_state.QDQState` (``m.context``). A new int8
op is one more row here.

Dynamic int8 linear computes its run-time grid in the graph exactly as fxopt does
(``fxopt.ops.int8_dynamic.dynamic_qparams``): with ``reduce_range=True`` (7-bit codes, the
default) ATen's choice written in standard ops (``aten_dynamic_grid``: ReduceMin/ReduceMax,
Div, Round, Where) then QuantizeLinear / DequantizeLinear; with ``reduce_range=False``
``DynamicQuantizeLinear`` (ONNX Runtime fuses it with the MatMul into its dynamic int8 kernel).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.export.onnx_ops import (aten_dynamic_grid, dequantize_linear,
                                   dynamic_quantize_linear, quantize_linear)
from fxopt.infra.rewrite import Builder, Match, Rule, op_rule
from fxopt.ops.int8 import (ActivationInt8, AddInt8, AvgPool2dInt8, AvgPool2dWindowInt8,
                            BatchNorm2dInt8, CatInt8, Conv2dInt8, Dequantize, Int8Layer,
                            LinearInt8, MaxPool2dInt8, MulInt8, Quantize, UpsampleNearest2dInt8)
from fxopt.ops.int8_dynamic import LinearInt8Dynamic
from fxopt.ops.schema import OpView, view_of

__all__ = ["IR_RULES", "ir_row"]


def ir_row(view: type[OpView], replace: Callable[[Match, Builder], fx.Node],
           check: Callable[[Match], bool] | None = None) -> Rule:
    """The row for the op of ``view``, named as the op (``conv2d_int8``)."""
    (schema,) = view.ops
    return op_rule(schema.name, view.targets(), replace, check)


def _quantize(m: Match, b: Builder) -> fx.Node:
    v, st = view_of(m.root), m.context
    return st.q(b, v.x, st.ir_grid(v.scale, v.zp, v.qmin, v.qmax))


def _dequantize(m: Match, b: Builder) -> fx.Node:
    v, st = view_of(m.root), m.context
    return st.dq_exit(b, v.q, st.ir_grid(v.scale, v.zp))


def _layer(m: Match, b: Builder) -> fx.Node:
    v, st = Int8Layer.of(m.root), m.context
    conv = (v.stride, v.padding, v.dilation, v.groups) if Conv2dInt8.matches(m.root) else None
    return st.layer(b, x=v.x, w_q=st.value(v.w_q), w_scale=st.value(v.w_scale),
                    bias=None if v.bias is None else st.value(v.bias), conv=conv,
                    x_grid=st.ir_grid(v.x_scale, v.x_zp, v.x_qmin, v.x_qmax),
                    y_grid=st.ir_grid(v.y_scale, v.y_zp, v.y_qmin, v.y_qmax),
                    residual=v.residual, act=v.act, act_args=v.act_args,
                    out_codes=v.out_int8, tag=m.root.name)


def _binary(fn):
    """add_int8 / mul_int8: ``Q(act(fn(DQ(a), DQ(b))))`` (ONNX's Add / Mul broadcast)."""

    def replace(m: Match, b: Builder) -> fx.Node:
        v, st = view_of(m.root), m.context
        y = b.call_function(fn, (st.float_in(b, v.a, st.ir_grid(v.a_scale, v.a_zp)),
                                 st.float_in(b, v.b, st.ir_grid(v.b_scale, v.b_zp))))
        y = st.activation(b, y, v.act, v.act_args)
        return st.q(b, y, st.ir_grid(v.y_scale, v.y_zp, v.y_qmin, v.y_qmax))

    return replace


def _cat(m: Match, b: Builder) -> fx.Node:
    v, st = view_of(m.root), m.context
    ins = [st.float_in(b, q, st.ir_grid(s, z)) for q, s, z in zip(v.qs, v.scales, v.zps)]
    return st.requant(b, torch.cat, (), [ins], st.ir_grid(v.y_scale, v.y_zp, v.y_qmin, v.y_qmax),
                      {"dim": v.dim})


def _avg_pool(m: Match, b: Builder) -> fx.Node:
    """``Q(GlobalAveragePool(DQ(q)))``: onto its own grid (``y_scale``), else its input's."""
    v, st = view_of(m.root), m.context
    grid = st.ir_grid(v.scale, v.zp, v.qmin, v.qmax)
    out = grid if v.y_scale is None else st.ir_grid(v.y_scale, v.y_zp, v.qmin, v.qmax)
    return st.requant(b, F.adaptive_avg_pool2d, (list(v.output_size),),
                      [st.float_in(b, v.q, grid)], out)


def _avg_pool2d(m: Match, b: Builder) -> fx.Node:
    """``Q(AveragePool(DQ(q)))`` on the input's grid (ONNX's ceil_mode and count_include_pad
    are PyTorch's; ONNX Runtime can fuse it into QLinearAveragePool)."""
    v, st = view_of(m.root), m.context
    grid = st.ir_grid(v.scale, v.zp, v.qmin, v.qmax)
    args = (list(v.kernel_size), list(v.stride), list(v.padding), v.ceil_mode,
            v.count_include_pad)
    return st.requant(b, F.avg_pool2d, args, [st.float_in(b, v.q, grid)], grid)


def _max_pool_on_codes(m: Match) -> bool:
    # max_pool2d_int8 carries no grid of its own: it keeps the one its input codes are on
    return m.context.grid_of(view_of(m.root).q) is not None or \
        m.reject(f"{m.root.name}: max_pool2d_int8 on a value with no known grid")


def _max_pool(m: Match, b: Builder) -> fx.Node:
    v, st = view_of(m.root), m.context
    args = (list(v.kernel_size), list(v.stride), list(v.padding), list(v.dilation), v.ceil_mode)
    return st.requant(b, F.max_pool2d, args, [st.dq(b, v.q)], st.grid_of(v.q))


def _upsample_nearest(m: Match, b: Builder) -> fx.Node:
    """``Q(Resize(DQ(q)))``, nearest, on the input's grid (ONNX Runtime's nearest Resize is
    PyTorch's for a size and for an integer scale factor)."""
    v, st = view_of(m.root), m.context
    grid = st.ir_grid(v.scale, v.zp, v.qmin, v.qmax)
    return st.requant(b, F.interpolate, (), [st.float_in(b, v.q, grid)], grid,
                      dict(size=v.output_size, scale_factor=v.scale_factors, mode="nearest"))


def _batch_norm(m: Match, b: Builder) -> fx.Node:
    """``Q(act(BatchNormalization(DQ(q))))`` onto its own grid (ONNX's eval BatchNormalization
    is PyTorch's)."""
    v, st = view_of(m.root), m.context
    p = [None if t is None else st.const(("bn", m.root.name, k), st.value(t), f"bn_{k}")
         for k, t in (("mean", v.mean), ("var", v.var), ("weight", v.weight), ("bias", v.bias))]
    y = b.call_function(F.batch_norm, (st.float_in(b, v.q, st.ir_grid(v.x_scale, v.x_zp)), *p,
                                       False, 0.0, float(v.eps)))
    y = st.activation(b, y, v.act, v.act_args)
    return st.q(b, y, st.ir_grid(v.y_scale, v.y_zp, v.y_qmin, v.y_qmax))


def _activation(m: Match, b: Builder) -> fx.Node:
    """``Q(act(DQ(q)))`` onto its own grid (ONNX Runtime runs a Sigmoid so as QLinearSigmoid)."""
    v, st = view_of(m.root), m.context
    y = st.activation(b, st.float_in(b, v.q, st.ir_grid(v.scale, v.zp)), v.act, v.act_args)
    return st.q(b, y, st.ir_grid(v.y_scale, v.y_zp, v.qmin, v.qmax))


def _dynamic_linear(m: Match, b: Builder) -> fx.Node:
    v, st = LinearInt8Dynamic.of(m.root), m.context
    if v.reduce_range:  # 7-bit codes: ATen's grid in the graph, then a fixed-range Q/DQ
        grid = b.call_function(aten_dynamic_grid, (v.x, True))
        scale = b.call_function(operator.getitem, (grid, 0))
        zp = b.call_function(operator.getitem, (grid, 1))
        codes = b.call_function(quantize_linear, (v.x, scale, zp))
    else:
        dq = b.call_function(dynamic_quantize_linear, (v.x,))
        codes, scale, zp = (b.call_function(operator.getitem, (dq, i)) for i in range(3))
    xf = b.call_function(dequantize_linear, (codes, scale, zp, None))
    wf = st.weight(b, st.value(v.w_q), st.value(v.w_scale), m.root.name)
    bf = st.bias(None if v.bias is None else st.value(v.bias), m.root.name)
    y = b.call_function(F.linear, (xf, wf, bf))
    if v.residual is not None:
        y = b.call_function(operator.add, (y, v.residual))
    return st.activation(b, y, v.act, v.act_args)  # float out: no grid, no exit


def _per_tensor(m: Match) -> bool:
    """ONNX's DynamicQuantizeLinear picks one grid per tensor: a per-token layer has no form."""
    return not LinearInt8Dynamic.of(m.root).per_token


# The table: one row per op of the int8 IR (the op's name is the row's name).
IR_RULES: tuple[Rule, ...] = (
    ir_row(Quantize, _quantize),
    ir_row(Dequantize, _dequantize),
    ir_row(Conv2dInt8, _layer),
    ir_row(LinearInt8, _layer),
    ir_row(AddInt8, _binary(operator.add)),
    ir_row(MulInt8, _binary(operator.mul)),
    ir_row(CatInt8, _cat),
    ir_row(AvgPool2dInt8, _avg_pool),
    ir_row(AvgPool2dWindowInt8, _avg_pool2d),
    ir_row(MaxPool2dInt8, _max_pool, _max_pool_on_codes),
    ir_row(UpsampleNearest2dInt8, _upsample_nearest),
    ir_row(BatchNorm2dInt8, _batch_norm),
    ir_row(ActivationInt8, _activation),
    ir_row(LinearInt8Dynamic, _dynamic_linear, _per_tensor),
)
