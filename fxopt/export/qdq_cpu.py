"""QDQ rows for an int8 graph lowered onto PyTorch's int8 CPU kernels (``lower_int8_cpu``).

Today's lowering writes fxopt's CPU ops on plain uint8 codes (``fxopt.ops.cpu``): oneDNN's
layers (with a fused residual: ``Q(act(Conv(...) + DQ(residual)))``) and the IR ops' CPU twins
(``cpu_quantize``, ``cpu_add_int8``, ...), which take their IR op's arguments and so use its
row (``fxopt.export.qdq_ir``). Graphs lowered before it (and files saved then) hold quantized
tensors between PyTorch's own ops, weights prepacked into module attributes (unpacked here).
One row per source op::

    quantize_per_tensor(x, s, zp, quint8)   ->  QuantizeLinear(x, s, zp)
    quantized::conv2d_relu(q, packed, s, zp) ->  QuantizeLinear(Relu(Conv(DequantizeLinear(q),
                                                     DequantizeLinear(w_int8, w_s, 0, axis=0),
                                                     b)), s, zp)
    quantized::add_relu(a, b, s, zp)         ->  QuantizeLinear(Relu(DQ(a) + DQ(b)), s, zp)
    quantized::mul(a, b, s, zp)              ->  QuantizeLinear(DQ(a) * DQ(b), s, zp)
    fxopt.onednn_conv2d_int8(q, ..., act="hardswish")  ->  QuantizeLinear(HardSwish(Conv(
                                                     DQ(q), DQ(w_int8, w_s, 0, axis=0), b)), ..)
    q.int_repr(), _make_per_tensor_quantized_tensor(codes, s, zp)  ->  the codes themselves
    F.max_pool2d(q, 2)  (q quantized)        ->  QuantizeLinear(MaxPool(DQ(q)), q's s, q's zp)
    F.interpolate(q, scale_factor=2)         ->  QuantizeLinear(Resize(DQ(q)), q's s, q's zp)
    q.dequantize()                           ->  DequantizeLinear(q)

PyTorch's own ops are read by position (their schemas are PyTorch's, not fxopt's). A row's name
is the source op's short name (the key of ``QDQRewrite.translated``); the quantized ops match
their overload packet and every overload of it. A row whose inputs do not hold codes (a float
``relu``, say) does not fire.
"""
from __future__ import annotations

import operator
import warnings
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.export.qdq_ir import IR_RULES
from fxopt.export.qdq_state import Grid
from fxopt.infra.rewrite import Builder, Match, Rule, method, op_rule
from fxopt.ir.graph import get_attr_value
from fxopt.ops.cpu import CPU_OF, ONEDNN_CONV2D_INT8, ONEDNN_LINEAR_INT8
from fxopt.ops.schema import schema_of, view_of

__all__ = ["CPU_RULES", "quantized_op_name", "quantized_targets"]


def quantized_op_name(target) -> str | None:
    """'quantized::conv2d' for an op of a torch library (packet or overload), else None."""
    name = getattr(target, "_qualified_op_name", None)
    if name is None and isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    return name


def quantized_targets(name: str) -> tuple:
    """``torch.ops.quantized.<name>``: the packet and each of its overloads (what a row
    matches: a lowered graph may call either)."""
    packet = getattr(torch.ops.quantized, name)
    return (packet, *(getattr(packet, o) for o in packet.overloads()))


# -- the rows ---------------------------------------------------------------------------------
def _on_codes(*xs) -> Callable:
    """A check: the arguments at positions ``xs`` (a list for ``cat``) all hold codes."""

    def check(m: Match) -> bool:
        args = m.root.args
        if len(args) <= max(xs):
            return False
        values = [v for i in xs for v in (args[i] if isinstance(args[i], (list, tuple))
                                          else [args[i]])]
        return all(m.context.grid_of(v) is not None for v in values)

    return check


def _quantize_per_tensor(m: Match, b: Builder) -> fx.Node:
    a = m.root.args
    dtype = a[3] if len(a) > 3 else m.root.kwargs.get("dtype")
    lo, hi = (0, 255) if dtype == torch.quint8 else (-128, 127)
    return m.context.q(b, a[0], Grid(float(a[1]), int(a[2]), lo, hi))


