"""lower_to_triton: fused float ops and the int8 IR onto the Triton kernels.

Without a GPU the lowered graphs run with ``FXOPT_TRITON_ON_CPU=1`` (CPU tensors go to the
launchers, which run the kernels in Triton's interpreter); the ``gpu`` tests run the same on
CUDA. The optimized models are built once per module (the interpreter is slow).
"""
import copy
import operator
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.errors import NotAvailableError, PipelineError
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.infra.rewrite import apply_rules
from fxopt.ir.tolerances import compare_outputs
from fxopt.ops.int8 import AVGPOOL_INT8, CAT_INT8
from fxopt.ops.schema import view_of
from fxopt.ops.triton import TRITON_ADD, TRITON_CONV2D, TRITON_MUL
from fxopt.ops.triton_int8 import (TRITON_ADD_INT8, TRITON_CONV2D_INT8,
                                   TRITON_DEPTHWISE_CONV2D_INT8, TRITON_MAX_POOL2D_INT8)
from fxopt.pipelines import expand_pipeline
from seeded_models import with_bn_stats  # tests/support, on the path from tests/conftest.py

pytest.importorskip("triton")
from fxopt.passes.lower.triton import RULES, TritonLowering, lower_to_triton  # noqa: E402

OPS = torch.ops.fxopt


class Net(nn.Module):
    """conv-bn-relu, a residual block, depthwise + pointwise, max pool, a plain Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 17, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(17, 5)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)) + y)
        y = F.relu6(self.dw(y))
        y = torch.sigmoid(self.pw(y))  # no CPU int8 kernel: stays float on target="cpu"
        y = self.pool(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _net():
    return with_bn_stats(Net, 0, 0.5, (0.5, 2.0), lambda m: (m.b1, m.b2))


def _triton_ops(gm) -> Counter:
    return Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("fxopt.triton_"))


def _lowered(before, x):
    """(x, ``before``'s graph, a copy of it after lower_to_triton, the pass's result)."""
    gm = copy.deepcopy(before.graph_module)
    result = lower_to_triton(gm, PassContext(example_inputs=(x,), target="cpu"))
    return x, before.graph_module, gm, result


def _record(opt, name="lower_to_triton"):
    return next(r for r in opt.report.passes if r.name == name)


@pytest.fixture(scope="module")
def on_cpu():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXOPT_TRITON_ON_CPU", "1")
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def float_opt(on_cpu, x):
    return _net(), fxopt.optimize(_net(), x, target="cpu", passes=["lower_to_triton"])


@pytest.fixture(scope="module")
def int8_opts(on_cpu, x):
    """(before: the int8 graph, lowered: the same graph after lower_to_triton, its result)."""
    g = torch.Generator().manual_seed(2)
    cal = [torch.randn(2, 3, 12, 12, generator=g) for _ in range(3)]
    before = fxopt.optimize(_net(), x, quantize="int8", calibration_data=cal, target="cpu",
                            disable=["lower_int8_cpu"])
    return _lowered(before, x)[1:]


# -- float ----------------------------------------------------------------------------------------
def test_float_cnn_matches_eager(float_opt, x):
    model, opt = float_opt
    rec = _record(opt)
    assert rec.modified and rec.status == "ok" and rec.rel_err < 1e-5
    assert opt.report.passes[-1].name == "lower_to_triton"  # last in the pipeline
    with torch.no_grad():
        st = compare_outputs(opt(x), model(x))
    assert st.ok and st.rel_err < 1e-5, st


def test_float_golden(float_opt):
    _, opt = float_opt
    gm = opt.graph_module
    assert _triton_ops(gm) == {"triton_conv2d": 3, "triton_depthwise_conv2d": 1,
                               "triton_linear": 1}
    assert not any(n.target in (OPS.conv2d_act.default, OPS.linear_act.default)
                   for n in gm.graph.nodes)
    residual = [n for n in gm.graph.nodes if TRITON_CONV2D.view.matches(n)
                and TRITON_CONV2D.view.of(n).residual is not None]
    assert len(residual) == 1  # the residual add stayed fused
    stats = _record(opt).stats
    assert stats["conv2d"] == 3 and stats["depthwise_conv2d"] == 1 and stats["linear"] == 1
    assert stats["layout_copies"] == 0  # NHWC from the entry conversion to the last conv
    # weights prepared once, as buffers: conv weights channels-last, depthwise [KH*KW, C]
    w = gm.get_buffer("c2_weight_nhwc_0")
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert tuple(gm.get_buffer("dw_weight_dw_0").shape) == (9, 8)
    assert "triton_conv2d" in opt.code


def test_float_save_load_and_cpu_fallback(float_opt, x, tmp_path, monkeypatch):
    model, opt = float_opt
    back = fxopt.load(opt.save(tmp_path / "m.fxopt"))
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))
        # Without the switch the same graph runs the ops' PyTorch reference: portable.
        monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "0")
        st = compare_outputs(back(x), model(x))
    assert st.ok, st


def test_left_on_pytorch_named(float_opt):
    _, opt = float_opt
    notes = " ".join(_record(opt).notes)
    assert "left on PyTorch" in notes and "MaxPool2d" in notes and "adaptive_avg_pool2d" in notes
    assert _record(opt).stats["on_pytorch"] == 2


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return F.gelu(self.fc(F.relu(self.c(x)).mean(-1)))


def test_conv1d_stays_on_pytorch_and_is_reported(on_cpu):
    m, x = Conv1dNet().eval(), torch.randn(2, 4, 9)
    opt = fxopt.optimize(m, x, target="cpu", passes=["lower_to_triton"])
    rec = _record(opt)
    assert rec.status == "ok" and rec.stats["linear"] == 1
    assert any(n.target is OPS.conv1d_act.default for n in opt.graph_module.graph.nodes)
    assert "conv1d_act x1" in " ".join(rec.notes)
    with torch.no_grad():
        assert compare_outputs(opt(x), m(x)).ok


# -- float residual adds that fuse_act cannot fold into a convolution ------------------------------
class ActResBlock(nn.Module):
    """A float ResNet-like block whose adds stay after fuse_act: the branch ends in its own
    activation (so the add cannot be a convolution's residual), then a per-channel shift (a
    broadcast parameter, written first) and a 1x1 convolution reading the sum."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.shift = nn.Parameter(torch.randn(8, 1, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        y = F.relu(x + y)             # relu(add): one triton_add(act="relu")
        return self.head(self.shift + y)  # b broadcasts to a: the operands swap


