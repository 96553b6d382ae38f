"""lower_to_triton: fused float ops and the int8 IR onto the Triton kernels.

Without a GPU the lowered graphs run with ``FXOPT_TRITON_ON_CPU=1`` (CPU tensors go to the
launchers, which run the kernels in Triton's interpreter); the ``gpu`` tests run the same on
CUDA. The optimized models are built once per module (the interpreter is slow). Here: whole
models (float and int8), the table, the contract, precision=; the float add/mul rows are in
test_triton_float_binary.py, the int8 adds and pools in test_triton_int8_between.py.
"""
import copy
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.quant.config import QuantConfig
from fxopt.errors import NotAvailableError, PipelineError
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.infra.rewrite import apply_rules
from fxopt.ir.tolerances import compare_outputs
from fxopt.ops.int8 import AVGPOOL_INT8, CAT_INT8
from fxopt.ops.schema import view_of
from fxopt.ops.triton import TRITON_CONV2D
from fxopt.ops.triton_int8 import (TRITON_CONV2D_INT8,
                                   TRITON_DEPTHWISE_CONV2D_INT8)
from fxopt.pipelines import expand_pipeline
from seeded_models import with_bn_stats  # tests/support, on the path from tests/conftest.py

pytest.importorskip("triton")
from fxopt.passes.lower.triton import RULES, TritonLowering, lower_to_triton  # noqa: E402
from triton_cases import lowered, record, triton_ops  # noqa: E402  (tests/support)

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
        y = torch.sigmoid(self.pw(y))  # kept float by the int8 fixture (keep_float)
        y = self.pool(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _net():
    return with_bn_stats(Net, 0, 0.5, (0.5, 2.0), lambda m: (m.b1, m.b2))


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
    # pw (+ sigmoid) kept float, so the max pool after it is float: an op with no Triton kernel
    before = fxopt.optimize(_net(), x, quantize=QuantConfig(keep_float=["pw"]),
                            calibration_data=cal, target="cpu", disable=["lower_int8_cpu"])
    return lowered(before, x)[1:]


# -- float ----------------------------------------------------------------------------------------
def test_float_cnn_matches_eager(float_opt, x):
    model, opt = float_opt
    rec = record(opt)
    assert rec.modified and rec.status == "ok" and rec.rel_err < 1e-5
    assert opt.report.passes[-1].name == "lower_to_triton"  # last in the pipeline
    with torch.no_grad():
        st = compare_outputs(opt(x), model(x))
    assert st.ok and st.rel_err < 1e-5, st


def test_float_golden(float_opt):
    _, opt = float_opt
    gm = opt.graph_module
    assert triton_ops(gm) == {"triton_conv2d": 3, "triton_depthwise_conv2d": 1,
                               "triton_linear": 1}
    assert not any(n.target in (OPS.conv2d_act.default, OPS.linear_act.default)
                   for n in gm.graph.nodes)
    residual = [n for n in gm.graph.nodes if TRITON_CONV2D.view.matches(n)
                and TRITON_CONV2D.view.of(n).residual is not None]
    assert len(residual) == 1  # the residual add stayed fused
    stats = record(opt).stats
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
    notes = " ".join(record(opt).notes)
    assert "left on PyTorch" in notes and "MaxPool2d" in notes and "adaptive_avg_pool2d" in notes
    assert record(opt).stats["on_pytorch"] == 2


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
    rec = record(opt)
    assert rec.status == "ok" and rec.stats["linear"] == 1
    assert any(n.target is OPS.conv1d_act.default for n in opt.graph_module.graph.nodes)
    assert "conv1d_act x1" in " ".join(rec.notes)
    with torch.no_grad():
        assert compare_outputs(opt(x), m(x)).ok


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
    new = triton_ops(gm)
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
    rec = record(opt)
    assert rec.status == "ok" and rec.max_abs_err <= rec.tolerance
    back = fxopt.load(opt.save(tmp_path / "q.fxopt"))
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))


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


class AddNorm(nn.Module):
    """A residual add and its LayerNorm (fuse_add_layer_norm: add_layer_norm)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)

    def forward(self, x, r):
        return self.ln(x + r)


def _add_norm_graph():
    args = (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    gm, _ = PassManager(expand_pipeline(["fuse_add_layer_norm"])).run(
        fxopt.capture(AddNorm().eval(), args), PassContext(example_inputs=args))
    return gm


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
    for gm in (captured, fused, int8_opts[0], resnet_int8[1], float_res[1], float_se[1],
               _add_norm_graph()):
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
    rec = record(opt)
    assert rec.status == "ok" and rec.tolerance == 1e-2
    assert triton_ops(opt.graph_module) == {"triton_conv2d": 1, "triton_depthwise_conv2d": 1,
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
    rec = record(opt)
    assert rec.status == "ok" and rec.modified
    assert triton_ops(opt.graph_module)["triton_conv2d"] == 3
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    with torch.no_grad():
        out = opt(x.to(dtype))
        ref = copy.deepcopy(m).to(dtype)(x.to(dtype))
    assert out.dtype == dtype and compare_outputs(out, ref).ok


@pytest.mark.gpu
def test_cuda_int8_and_save(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = _net().cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    cal = [torch.randn(4, 3, 32, 32, device="cuda") for _ in range(3)]
    opt = fxopt.optimize(m, x, target="cuda", quantize="int8", calibration_data=cal)
    rec = record(opt)
    assert rec.status == "ok" and rec.stats["conv2d_int8"] == 3
    back = fxopt.load(opt.save(tmp_path / "q.fxopt")).cuda()
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))
