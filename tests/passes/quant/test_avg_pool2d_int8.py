"""``avg_pool2d_int8``, windowed average pooling of an int8 value on its own grid (DenseNet's
transitions: conv, then ``AvgPool2d(2)``), through the whole int8 path: the op against a float64
hand computation and against PyTorch's quantized ``avg_pool2d`` (bit for bit on channels-last
codes), its fake; the quantizer (golden op counts, the simulation equal to the int8 graph); the
CPU lowering (``F.avg_pool2d`` on a quantized tensor) within one step of the IR; the ONNX QDQ
export of both forms in ONNX Runtime; the Triton lowering leaving it on PyTorch; a
``divisor_override`` or a float input left alone.
"""
import copy
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from int8_op_checks import (
    calibration,
    check_triton_leaves_on_pytorch,
    codes,
    count,
    quantize_ir,
    quantized,
    t,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import fxopt
from fxopt.infra.manager import PassManager
from fxopt.infra.rewrite import apply_rules
from fxopt.ops.cpu import CPU_AVG_POOL2D_INT8
from fxopt.ops.int8 import AvgPool2dWindowInt8
from fxopt.pipelines import expand_pipeline
from fxopt.quant.config import QuantConfig

lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
quant = __import__("fxopt.passes.quant.quantize", fromlist=["quantize"])
OPS = torch.ops.fxopt
AVG8, CONV8 = OPS.avg_pool2d_int8.default, OPS.conv2d_int8.default
Q, DQ = OPS.quantize.default, OPS.dequantize.default
G = torch.Generator().manual_seed(11)
_t, _count, _quantized, _cal = t, count, quantized, calibration
_codes = partial(codes, generator=G)


def _quantize(model, x, cfg=QuantConfig(min_sqnr_db=None)):  # every layer int8
    return quantize_ir(model, x, cfg)


# kernel, stride, padding, ceil_mode, count_include_pad
POOLS = [
    ([2, 2], [2, 2], [0, 0], False, True),    # DenseNet's transition
    ([3, 3], [1, 1], [1, 1], False, False),   # Inception's branch pool
    ([3, 3], [2, 2], [1, 1], True, True),     # ceil_mode: a last window over the edge
    ([3, 2], [2, 1], [1, 0], True, False),    # rectangular, every divisor rule at once
]


def _hand_float64(q, s, z, k, st, p, ceil, cip):
    """The average of each window's values in float64, window by window (PyTorch's rules: the
    window clipped to the padded input, padding counted or not), rounded onto the grid."""
    v = (q.to(torch.int64) - z).double() * s
    H, W = q.shape[-2:]

    def n_out(n, k, s, p):
        o = (n + 2 * p - k + ((s - 1) if ceil else 0)) // s + 1
        return o - 1 if ceil and (o - 1) * s >= n + p else o

    OH, OW = n_out(H, k[0], st[0], p[0]), n_out(W, k[1], st[1], p[1])
    out = torch.empty(*q.shape[:-2], OH, OW, dtype=torch.float64)
    for i in range(OH):
        for j in range(OW):
            h0, w0 = i * st[0] - p[0], j * st[1] - p[1]
            h1, w1 = min(h0 + k[0], H + p[0]), min(w0 + k[1], W + p[1])
            pool = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, H), min(w1, W)
            win = v[..., h0:h1, w0:w1]
            out[..., i, j] = win.sum((-2, -1)) / (pool if cip else win[0, 0].numel())
    return out


@pytest.mark.parametrize("k,st,p,ceil,cip", POOLS)
@pytest.mark.parametrize("grid", [(0, 255), (-128, 127)])
def test_reference_against_float64(k, st, p, ceil, cip, grid):
    lo, hi = grid
    dt = torch.uint8 if lo == 0 else torch.int8
    q = _codes((2, 5, 9, 8), lo, hi, dt)
    s, z = 0.0371, 117 + lo
    y = OPS.avg_pool2d_int8(q, k, st, p, ceil, cip, _t(s), _t(z, torch.int64), lo, hi)
    f64 = _hand_float64(q, s, z, k, st, p, ceil, cip) / s
    want = (torch.round(f64) + z).clamp(lo, hi).to(torch.int64)
    off = (y.to(torch.int64) - want).abs()
    assert y.dtype == dt and y.shape == want.shape
    # one rounding of the exact average: only a tie (x.5, which float64 holds exactly) may
    # round the other way, where float32's 1/divisor is not exact (a divisor of 6)
    tie = ((f64 - f64.floor()) - 0.5).abs() < 1e-9
    assert int(off.max()) <= 1 and bool((off == 0)[~tie].all())