def _act_res(precision=None):
    return with_bn_stats(ActResBlock, 8, 0.3, (0.5, 2.0), lambda m: (m.bn, m.b1, m.b2))


@pytest.fixture(scope="module")
def float_res(on_cpu):
    """(x, the float graph before lower_to_triton, the graph after, the pass's result)."""
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(9))
    before = fxopt.optimize(_act_res(), x, target="cpu", disable=["lower_to_triton"])
    return _lowered(before, x)


def test_float_residual_adds_lowered(float_res):
    x, before, gm, result = float_res
    assert sum(n.target is operator.add for n in before.graph.nodes) == 2  # what fuse_act left
    assert _triton_ops(gm) == {"triton_conv2d": 4, "triton_add": 2}
    adds = [TRITON_ADD.view.of(n) for n in gm.graph.nodes if TRITON_ADD.view.matches(n)]
    assert [(v.act, v.node.meta["tensor_meta"].dtype) for v in adds] == \
        [("relu", torch.float32), ("none", torch.float32)]
    # the broadcast parameter is b (swapped); a stays NHWC, so the 1x1 convolution reads NHWC
    assert adds[1].b.op == "get_attr" and adds[1].a is adds[0].node
    st = result.stats
    assert st["add"] == 2 and st["on_pytorch"] == 0 and st["layout_copies"] == 0
    assert not any("left on PyTorch" in n or "not lowered" in n for n in result.notes)