def _dequantize(m: Match, b: Builder) -> fx.Node:
    return m.context.dq_exit(b, m.root.args[0])


def _out_grid(n: fx.Node) -> Grid:
    """The output grid of a quantized:: op: its last two arguments."""
    return Grid(float(n.args[-2]), int(n.args[-1]))


def _layer_ok(m: Match) -> bool:
    """The input holds codes and the prepacked weight is per-channel symmetric int8 (the only
    weight form the QDQ layer writes); the unpacked weight goes to ``replace``."""
    if not _on_codes(0)(m):
        return False
    packed = get_attr_value(m.gm, m.root.args[1].target)
    conv = quantized_op_name(m.root.target).split("::")[1].startswith("conv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch deprecates quantized tensor creation
        unpack = torch.ops.quantized.conv2d_unpack if conv else torch.ops.quantized.linear_unpack
        w, bias = unpack(packed)
    if w.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric) or \
            bool(w.q_per_channel_zero_points().ne(0).any()):
        return m.reject(f"{m.root.name}: weight not per-channel symmetric int8: no QDQ form")
    geometry = (packed.stride(), packed.padding(), packed.dilation(), packed.groups()) \
        if conv else None
    m.data.update(w=w, bias=bias, conv=geometry)
    return True


def _layer(m: Match, b: Builder) -> fx.Node:
    n, st, w = m.root, m.context, m.data["w"]
    act = "relu" if quantized_op_name(n.target).endswith("_relu") else "none"
    return st.layer(b, x=n.args[0], w_q=w.int_repr(), w_scale=w.q_per_channel_scales(),
                    bias=m.data["bias"], conv=m.data["conv"], x_grid=st.grid_of(n.args[0]),
                    y_grid=_out_grid(n), act=act, out_codes=True, tag=n.name)


def _binary(fn):
    """quantized::add(_relu) / quantized::mul(_relu): ``Q(act(fn(DQ(a), DQ(b))))``."""

    def replace(m: Match, b: Builder) -> fx.Node:
        n, st = m.root, m.context
        y = b.call_function(fn, (st.dq(b, n.args[0]), st.dq(b, n.args[1])))
        act = "relu" if quantized_op_name(n.target).endswith("_relu") else "none"
        return st.q(b, st.activation(b, y, act), _out_grid(n))

    return replace


def _cat(m: Match, b: Builder) -> fx.Node:
    n, st = m.root, m.context
    ins = [st.dq(b, q) for q in n.args[0]]
    return st.requant(b, torch.cat, (), [ins], _out_grid(n), {"dim": n.args[1]})


def _same_grid(m: Match, b: Builder) -> fx.Node:
    """A float op PyTorch runs on a quantized tensor, keeping its grid: requantized onto it."""
    n, st = m.root, m.context
    return st.requant(b, n.target, n.args[1:], [st.dq(b, n.args[0])], st.grid_of(n.args[0]),
                      dict(n.kwargs))


def _onednn_layer(m: Match, b: Builder) -> fx.Node:
    """An fxopt oneDNN int8 layer (``fxopt.ops.cpu``): its arguments by name."""
    v, st = view_of(m.root), m.context
    conv = (v.stride, v.padding, v.dilation, v.groups) if "stride" in v.values else None
    layer = dict(x=v.q, w_q=st.value(v.w_q), w_scale=st.value(v.w_scale),
                 bias=None if v.bias is None else st.value(v.bias), conv=conv,
                 x_grid=Grid(float(v.x_scale), int(v.x_zp)), out_codes=True, tag=m.root.name)
    y_grid = Grid(float(v.y_scale), int(v.y_zp))
    if v.get("residual") is None:
        return st.layer(b, **layer, y_grid=y_grid, act=v.act, act_args=tuple(v.act_args))
    # a residual add fused into the conv (oneDNN's sum post-op): written as the IR had it, the
    # conv onto its own grid, then Q(act(DQ(conv) + DQ(residual))), ONNX Runtime's QLinearConv
    # and QLinearAdd pattern; with no grid recorded, the sum is added in float
    residual = st.dq(b, v.residual, Grid(float(v.residual_scale), int(v.residual_zp)))
    if not v.conv_scale:
        return st.layer(b, **layer, y_grid=y_grid, residual=residual, act=v.act,
                        act_args=tuple(v.act_args))
    codes = st.layer(b, **layer, y_grid=Grid(float(v.conv_scale), int(v.conv_zp)))
    y = b.call_function(operator.add, (st.dq(b, codes), residual))
    return st.q(b, st.activation(b, y, v.act, tuple(v.act_args)), y_grid)