@pytest.mark.parametrize("k,st,p,ceil,cip", POOLS)
def test_reference_is_pytorchs_quantized_avg_pool2d(k, st, p, ceil, cip):
    """PyTorch's quantized avg_pool2d (what lower_int8_cpu runs): on channels-last codes (the
    layout the int8 pipeline carries) the same codes; on contiguous codes within one (that
    kernel adds the zero point before it rounds, so an odd zero point flips each tie)."""
    s, z = 0.0371, 117
    for channels_last, C in ((True, 16), (True, 13), (False, 16)):  # 13: the kernel's tail loop
        q = _codes((2, C, 11, 10), channels_last=channels_last)
        ref = OPS.avg_pool2d_int8(q, k, st, p, ceil, cip, _t(s), _t(z, torch.int64), 0, 255)
        ker = F.avg_pool2d(_quantized(q, s, z), k, st, p, ceil, cip).int_repr()
        off = (ker.to(torch.int64) - ref.to(torch.int64)).abs()
        assert ref.stride() == ker.stride()
        if channels_last:
            assert int(off.max()) == 0, (C, int((off > 0).sum()))
        else:
            assert int(off.max()) <= 1


@pytest.mark.parametrize("k,st,p,ceil,cip", POOLS)
@pytest.mark.parametrize("cl", [False, True])
def test_fake_matches_real(k, st, p, ceil, cip, cl):
    args = (_codes((2, 8, 9, 8), channels_last=cl), k, st, p, ceil, cip, _t(0.1),
            _t(3, torch.int64), 0, 255)
    real = OPS.avg_pool2d_int8(*args)
    mode = FakeTensorMode()
    with mode:
        fake = OPS.avg_pool2d_int8(*torch.utils._pytree.tree_map_only(torch.Tensor,
                                                                      mode.from_tensor, args))
    assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()
    torch.library.opcheck(OPS.avg_pool2d_int8, args,
                          test_utils=("test_schema", "test_faketensor"))


# -- the quantizer ------------------------------------------------------------------------------
class Transition(nn.Module):
    """conv-relu, DenseNet's transition pool (``nn.AvgPool2d(2)``), conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.pool, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.AvgPool2d(2), \
            nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(self.pool(torch.relu(self.c1(x))))


class Functional(nn.Module):
    """conv-relu, ``F.avg_pool2d`` with padding, ceil_mode and count_include_pad=False, conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = F.avg_pool2d(torch.relu(self.c1(x)), 3, stride=2, padding=1, ceil_mode=True,
                         count_include_pad=False)
        return self.c2(y)