def test_float_residual_adds_equal_the_graph_before(float_res, monkeypatch):
    x, before, gm, result = float_res
    with torch.no_grad():
        ref = before(x)
        st = compare_outputs(gm(x), ref)  # the kernels, interpreted
        assert st.ok and st.rel_err < 1e-5, st
        monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "0")  # the ops' PyTorch reference
        assert compare_outputs(gm(x), ref).rel_err < 1e-6


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_float_residual_adds_through_optimize(on_cpu, precision):
    x = torch.randn(1, 3, 5, 4, generator=torch.Generator().manual_seed(10))
    opt = fxopt.optimize(_act_res(), x, target="cpu", precision=precision,
                         passes=["lower_to_triton"])
    rec = _record(opt)
    assert rec.status == "ok" and rec.stats["add"] == 2
    assert _triton_ops(opt.graph_module)["triton_add"] == 2
    dtype = torch.float16 if precision else torch.float32
    with torch.no_grad():
        out = opt(x.to(dtype))
        ref = _act_res().to(dtype)(x.to(dtype))
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
    assert ops["add"] == 3 and _triton_ops(gm) == {"triton_add": 1} and gm.code != code
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
class SEBlock(nn.Module):
    """conv-bn-relu, then a squeeze-excitation gate (pool, 1x1 conv-relu, 1x1 conv-sigmoid)
    times its input (the gate [N, C, 1, 1] written first), then a same-shape gate and a relu,
    then a 1x1 convolution: fuse_act leaves both products (and the relu) to the lowering."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.attn, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = g * y                                       # the SE gate: the operands swap
        y = F.relu(y * torch.sigmoid(self.attn(y)))     # one triton_mul(act="relu")
        return self.head(y)


def _se():
    return with_bn_stats(SEBlock, 12, 0.3, (0.5, 2.0), lambda m: (m.bn,))


@pytest.fixture(scope="module")
def float_se(on_cpu):
    """(x, the float SE graph before lower_to_triton, the graph after, the pass's result)."""
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(13))
    before = fxopt.optimize(_se(), x, target="cpu", disable=["lower_to_triton"])
    return _lowered(before, x)


def test_float_se_gate_lowered(float_se):
    x, before, gm, result = float_se
    assert sum(n.target is operator.mul for n in before.graph.nodes) == 2  # what fuse_act left
    assert _triton_ops(gm) == {"triton_conv2d": 5, "triton_mul": 2}
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


def test_float_se_gate_equals_the_graph_before(float_se, monkeypatch):
    x, before, gm, result = float_se
    with torch.no_grad():
        ref = before(x)
        st = compare_outputs(gm(x), ref)  # the kernels, interpreted
        assert st.ok and st.rel_err < 1e-5, st
        monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "0")  # the ops' PyTorch reference
        assert compare_outputs(gm(x), ref).rel_err < 1e-6


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_float_se_gate_through_optimize(on_cpu, precision):
    x = torch.randn(1, 3, 5, 4, generator=torch.Generator().manual_seed(14))
    opt = fxopt.optimize(_se(), x, target="cpu", precision=precision,
                         passes=["lower_to_triton"])
    rec = _record(opt)
    assert rec.status == "ok" and rec.stats["mul"] == 2  # checked against the graph before
    dtype = torch.float16 if precision else torch.float32
    with torch.no_grad():
        out = opt(x.to(dtype))
        ref = _se().to(dtype)(x.to(dtype))
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
    assert res.modified and ops["mul"] == 5 and _triton_ops(gm) == {"triton_mul": 1}
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


# -- int8 -----------------------------------------------------------------------------------------
def test_int8_within_one_step_of_the_int8_graph(int8_opts, x):
    before, lowered, result = int8_opts
    assert result.modified and result.max_abs_tolerance > 0
    with torch.no_grad():
        ref, out = before(x), lowered(x)
    assert (out - ref).abs().max().item() <= result.max_abs_tolerance


