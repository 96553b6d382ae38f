"""lower_to_triton's float binary rows: residual adds and gate products (``a + b``, ``a * b``)
that fuse_act could not fold into a convolution, onto ``triton_add`` / ``triton_mul`` (their
activation fused), and those two ops' layouts and CPU fallback.

Without a GPU the lowered graphs run with ``FXOPT_TRITON_ON_CPU=1`` (the kernels in Triton's
interpreter); the fixtures ``on_cpu``, ``float_res``, ``float_se`` are in this folder's conftest.
"""
import copy
import operator
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.infra.rewrite import apply_rules
from fxopt.ir.tolerances import compare_outputs
from fxopt.ops.triton import TRITON_ADD, TRITON_MUL

pytest.importorskip("triton")
from fxopt.passes.lower.triton import RULES, TritonLowering, lower_to_triton  # noqa: E402
from triton_cases import act_res, record, se, triton_ops  # noqa: E402  (tests/support)

OPS = torch.ops.fxopt


# -- float residual adds that fuse_act cannot fold into a convolution ------------------------------
def test_float_residual_adds_lowered(float_res):
    x, before, gm, result = float_res
    assert sum(n.target is operator.add for n in before.graph.nodes) == 2  # what fuse_act left
    assert triton_ops(gm) == {"triton_conv2d": 4, "triton_add": 2}
    adds = [TRITON_ADD.view.of(n) for n in gm.graph.nodes if TRITON_ADD.view.matches(n)]
    assert [(v.act, v.node.meta["tensor_meta"].dtype) for v in adds] == \
        [("relu", torch.float32), ("none", torch.float32)]
    # the broadcast parameter is b (swapped); a stays NHWC, so the 1x1 convolution reads NHWC
    assert adds[1].b.op == "get_attr" and adds[1].a is adds[0].node
    st = result.stats
    assert st["add"] == 2 and st["on_pytorch"] == 0 and st["layout_copies"] == 0
    assert not any("left on PyTorch" in n or "not lowered" in n for n in result.notes)


@pytest.mark.parametrize("lowered_net", ["float_res", "float_se"])
def test_float_rows_equal_the_graph_before(lowered_net, request, monkeypatch):
    """The residual adds and the squeeze-excitation gate, lowered: the kernels (interpreted)
    and the ops' PyTorch reference each equal the graph before."""
    x, before, gm, result = request.getfixturevalue(lowered_net)
    with torch.no_grad():
        ref = before(x)
        st = compare_outputs(gm(x), ref)  # the kernels, interpreted
        assert st.ok and st.rel_err < 1e-5, st
        monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "0")  # the ops' PyTorch reference
        assert compare_outputs(gm(x), ref).rel_err < 1e-6


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_float_residual_adds_through_optimize(on_cpu, precision):
    x = torch.randn(1, 3, 5, 4, generator=torch.Generator().manual_seed(10))
    opt = fxopt.optimize(act_res(), x, target="cpu", precision=precision,
                         passes=["lower_to_triton"])
    rec = record(opt)
    assert rec.status == "ok" and rec.stats["add"] == 2
    assert triton_ops(opt.graph_module)["triton_add"] == 2
    dtype = torch.float16 if precision else torch.float32
    with torch.no_grad():
        out = opt(x.to(dtype))
        ref = act_res().to(dtype)(x.to(dtype))
    assert out.dtype == dtype and compare_outputs(out, ref).ok


class NotFloatAdds(nn.Module):
    def forward(self, x, i):
        return x.half() + x, i + i, x + 1.0, x + x.float()


def test_add_of_ints_or_of_two_dtypes_is_left_alone(on_cpu):
    x, i = torch.randn(2, 3), torch.arange(6).reshape(2, 3)
    gm = fxopt.capture(NotFloatAdds().eval(), (x, i))
    code = gm.code
    result = apply_rules(copy.deepcopy(gm), RULES, context=TritonLowering())
    # x + 1.0 (a number) is no residual add: nothing said; x + x.float() is lowered
    assert result.counts == {"add -> triton_add": 1}
    assert len(result.rejected) == 2
    assert "dtypes torch.float16 and torch.float32 (the kernel adds one dtype)" in \
        result.rejected[0]
    assert "dtypes torch.int64, torch.int64 (the kernel adds fp16, bf16, fp32)" in \
        result.rejected[1]
    res = lower_to_triton(gm, PassContext(example_inputs=(x, i), target="cpu"))
    assert res.modified and "not lowered" in res.notes[0] and "int64" in res.notes[0]
    ops = Counter(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                  if n.op == "call_function")
    assert ops["add"] == 3 and triton_ops(gm) == {"triton_add": 1} and gm.code != code
    with torch.no_grad():
        for got, want in zip(gm(x, i), NotFloatAdds()(x, i)):
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_triton_add_op_layouts_and_fallback(on_cpu, monkeypatch):
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 5, 3, 4, generator=g).contiguous(memory_format=torch.channels_last)
    b = torch.randn(5, 1, 1, generator=g)
    y = OPS.triton_add(a, b, act="leaky_relu", act_args=[0.2])
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, F.leaky_relu(a + b, 0.2))
    assert OPS.triton_add(a.contiguous(), b).is_contiguous()
    monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "0")  # the reference: the same, any device
    assert torch.equal(OPS.triton_add(a, b, act="leaky_relu", act_args=[0.2]), y)