def _codes(m: Match, b: Builder) -> fx.Node:
    """``q.int_repr()``: the codes of a quantized tensor, which the QDQ graph carries as is."""
    return m.root.args[0]


def _wrap_ok(m: Match) -> bool:
    """``_make_per_tensor_quantized_tensor(codes, s, zp)`` on the codes' own grid."""
    grid = m.context.grid_of(m.root.args[0])
    if grid is None:
        return False
    return (grid.scale, grid.zp) == (float(m.root.args[1]), int(m.root.args[2])) or \
        m.reject(f"{m.root.name}: codes given another grid than theirs: no QDQ form")


def _twin_rows() -> tuple[Rule, ...]:
    """A row for each CPU twin of an IR op (``fxopt.ops.cpu.CPU_OF``): its IR op's row."""
    ir = {r.name: r for r in IR_RULES}
    return tuple(op_rule(op.name, [op.overload], ir[schema_of(target).name].replace,
                         ir[schema_of(target).name].check) for target, op in CPU_OF.items())


# The table: one row per source op (the row's name is the op's short name).
CPU_RULES: tuple[Rule, ...] = _twin_rows() + (
    op_rule("quantize_per_tensor", [torch.quantize_per_tensor], _quantize_per_tensor),
    op_rule("conv2d", quantized_targets("conv2d"), _layer, _layer_ok),
    op_rule("conv2d_relu", quantized_targets("conv2d_relu"), _layer, _layer_ok),
    op_rule("linear", quantized_targets("linear"), _layer, _layer_ok),
    op_rule("linear_relu", quantized_targets("linear_relu"), _layer, _layer_ok),
    op_rule("add", quantized_targets("add"), _binary(operator.add), _on_codes(0, 1)),
    op_rule("add_relu", quantized_targets("add_relu"), _binary(operator.add), _on_codes(0, 1)),
    op_rule("mul", quantized_targets("mul"), _binary(operator.mul), _on_codes(0, 1)),
    op_rule("mul_relu", quantized_targets("mul_relu"), _binary(operator.mul), _on_codes(0, 1)),
    op_rule("cat", quantized_targets("cat"), _cat, _on_codes(0)),
    # float ops PyTorch runs on quantized tensors, the result on the input's grid
    op_rule("adaptive_avg_pool2d", [F.adaptive_avg_pool2d], _same_grid, _on_codes(0)),
    op_rule("avg_pool2d", [F.avg_pool2d], _same_grid, _on_codes(0)),
    op_rule("max_pool2d", [F.max_pool2d], _same_grid, _on_codes(0)),
    op_rule("interpolate", [F.interpolate], _same_grid, _on_codes(0)),
    op_rule("clamp", [torch.clamp], _same_grid, _on_codes(0)),
    op_rule("hardtanh", [F.hardtanh], _same_grid, _on_codes(0)),
    op_rule("relu", [F.relu, torch.relu], _same_grid, _on_codes(0)),
    op_rule("relu6", [F.relu6], _same_grid, _on_codes(0)),
    Rule("dequantize", lambda: method("dequantize", "dequantize")(), _dequantize,
         _on_codes(0)),
    # oneDNN's int8 layers and the quantized tensor <-> codes steps around them
    op_rule("onednn_conv2d_int8", [ONEDNN_CONV2D_INT8.overload], _onednn_layer, _on_codes(0)),
    op_rule("onednn_linear_int8", [ONEDNN_LINEAR_INT8.overload], _onednn_layer, _on_codes(0)),
    Rule("int_repr", lambda: method("int_repr", "int_repr")(), _codes, _on_codes(0)),
    op_rule("_make_per_tensor_quantized_tensor", [torch._make_per_tensor_quantized_tensor],
            _codes, _wrap_ok),
)