def test_int8_golden_codes_between_layers(int8_opts):
    before, gm, result = int8_opts
    old = Counter(str(n.target).split(".")[1] for n in before.graph.nodes
                  if n.op == "call_function" and str(n.target).startswith("fxopt."))
    new = _triton_ops(gm)
    # every int8 IR layer and grid op became its Triton op (a layer quantize_int8 kept in float,
    # if any, became a float Triton op)
    assert new["triton_quantize"] == old["quantize"] >= 1
    assert new["triton_dequantize"] == old["dequantize"] >= 1
    assert new["triton_conv2d_int8"] + new["triton_depthwise_conv2d_int8"] == old["conv2d_int8"]
    assert new["triton_depthwise_conv2d_int8"] == 1 and new["triton_linear_int8"] == 1
    assert new["triton_conv2d"] + new["triton_depthwise_conv2d"] == old["conv2d_act"]
    views = [view_of(n) for n in gm.graph.nodes]
    left = {v.name for v in views if v is not None and v.schema.family != "triton"}
    assert left <= {"add_int8", "cat_int8", "adaptive_avg_pool2d_int8", "max_pool2d_int8"}
    codes = [n for n in gm.graph.nodes if TRITON_CONV2D_INT8.view.matches(n)
             or TRITON_DEPTHWISE_CONV2D_INT8.view.matches(n)]
    assert len(codes) >= 2
    for n in codes:  # int8 codes flow between quantized layers, grids are plain numbers
        v = (TRITON_CONV2D_INT8.view.match(n) or TRITON_DEPTHWISE_CONV2D_INT8.view.of(n))
        assert v.out_int8 is True and n.meta["tensor_meta"].dtype == torch.uint8
        assert isinstance(v.x_scale, float) and isinstance(v.x_zp, int)
    assert result.stats["layout_copies"] == 0
    # the residual add runs on the codes too
    assert new["triton_add_int8"] == old["add_int8"] >= 1 and "add_int8" not in left
    # ops with no Triton kernel (here float pooling after the region) stay on PyTorch, and the
    # report says which
    notes = " ".join(result.notes)
    assert "add_int8" not in notes and "MaxPool2d" in notes and result.stats["on_pytorch"] >= 1


def test_int8_through_optimize_and_saved(on_cpu, tmp_path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 8, 8, generator=g)
    cal = [torch.randn(1, 3, 8, 8, generator=g)]
    opt = fxopt.optimize(_net(), x, quantize="int8", calibration_data=cal, target="cpu",
                         passes=["lower_to_triton"])
    names = [r.name for r in opt.report.passes]
    assert names[-1] == "lower_to_triton" and "lower_int8_cpu" not in names
    rec = _record(opt)
    assert rec.status == "ok" and rec.max_abs_err <= rec.tolerance
    back = fxopt.load(opt.save(tmp_path / "q.fxopt"))
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))


# -- int8 residual CNN: adds and pools on the codes ----------------------------------------------
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class MiniResNet(nn.Module):
    """ResNet's shape in small: stem, 3x3/2 max pool, an identity and a downsampling block,
    global average pool, fc."""

    def __init__(self, pool_size=1):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.l1 = Block(8, 8, 1)
        self.l2 = Block(8, 16, 2)
        self.avg = nn.AdaptiveAvgPool2d(pool_size)
        self.fc = nn.Linear(16 * pool_size ** 2, 5)

    def forward(self, x):
        x = self.l2(self.l1(self.pool(F.relu(self.bn(self.stem(x))))))
        return self.fc(torch.flatten(self.avg(x), 1))


def _mini(pool_size=1):
    return with_bn_stats(lambda: MiniResNet(pool_size), 4, 0.3, (0.5, 2.0))


def _mini_int8(pool_size=1, size=23):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, size, size, generator=g)
    cal = [torch.randn(2, 3, size, size, generator=g) for _ in range(3)]
    before = fxopt.optimize(_mini(pool_size), x, quantize="int8", calibration_data=cal,
                            target="cpu", disable=["lower_int8_cpu"])
    return _lowered(before, x)


@pytest.fixture(scope="module")
def resnet_int8(on_cpu):
    return _mini_int8()


def _fxopt_ops(gm) -> Counter:
    return Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("fxopt."))


