"""``mul_int8``, the product of two int8 values (a squeeze-excitation gate ``x * gate``), through
the whole int8 path: the op against a float64 hand computation, its fake and simulation; the
quantizer (golden op counts of an SE block, within one output step of the simulation); the CPU
lowering (``quantized.mul``, and the reference row for an activation it does not fuse), within
one step of the IR; the ONNX QDQ export of both forms in ONNX Runtime; the Triton lowering
leaving it on PyTorch; a product with a float input left alone.
"""
import copy
import operator
from functools import partial

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from int8_op_checks import (calibration, check_triton_leaves_on_pytorch, codes, count, lower_cpu,
                            quantize_ir, t)
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.ops.cpu import CPU_MUL_INT8
from fxopt.ops.int8 import DEQUANTIZE, MUL_INT8, QUANTIZE, MulInt8, mul_int8_reference
from fxopt.quant.config import QuantConfig
from fxopt.quant.qparams import QParams
from fxopt.quant.simulate import fake_quant

lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
quant = __import__("fxopt.passes.quant.quantize", fromlist=["quantize"])
OPS = torch.ops.fxopt
MUL8, CONV8 = OPS.mul_int8.default, OPS.conv2d_int8.default
AVG8 = OPS.adaptive_avg_pool2d_int8.default
Q, DQ = OPS.quantize.default, OPS.dequantize.default
G = torch.Generator().manual_seed(5)
# every layer int8, kernel or not, whatever the model's SQNR
NO_FLOAT_GATE = QuantConfig(float_without_kernel=False, min_sqnr_db=None)
_t, _count = t, count
_codes = partial(codes, generator=G)
_cal = partial(calibration, shape=(4, 3, 8, 8))


def _quantize(model, x, cfg=NO_FLOAT_GATE):
    return quantize_ir(model, x, cfg, _cal())