# -- float products: a squeeze-excitation gate, a same-shape gate then relu --------------------
def test_float_se_gate_lowered(float_se):
    x, before, gm, result = float_se
    assert sum(n.target is operator.mul for n in before.graph.nodes) == 2  # what fuse_act left
    assert triton_ops(gm) == {"triton_conv2d": 5, "triton_mul": 2}
    muls = [TRITON_MUL.view.of(n) for n in gm.graph.nodes if TRITON_MUL.view.matches(n)]
    assert [(v.act, v.node.meta["tensor_meta"].dtype) for v in muls] == \
        [("none", torch.float32), ("relu", torch.float32)]
    # the gate [N, C, 1, 1] is b (swapped); a, the stem's NHWC output, gives the layout
    gate, y = muls[0].b.meta["tensor_meta"], muls[0].a.meta["tensor_meta"]
    assert tuple(gate.shape) == (2, 8, 1, 1) and tuple(y.shape) == (2, 8, 7, 6)
    assert muls[1].a is muls[0].node
    st = result.stats
    assert st["mul"] == 2 and st["layout_copies"] == 0 and st["on_pytorch"] == 1
    assert result.notes == ["left on PyTorch (no Triton kernel): adaptive_avg_pool2d x1"]


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_float_se_gate_through_optimize(on_cpu, precision):
    x = torch.randn(1, 3, 5, 4, generator=torch.Generator().manual_seed(14))
    opt = fxopt.optimize(se(), x, target="cpu", precision=precision,
                         passes=["lower_to_triton"])
    rec = record(opt)
    assert rec.status == "ok" and rec.stats["mul"] == 2  # checked against the graph before
    dtype = torch.float16 if precision else torch.float32
    with torch.no_grad():
        out = opt(x.to(dtype))
        ref = se().to(dtype)(x.to(dtype))
    assert out.dtype == dtype and compare_outputs(out, ref).ok


class NotFloatMuls(nn.Module):
    def forward(self, x, i):
        return x * 2.0, 3 * x, i * i, i * 2, x.half() * x, x * x.float()


def test_mul_by_a_number_or_of_ints_is_left_alone(on_cpu):
    x, i = torch.randn(2, 3), torch.arange(6).reshape(2, 3)
    gm = fxopt.capture(NotFloatMuls().eval(), (x, i))
    result = apply_rules(copy.deepcopy(gm), RULES, context=TritonLowering())
    # a number times a tensor is no gate: nothing said; x * x.float() is lowered
    assert result.counts == {"mul -> triton_mul": 1}
    assert result.rejected == [
        "mul (mul_2): dtypes torch.int64, torch.int64 (the kernel multiplies fp16, bf16, fp32)",
        "mul (mul_4): dtypes torch.float16 and torch.float32 (the kernel multiplies one dtype)"]
    res = lower_to_triton(gm, PassContext(example_inputs=(x, i), target="cpu"))
    ops = Counter(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                  if n.op == "call_function")
    assert res.modified and ops["mul"] == 5 and triton_ops(gm) == {"triton_mul": 1}
    with torch.no_grad():
        for got, want in zip(gm(x, i), NotFloatMuls()(x, i)):
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_triton_mul_op_layouts_and_fallback(on_cpu, monkeypatch):
    g = torch.Generator().manual_seed(15)
    a = torch.randn(2, 5, 3, 4, generator=g).contiguous(memory_format=torch.channels_last)
    gate = torch.sigmoid(torch.randn(2, 5, 1, 1, generator=g))
    y = OPS.triton_mul(a, gate, act="hardtanh", act_args=[-0.5, 0.5])
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, F.hardtanh(a * gate, -0.5, 0.5))
    assert OPS.triton_mul(a.contiguous(), gate).is_contiguous()
    monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "0")  # the reference: the same, any device
    assert torch.equal(OPS.triton_mul(a, gate, act="hardtanh", act_args=[-0.5, 0.5]), y)