def test_int8_resnet_adds_and_pools_lowered(resnet_int8):
    x, before, gm, result = resnet_int8
    old, new = _fxopt_ops(before), _fxopt_ops(gm)
    assert old["add_int8"] == 2 and old["max_pool2d_int8"] == 1
    assert old["adaptive_avg_pool2d_int8"] == 1
    # golden: every int8 op is a Triton op now, nothing left on PyTorch but the flatten view
    assert new == {"triton_quantize": 1, "triton_conv2d_int8": 6, "triton_max_pool2d_int8": 1,
                   "triton_add_int8": 2, "triton_global_avg_pool2d_int8": 1,
                   "triton_linear_int8": 1, "triton_dequantize": 1}
    st = result.stats
    assert (st["add_int8"], st["max_pool2d_int8"], st["global_avg_pool2d_int8"]) == (2, 1, 1)
    assert st["on_pytorch"] == 0 and st["layout_copies"] == 0
    assert not any("left on PyTorch" in n or "not lowered" in n for n in result.notes)
    adds = [TRITON_ADD_INT8.view.of(n) for n in gm.graph.nodes
            if TRITON_ADD_INT8.view.matches(n)]
    for v in adds:  # grids as numbers, the block's relu fused, codes out
        assert isinstance(v.a_scale, float) and isinstance(v.a_zp, int)
        assert v.act == "relu" and v.node.meta["tensor_meta"].dtype == torch.uint8
    pool = next(TRITON_MAX_POOL2D_INT8.view.of(n) for n in gm.graph.nodes
                if TRITON_MAX_POOL2D_INT8.view.matches(n))
    assert (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) == \
        ([3, 3], [2, 2], [1, 1], [1, 1], False)
    again = copy.deepcopy(gm)
    code = again.code
    assert not lower_to_triton(again, PassContext(example_inputs=(x,), target="cpu")).modified
    assert again.code == code


def test_int8_resnet_within_one_step(resnet_int8):
    x, before, gm, result = resnet_int8
    with torch.no_grad():
        ref, out = before(x), gm(x)
    assert (out - ref).abs().max().item() <= result.max_abs_tolerance


def test_int8_resnet_cpu_fallback_matches(resnet_int8, monkeypatch):
    # without the switch the new ops run the IR's references (a model saved on a GPU loads here)
    x, before, gm, result = resnet_int8
    monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "0")
    with torch.no_grad():
        ref, out = before(x), gm(x)
    assert (out - ref).abs().max().item() <= result.max_abs_tolerance


def test_int8_avg_pool_to_other_sizes_stays_and_is_named(on_cpu):
    x, before, gm, result = _mini_int8(pool_size=2, size=32)
    new = _fxopt_ops(gm)
    assert new["adaptive_avg_pool2d_int8"] == 1 and new["triton_add_int8"] == 2
    assert "adaptive_avg_pool2d_int8" in " ".join(result.notes)
    assert "output size [2, 2]" in " ".join(result.notes)
    with torch.no_grad():
        assert (gm(x) - before(x)).abs().max().item() <= result.max_abs_tolerance


def test_triton_add_int8_op_layouts_and_broadcast(on_cpu):
    g = torch.Generator().manual_seed(6)
    a = torch.randint(0, 256, (2, 5, 3, 4), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 5, 3, 4), generator=g, dtype=torch.uint8)
    a_cl = a.contiguous(memory_format=torch.channels_last)
    args = (0.03, 120, 0.02, 131, 0.05, 0)

    def run(a_, b_):
        return OPS.triton_add_int8(a_, args[0], args[1], b_, *args[2:], act="relu")

    ref = OPS.add_int8(a, *(torch.tensor(v) for v in args[:2]), b,
                       *(torch.tensor(v) for v in args[2:]), act="relu")
    y = run(a_cl, b)   # b converted to a's layout, output channels-last
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, ref)
    assert torch.equal(run(a, b[:1]), OPS.add_int8(a, *(torch.tensor(v) for v in args[:2]),
                                                   b[:1].expand_as(a).contiguous(),
                                                   *(torch.tensor(v) for v in args[2:]),
                                                   act="relu"))