class LeftAlone(nn.Module):
    """Average poolings the quantizer leaves float: of a float input, and two with a
    ``divisor_override`` (a sum scaled by a constant, not an average on the input's grid)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1),
                                     nn.Conv2d(8, 8, 1))
        self.pool = nn.AvgPool2d(2, divisor_override=3)

    def forward(self, x):
        y = self.pool(torch.relu(self.c1(F.avg_pool2d(x, 2))))
        return self.c3(F.avg_pool2d(torch.relu(self.c2(y)), 2, divisor_override=2))


def _float_avg_pools(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is F.avg_pool2d
               or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.AvgPool2d)))


@pytest.mark.parametrize("net", [Transition, Functional])
def test_pool_between_convs_golden_and_equal_to_the_simulation(net):
    x = torch.randn(2, 3, 16, 16)
    gm, rec, ctx, before = _quantize(net(), x)
    assert (_count(gm, Q), _count(gm, CONV8), _count(gm, AVG8), _count(gm, DQ)) == (1, 2, 1, 1)
    assert _float_avg_pools(gm) == 0 and rec.stats["pool"] == 1
    pool = next(n for n in gm.graph.nodes if n.target is AVG8)
    v = AvgPool2dWindowInt8.of(pool)
    assert v.q.target is CONV8 and [u.target for u in pool.users] == [CONV8]
    assert (v.scale, v.zp) == tuple(v.q.args[10:12])  # the conv's output grid, kept
    want = ([2, 2], [2, 2], [0, 0], False, True) if net is Transition \
        else ([3, 3], [2, 2], [1, 1], True, False)
    assert (list(v.kernel_size), list(v.stride), list(v.padding), v.ceil_mode,
            v.count_include_pad) == want
    assert pool.meta["tensor_meta"].dtype == torch.uint8
    assert math.isfinite(rec.stats["sqnr_db"]) and rec.stats["sqnr_db"] > 25, rec.stats
    # the simulation averages the codes as the op does: equal, not just within a step
    res = quant.quantize_int8(before, ctx)
    assert res.gm.code == gm.code and res.max_abs_tolerance == rec.tolerance
    for xb in _cal(n=3, seed=7, shape=(4, 3, 18, 14)):  # another spatial size too
        with torch.no_grad():
            assert torch.equal(gm(xb), res.reference(xb))


def test_divisor_override_and_float_input_are_left_alone():
    gm, rec, _, _ = _quantize(LeftAlone(), torch.randn(2, 3, 16, 16))
    assert _count(gm, AVG8) == 0 and _float_avg_pools(gm) == 3
    assert _count(gm, CONV8) == 3 and (_count(gm, Q), _count(gm, DQ)) == (3, 3)
    assert "pool" not in rec.stats or rec.stats["pool"] == 0


# -- the CPU lowering ---------------------------------------------------------------------------
@pytest.mark.skipif(not lower.quantized_engine_available(), reason="no quantized CPU engine")
@pytest.mark.parametrize("net", [Transition, Functional])
def test_cpu_row_runs_pytorchs_avg_pool2d_within_one_step(net):
    ir, _, ctx, _ = _quantize(net(), torch.randn(2, 3, 16, 16))
    table = apply_rules(copy.deepcopy(ir), lower.RULES, context=lower.CpuLowering())
    assert table.counts["avg_pool2d_int8"] == 1 and table.rejected == []
    low, report = PassManager(expand_pipeline(["lower_int8_cpu"]), check="each").run(
        copy.deepcopy(ir), ctx)
    rec = report.record("lower_int8_cpu")
    assert rec.status == "ok" and rec.stats["pool"] == 1 and rec.stats["fallback"] == 0
    assert _count(low, CPU_AVG_POOL2D_INT8.overload) == 1 and _count(low, AVG8) == 0
    assert not any("more than one code" in note for note in rec.notes), rec.notes
    for xb in _cal(n=3, seed=8, shape=(4, 3, 18, 14)):
        with torch.no_grad():
            assert (low(xb) - ir(xb)).abs().max().item() <= rec.tolerance


# -- ONNX QDQ export, both forms ------------------------------------------------------------------
@pytest.mark.parametrize("net", [Transition, Functional])
@pytest.mark.parametrize("form,row", [("ir", "avg_pool2d_int8"), ("cpu", "cpu_avg_pool2d_int8")])
def test_onnx_export_both_forms(tmp_path, net, form, row):
    """The IR row (``qdq_ir``) and, once lowered, the CPU twin's row (``qdq_cpu``: the IR
    row) each write one AveragePool between Q and DQ."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fxopt.export.onnx import export_onnx

    cal = _cal(shape=(2, 3, 16, 16))
    opt = fxopt.optimize(net().eval(), cal[0], quantize="int8", calibration_data=cal,
                         disable=["lower_int8_cpu"] if form == "ir" else [])
    result = export_onnx(opt, cal[0], tmp_path / f"{net.__name__}_{form}.onnx")
    assert result.kept == [] and result.translated.get(row) == 1, result.translated
    assert result.check.ok and result.check.max_abs <= result.output_step * (1 + 1e-4) + 1e-6
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    assert sum(n.op_type == "AveragePool" for n in model.graph.node) == 1


# -- the Triton lowering: no kernel, left on PyTorch and named -----------------------------------
def test_triton_lowering_leaves_avg_pool2d_int8_on_pytorch(monkeypatch):
    x = torch.randn(1, 3, 16, 16)
    ir, _, _, _ = _quantize(Transition(), x)
    check_triton_leaves_on_pytorch(monkeypatch, ir, x, AVG8, "avg_pool2d_int8")
