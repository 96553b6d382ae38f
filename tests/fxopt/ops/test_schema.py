"""The op schema: one declaration per op, views that read arguments by name, calls by name."""
from __future__ import annotations

import uuid

import pytest
import torch
import torch.fx as fx

from fxopt.ir.metrics import count_macs
from fxopt.ops.fused import CONV2D_ACT, FUSED_OPS, LINEAR_ACT, FusedConv, FusedLayer, FusedLinear
from fxopt.ops.int8 import CONV2D_INT8, INT8_IR_OPS, Conv2dInt8, Int8Layer
from fxopt.ops.schema import (FAMILIES, OPS, OpView, define_op, is_fxopt_op, ops_of,
                              schema_of, view_of)


def _graph_with(op, **values):
    g = fx.Graph()
    x = g.placeholder("x")
    node = op.emit(g, x=x, **values)
    g.output(node)
    return g, x, node


def _conv_values(**extra):
    return dict(weight=None, bias=None, stride=(1, 1), padding=[0, 0], dilation=[1, 1],
                groups=1, **extra)


def test_every_op_is_declared_once_and_reachable_by_its_target():
    ops = {*FUSED_OPS, *INT8_IR_OPS, *ops_of(("triton", "cpu"))}
    assert all(schema_of(t) is not None for t in ops)
    for name, schema in OPS.items():
        assert schema.name == name and schema.family in FAMILIES
        assert schema_of(schema.overload) is schema and schema_of(schema.packet) is schema
        assert getattr(torch.ops.fxopt, name).default is schema.overload
        assert schema.quantized == (schema.family == "int8" or name.endswith("_int8")
                                    or name in ("triton_quantize", "triton_dequantize",
                                                "cpu_quantize", "cpu_dequantize"))


def test_emit_writes_one_canonical_spelling():
    # positional up to the last non-default positional parameter, lists as lists, keyword-only
    # parameters only when they differ from their default
    _, _, node = _graph_with(CONV2D_ACT, **_conv_values())
    assert len(node.args) == 7 and node.kwargs == {} and node.args[3] == [1, 1]
    _, x, node = _graph_with(CONV2D_ACT, **_conv_values(act="relu", act_args=()))
    assert node.kwargs == {"act": "relu"} and len(node.args) == 7
    _, x, node = _graph_with(CONV2D_ACT, **_conv_values(residual=None, act="leaky_relu",
                                                         act_args=[0.1]))
    assert node.kwargs == {"act": "leaky_relu", "act_args": [0.1]}


def test_view_reads_arguments_by_name_with_defaults():
    g, x, node = _graph_with(CONV2D_ACT, **_conv_values(act="relu"))
    v = FusedConv.of(node)
    assert v.x is x and v.residual is None and v.act == "relu" and v.act_args == []
    assert v.stride == [1, 1] and v.groups == 1 and v.name == "conv2d_act"
    assert FusedLayer.of(node).schema is CONV2D_ACT and view_of(node).act == "relu"
    assert FusedLinear.match(node) is None and not Int8Layer.matches(node)
    with pytest.raises(TypeError, match="not a call of fxopt.linear_act"):
        FusedLinear.of(node)
    with pytest.raises(AttributeError, match="has no parameter 'bogus'"):
        v.bogus


def test_view_reads_positional_and_keyword_spellings_alike():
    g = fx.Graph()
    x, r = g.placeholder("x"), g.placeholder("r")
    by_position = g.call_function(CONV2D_ACT.overload,
                                  (x, None, None, [1, 1], [0, 0], [1, 1], 1, r))
    by_keyword = g.call_function(CONV2D_ACT.overload, (x, None, None, [1, 1], [0, 0], [1, 1], 1),
                                 {"residual": r, "act": "silu"})
    assert FusedConv.of(by_position).residual is r and FusedConv.of(by_keyword).residual is r
    assert FusedConv.of(by_keyword).act == "silu"


def test_emit_with_changes_and_apply_in_place():
    g, x, node = _graph_with(CONV2D_ACT, **_conv_values())
    v = FusedConv.of(node)
    with g.inserting_after(node):
        new = v.emit(g, act="gelu")
    assert FusedConv.of(new).act == "gelu" and FusedConv.of(new).x is x
    v.apply(act="tanh")
    assert node.kwargs == {"act": "tanh"}
    with pytest.raises(TypeError, match="no parameter"):
        v.emit(g, acts="relu")
    with pytest.raises(AttributeError, match="read-only"):
        v.act = "relu"


def test_missing_and_unknown_arguments_are_named():
    g = fx.Graph()
    x = g.placeholder("x")
    with pytest.raises(TypeError, match="missing argument 'groups'"):
        CONV2D_ACT.emit(g, x=x, weight=None, bias=None, stride=[1, 1], padding=[0, 0],
                        dilation=[1, 1])
    bad = g.call_function(LINEAR_ACT.overload, (x, None, None), {"activation": "relu"})
    with pytest.raises(TypeError, match="no parameter 'activation'"):
        FusedLinear.of(bad)


def test_call_runs_the_op_on_values_by_name():
    x, w, b = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    values = CONV2D_ACT.bind_call((x, w, b, [1, 1], [1, 1], [1, 1], 1), {"act": "relu"})
    out = CONV2D_ACT.call(values)
    torch.testing.assert_close(out, torch.relu(torch.nn.functional.conv2d(x, w, b, 1, 1)))
    torch.testing.assert_close(CONV2D_ACT.call(values, act="none"),
                               torch.nn.functional.conv2d(x, w, b, 1, 1))
    args, kwargs = CONV2D_ACT.args_kwargs(values)
    torch.testing.assert_close(CONV2D_ACT.decompose(*args, **kwargs), out)


def test_a_new_op_is_one_declaration(tmp_path):
    """define_op alone gives the op its implementation, fake, view, MAC count and schema
    lookups (the pictures and the exporters read these)."""
    name = f"schema_test_scale_{uuid.uuid4().hex[:8]}"
    op = define_op(f"{name}(Tensor x, Tensor weight, *, float alpha=1.0) -> Tensor",
                   family="fused", reference=lambda x, w, *, alpha=1.0: x * w * alpha,
                   fake=lambda x, w, *, alpha=1.0: torch.empty_like(x),
                   decompose=lambda x, w, *, alpha=1.0: x * w * alpha,
                   macs=lambda view, gm: 7)
    try:
        x, w = torch.randn(3, 4), torch.randn(4)
        torch.testing.assert_close(getattr(torch.ops.fxopt, name)(x, w, alpha=2.0), x * w * 2)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = op(mode.from_tensor(x), mode.from_tensor(w))
        assert fake.shape == x.shape
        g = fx.Graph()
        xn, wn = g.placeholder("x"), g.placeholder("w")
        node = op.emit(g, x=xn, weight=wn, alpha=3.0)
        g.output(node)
        assert op.view.of(node).alpha == 3.0 and is_fxopt_op(node.target)
        assert count_macs(fx.GraphModule(torch.nn.Module(), g)) == 7
        with pytest.raises(ValueError, match="declared twice"):
            define_op(f"{name}(Tensor x) -> Tensor", family="fused", reference=lambda x: x,
                      fake=lambda x: x)
    finally:
        OPS.pop(name, None)


def test_a_view_may_cover_ops_with_different_parameters():
    class AnyLayer(OpView):
        ops = (CONV2D_ACT, CONV2D_INT8)

    g, x, node = _graph_with(CONV2D_ACT, **_conv_values())
    assert AnyLayer.of(node).x is x
    assert Conv2dInt8.match(node) is None