# -- the table: every row fires, a rejected case stays and is named, other ops are left alone --
class FloatLayers(nn.Module):
    """A depthwise and a plain convolution and a linear layer, each followed by an activation
    (fused: conv2d_act / linear_act; captured as they are: nn.Conv2d / nn.Linear calls)."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.c(F.relu(self.dw(x))))
        return F.relu(self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)))


def _rows(gm) -> tuple:
    """The table run on a copy of ``gm``: (counts per row, the result)."""
    result = apply_rules(copy.deepcopy(gm), RULES, context=TritonLowering())
    return result.counts, result


def test_every_row_fires(int8_opts, resnet_int8, float_res, float_se):
    x = torch.randn(2, 3, 8, 8)
    captured = fxopt.capture(FloatLayers().eval(), x)
    fused, _ = PassManager(expand_pipeline(["fuse_act"])).run(
        copy.deepcopy(captured), PassContext(example_inputs=(x,)))
    counts = Counter()
    for gm in (captured, fused, int8_opts[0], resnet_int8[1], float_res[1], float_se[1]):
        counts.update(_rows(gm)[0])
    assert set(counts) == {rule.name for rule in RULES}
    assert counts["Conv2d -> triton_depthwise_conv2d"] == 1 == counts["Conv2d -> triton_conv2d"]
    assert counts["conv2d_act -> triton_depthwise_conv2d"] >= 1
    assert counts["Linear -> triton_linear"] >= 1 and counts["linear_act -> triton_linear"] == 1
    module_rows, result = _rows(captured)
    assert module_rows == {"Conv2d -> triton_depthwise_conv2d": 1, "Conv2d -> triton_conv2d": 1,
                           "Linear -> triton_linear": 1}
    assert result.tallies == {"depthwise_conv2d": 1, "conv2d": 1, "linear": 1}  # the stats


def _grid_graph(emit) -> fx.GraphModule:
    """A tiny graph: ``emit(graph, q, scale, zp)`` on an input of uint8 codes."""
    root = nn.Module()
    root.register_buffer("s", torch.tensor(0.1))
    root.register_buffer("z", torch.tensor(3))
    g = fx.Graph()
    q, s, z = g.placeholder("q"), g.get_attr("s"), g.get_attr("z")
    g.output(emit(g, q, s, z))
    return fx.GraphModule(root, g)


def test_rejected_case_stays_and_is_named():
    def pool(size):
        return _grid_graph(lambda g, q, s, z: AVGPOOL_INT8.emit(
            g, q=q, output_size=size, scale=s, zp=z, qmin=0, qmax=255, name="pool"))

    gm = pool([2, 2])
    code = gm.code
    result = apply_rules(gm, RULES, context=TritonLowering())
    assert result.count == 0 and gm.code == code
    assert result.rejected == ["adaptive_avg_pool2d_int8 (pool): output size [2, 2] (the "
                               "kernel pools to 1x1)"]
    result = apply_rules(pool([1, 1]), RULES, context=TritonLowering())
    assert result.counts == {"adaptive_avg_pool2d_int8 -> triton_global_avg_pool2d_int8": 1}


def test_op_without_a_row_is_left_alone(on_cpu):
    gm = _grid_graph(lambda g, q, s, z: CAT_INT8.emit(
        g, qs=[q, q], scales=[s, s], zps=[z, z], dim=1, y_scale=s, y_zp=z, y_qmin=0,
        y_qmax=255))
    code = gm.code
    result = apply_rules(gm, RULES, context=TritonLowering())
    assert result.count == 0 and result.notes == [] and gm.code == code
    res = lower_to_triton(gm, PassContext(example_inputs=(torch.zeros(1, 2, 3, 3),),
                                          target="cpu"))
    assert res.modified is False and res.notes == [] and gm.code == code


# -- contract -------------------------------------------------------------------------------------
def test_idempotent(int8_opts, x):
    _, gm, _ = int8_opts
    gm = copy.deepcopy(gm)
    code = gm.code
    again = lower_to_triton(gm, PassContext(example_inputs=(x,), target="cpu"))
    assert again.modified is False and gm.code == code


def test_negative_nothing_to_lower(on_cpu):
    m = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.randn(1, 2, 4, 4)
    gm = fxopt.capture(m, (x,))
    code = gm.code
    res = lower_to_triton(gm, PassContext(example_inputs=(x,), target="cpu"))
    assert res.modified is False and gm.code == code


def test_cpu_target_without_switch_is_a_no_op(monkeypatch, x):
    monkeypatch.delenv("FXOPT_TRITON_ON_CPU", raising=False)
    gm = fxopt.optimize(_net(), x, target="cpu").graph_module
    code = gm.code
    res = lower_to_triton(gm, PassContext(example_inputs=(x,), target="cpu"))
    assert res.modified is False and gm.code == code
    assert "FXOPT_TRITON_ON_CPU" in res.notes[0]


# -- precision= -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, err, match", [
    ({"precision": "fp8"}, PipelineError, "precision must be one of"),
    ({"precision": "fp16", "target": "cpu"}, PipelineError, "is for target='cuda'"),
])
def test_precision_errors(kwargs, err, match, monkeypatch, x):
    monkeypatch.delenv("FXOPT_TRITON_ON_CPU", raising=False)
    with pytest.raises(err, match=match):
        fxopt.optimize(_net(), x, **kwargs)


def test_precision_with_int8_not_available(on_cpu, x):
    with pytest.raises(NotAvailableError, match="together with quantize"):
        fxopt.optimize(_net(), x, target="cpu", precision="bf16", quantize="int8",
                       calibration_data=[x])


def test_fp16_lowered_interpreted(on_cpu):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 16, 4))
    m.eval()
    x = torch.randn(1, 3, 4, 4)
    opt = fxopt.optimize(m, x, target="cpu", precision="fp16", passes=["lower_to_triton"])
    rec = _record(opt)
    assert rec.status == "ok" and rec.tolerance == 1e-2
    assert _triton_ops(opt.graph_module) == {"triton_conv2d": 1, "triton_depthwise_conv2d": 1,
                                             "triton_linear": 1}
    assert any("precision float16" in n for n in opt.report.notes)
    with torch.no_grad():
        out = opt(x.half())
        assert out.dtype == torch.float16
        assert compare_outputs(out, m.half()(x.half())).ok


# -- on a GPU -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_float(precision, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # fp32: full fp32 everywhere (TF32 roundings of cuDNN and of the kernels would differ)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    m = _net().cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    opt = fxopt.optimize(m, x, target="cuda", precision=precision)
    rec = _record(opt)
    assert rec.status == "ok" and rec.modified
    assert _triton_ops(opt.graph_module)["triton_conv2d"] == 3
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    with torch.no_grad():
        out = opt(x.to(dtype))
        ref = copy.deepcopy(m).to(dtype)(x.to(dtype))
    assert out.dtype == dtype and compare_outputs(out, ref).ok


@pytest.mark.gpu
def test_cuda_int8_resnet_adds_and_pools(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = _mini().cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    cal = [torch.randn(8, 3, 64, 64, device="cuda") for _ in range(3)]
    opt = fxopt.optimize(m, x, target="cuda", quantize="int8", calibration_data=cal)
    rec = _record(opt)
    assert rec.status == "ok" and rec.max_abs_err <= rec.tolerance
    st = rec.stats
    assert (st["add_int8"], st["max_pool2d_int8"], st["global_avg_pool2d_int8"]) == (2, 1, 1)
    assert st["on_pytorch"] == 0


@pytest.mark.gpu
def test_cuda_int8_and_save(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = _net().cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    cal = [torch.randn(4, 3, 32, 32, device="cuda") for _ in range(3)]
    opt = fxopt.optimize(m, x, target="cuda", quantize="int8", calibration_data=cal)
    rec = _record(opt)
    assert rec.status == "ok" and rec.stats["conv2d_int8"] == 3
    back = fxopt.load(opt.save(tmp_path / "q.fxopt")).cuda()
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))