class SE(nn.Module):
    """conv-relu, then a squeeze-excitation gate (pool, fc-relu, fc-sigmoid) times its input,
    then a conv: the gate [N, C, 1, 1] broadcasts over H, W."""

    def __init__(self, gate_first=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.head = nn.Conv2d(16, 8, 1)
        self.gate_first = gate_first

    def forward(self, x):
        y = torch.relu(self.stem(x))
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(g * y if self.gate_first else y * g)


# -- the op ---------------------------------------------------------------------------------------
CASES = [  # a shape, b shape, channels-last, grid (qmin, qmax), act
    ((2, 8, 5, 5), (2, 8, 5, 5), False, (0, 255), "none"),
    ((2, 8, 5, 5), (2, 8, 1, 1), True, (0, 255), "none"),     # the SE gate
    ((2, 8, 1, 1), (2, 8, 5, 5), True, (0, 255), "relu"),     # gate first
    ((3, 8, 4, 6), (1, 8, 1, 1), False, (-128, 127), "silu"),  # symmetric int8 grids
    ((4, 16), (1, 16), False, (0, 255), "none"),
]


@pytest.mark.parametrize("sa,sb,cl,grid,act", CASES)
def test_reference_against_float64(sa, sb, cl, grid, act):
    lo, hi = grid
    dt = torch.uint8 if lo == 0 else torch.int8
    a, b = _codes(sa, lo, hi, dt, cl), _codes(sb, lo, hi, dt, cl)
    (s_a, z_a), (s_b, z_b), (s_y, z_y) = (0.031, 120 + lo), (0.0047, 3 + lo), (0.02, 100 + lo)
    y = OPS.mul_int8(a, _t(s_a), _t(z_a, torch.int64), b, _t(s_b), _t(z_b, torch.int64),
                     _t(s_y), _t(z_y, torch.int64), act=act, y_qmin=lo, y_qmax=hi)
    f64 = ((a.to(torch.int64) - z_a).double() * s_a) * ((b.to(torch.int64) - z_b).double() * s_b)
    f64 = {"none": f64, "relu": torch.relu(f64), "silu": F.silu(f64)}[act]
    want = (torch.round(f64 / s_y) + z_y).clamp(lo, hi).to(torch.int64)
    off = (y.to(torch.int64) - want).abs()
    assert y.dtype == dt and y.shape == torch.broadcast_shapes(sa, sb)
    assert int(off.max()) <= 1 and int((off > 0).sum()) <= max(1, off.numel() // 100)


def test_reference_is_pytorchs_quantized_mul():
    """quantized.mul (what lower_int8_cpu runs) on an SE gate: within one code of the reference
    (it rounds (a - za)(b - zb) * (sa sb / sy), the reference the float32 product)."""
    a = _codes((4, 32, 7, 7), channels_last=True)
    b = _codes((4, 32, 1, 1), channels_last=True)
    grids = [(0.031, 120), (1 / 256, 0), (0.02, 100)]
    ref = mul_int8_reference(a, _t(0.031), _t(120), b, _t(1 / 256), _t(0), _t(0.02), _t(100))
    qa, qb = (torch._make_per_tensor_quantized_tensor(q, s, z)
              for q, (s, z) in zip((a, b), grids))
    ker = torch.ops.quantized.mul(qa, qb, *grids[2]).int_repr()
    off = (ker.to(torch.int64) - ref.to(torch.int64)).abs()
    assert int(off.max()) <= 1 and int((off > 0).sum()) <= off.numel() // 100


@pytest.mark.parametrize("sa,sb,cl", [(c[0], c[1], c[2]) for c in CASES])
def test_fake_matches_real(sa, sb, cl):
    a, b = _codes(sa, channels_last=cl), _codes(sb, channels_last=cl)
    args = (a, _t(0.1), _t(3, torch.int64), b, _t(0.2), _t(5, torch.int64), _t(0.05),
            _t(7, torch.int64))
    real = OPS.mul_int8(*args)
    mode = FakeTensorMode()
    with mode:
        fake = OPS.mul_int8(*torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor,
                                                               args))
    assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()
    torch.library.opcheck(OPS.mul_int8, args, dict(act="relu"),
                          test_utils=("test_schema", "test_faketensor"))


def test_simulation_is_the_reference():
    """The generic role handling of the simulation (fake-quantized inputs, the float product,
    fake-quantized onto the mul's grid) is the reference, bit for bit."""
    x = 3 * torch.randn(2, 8, 6, 6, generator=G)
    g = torch.rand(2, 8, 1, 1, generator=G)
    qx, qg, qy = (QParams(_t(s), _t(z, torch.int64), 0, 255, torch.uint8)
                  for s, z in ((0.05, 128), (1 / 255, 0), (0.04, 120)))
    sim = fake_quant(fake_quant(x, qx) * fake_quant(g, qg), qy)
    codes = OPS.mul_int8(qx.quantize(x), qx.scale, qx.zero_point, qg.quantize(g), qg.scale,
                         qg.zero_point, qy.scale, qy.zero_point)
    assert torch.equal(OPS.dequantize(codes, qy.scale, qy.zero_point), sim)


# -- the quantizer ------------------------------------------------------------------------------
@pytest.mark.parametrize("gate_first", [False, True])
def test_se_block_golden_and_within_one_step(gate_first):
    x = torch.randn(2, 3, 8, 8)
    gm, rec, ctx, before = _quantize(SE(gate_first), x)
    assert (_count(gm, Q), _count(gm, CONV8), _count(gm, AVG8), _count(gm, MUL8),
            _count(gm, DQ)) == (1, 4, 1, 1, 1)
    assert _count(gm, operator.mul) == 0 and rec.stats["mul"] == 1
    mul = next(n for n in gm.graph.nodes if n.target is MUL8)
    v = MulInt8.of(mul)
    stem, gate = (v.b, v.a) if gate_first else (v.a, v.b)
    assert stem.target is CONV8 and gate.target is CONV8  # both codes: no float round trip
    assert tuple(gate.meta["tensor_meta"].shape) == (2, 16, 1, 1)
    assert mul.meta["tensor_meta"].dtype == torch.uint8 and v.act == "none"
    assert [u.target for u in mul.users] == [CONV8]  # the head reads the codes
    # within one output step of the simulation (the manager checked it on x; fresh inputs here)
    res = quant.quantize_int8(before, ctx)
    assert res.gm.code == gm.code and res.max_abs_tolerance == rec.tolerance
    for xb in _cal(n=3, seed=7):
        with torch.no_grad():
            ref, out = res.reference(xb), gm(xb)
        assert (out - ref).abs().max().item() <= rec.tolerance


def test_sigmoid_gate_is_int8_on_cpu_by_default():
    """On the CPU with the default float_without_kernel=True, conv + sigmoid has an int8 CPU
    kernel (oneDNN's, the sigmoid on its float output): the gate is int8 and so is the mul
    (before, the gate stayed float and the mul with it)."""
    gm, rec, _, _ = _quantize(SE(), torch.randn(2, 3, 8, 8), cfg=QuantConfig(min_sqnr_db=None))
    assert _count(gm, MUL8) == 1 and _count(gm, operator.mul) == 0
    assert rec.stats["mul"] == 1 and "no_cpu_kernel" not in rec.stats


class FloatProducts(nn.Module):
    """Products the quantizer leaves alone: two floats (the input squared), an int8 value times
    a float one, an int8 value times a scalar."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x * x))
        return self.c2(y * torch.sin(y)) * 2.0


def test_mul_with_a_float_input_is_left_alone():
    gm, rec, _, _ = _quantize(FloatProducts(), torch.randn(2, 3, 8, 8),
                              cfg=QuantConfig(min_sqnr_db=None))
    assert _count(gm, MUL8) == 0 and _count(gm, operator.mul) == 3
    assert _count(gm, CONV8) == 2 and "mul" not in rec.stats


# -- the CPU lowering ---------------------------------------------------------------------------
@pytest.mark.skipif(not lower.quantized_engine_available(), reason="no quantized CPU engine")
def test_cpu_lowering_runs_quantized_mul_within_one_step():
    x = torch.randn(2, 3, 8, 8)
    ir, _, ctx, _ = _quantize(SE(), x)
    low, rec = lower_cpu(ir, ctx)
    targets = [n.target for n in low.graph.nodes]
    assert targets.count(CPU_MUL_INT8.overload) == 1 and MUL8 not in targets
    assert rec.stats["mul"] == 1 and rec.stats["fallback"] == 0  # fc2 (sigmoid) on oneDNN
    for xb in _cal(n=3, seed=8, shape=(4, 3, 12, 12)):  # another spatial size too
        with torch.no_grad():
            assert (low(xb) - ir(xb)).abs().max().item() <= rec.tolerance


def _ir_graph(act: str) -> fx.GraphModule:
    """quantize x and its pooled gate, mul_int8 with ``act``, dequantize (a hand-written IR)."""
    root = nn.Module()
    for name, v in dict(sa=_t(0.03), za=_t(128, torch.int64), sb=_t(0.02), zb=_t(100, torch.int64),
                        sy=_t(0.01), zy=_t(60, torch.int64)).items():
        root.register_buffer(name, v)
    g = fx.Graph()
    x = g.placeholder("x")
    sa, za, sb, zb, sy, zy = (g.get_attr(n) for n in ("sa", "za", "sb", "zb", "sy", "zy"))
    a = QUANTIZE.emit(g, x=x, scale=sa, zp=za, qmin=0, qmax=255)
    p = g.call_function(F.adaptive_avg_pool2d, (x, 1))
    b = QUANTIZE.emit(g, x=p, scale=sb, zp=zb, qmin=0, qmax=255)
    m = MUL_INT8.emit(g, a=a, a_scale=sa, a_zp=za, b=b, b_scale=sb, b_zp=zb, y_scale=sy,
                      y_zp=zy, act=act)
    g.output(DEQUANTIZE.emit(g, q=m, scale=sy, zp=zy))
    gm = fx.GraphModule(root, g).eval()
    ShapeProp(gm).propagate(torch.randn(2, 8, 5, 5))
    return gm


@pytest.mark.skipif(not lower.quantized_engine_available(), reason="no quantized CPU engine")
@pytest.mark.parametrize("act,kernel,row", [
    ("relu", CPU_MUL_INT8.overload, "mul_int8"),  # quantized.mul_relu on views of the codes
    ("silu", MUL8, None),  # no quantized mul_silu: the IR op stays, its reference on the codes
])
def test_cpu_rows_for_activations(act, kernel, row):
    ir = _ir_graph(act)
    x = torch.randn(2, 8, 5, 5)
    ctx = PassContext(example_inputs=(x,))
    low, rec = lower_cpu(ir, ctx)
    assert kernel in [n.target for n in low.graph.nodes]
    assert rec.stats["fallback"] == (row is None)
    for xb in _cal(n=2, seed=9, shape=(3, 8, 5, 5)):
        with torch.no_grad():
            assert (low(xb) - ir(xb)).abs().max().item() <= rec.tolerance
    again = lower.lower_int8_cpu(copy.deepcopy(low), ctx)  # the reference call is not re-lowered
    assert not again.modified


# -- ONNX QDQ export, both forms ------------------------------------------------------------------
@pytest.mark.parametrize("form,row,onnx_mul", [("ir", "mul_int8", 1),
                                                ("cpu", "cpu_mul_int8", 1)])
def test_onnx_export_both_forms(tmp_path, form, row, onnx_mul):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fxopt.export.onnx import export_onnx

    cal = _cal(shape=(2, 3, 8, 8))
    opt = fxopt.optimize(SE().eval(), cal[0], quantize=NO_FLOAT_GATE, calibration_data=cal,
                         disable=["lower_int8_cpu"] if form == "ir" else [])
    result = export_onnx(opt, cal[0], tmp_path / f"se_{form}.onnx")
    assert result.kept == [] and result.translated.get(row) == 1
    assert result.check.ok and result.check.max_abs <= result.output_step * (1 + 1e-4) + 1e-6
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    assert sum(n.op_type == "Mul" for n in model.graph.node) == onnx_mul


# -- the Triton lowering: no kernel, left on PyTorch and named -----------------------------------
def test_triton_lowering_leaves_mul_int8_on_pytorch(monkeypatch):
    x = torch.randn(1, 3, 8, 8)
    ir, _, _, _ = _quantize(SE(), x)
    check_triton_leaves_on_pytorch(monkeypatch, ir, x, MUL8, "mul_int8")
