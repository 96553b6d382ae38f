"""``batch_norm2d_int8``: an eval BatchNorm no convolution absorbs (DenseNet's after each concat:
``cat -> BatchNorm -> ReLU -> conv``), a per-channel requantization of the codes with the ReLU as
its clamp, through the whole int8 path: the op against PyTorch's ``quantized::batch_norm2d(_relu)``
(what the CPU lowering runs) and the float BatchNorm on the values, its fake; the quantizer
(golden op counts: no dequantize around the BatchNorm, the int8 graph equal to the simulation);
the CPU lowering; the model within fxopt's int8 bound of eager; the ONNX QDQ export in ONNX
Runtime; the Triton lowering leaving it on PyTorch; the cases left float.

Why a requantization and not a fold into the next convolution: the ReLU sits between the
BatchNorm and the convolution (no affine moves through it), and even without one a zero-padded
convolution cannot absorb an additive per-channel shift exactly (the shift reaches the border
outputs through fewer taps).
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from int8_op_checks import (
    calibration,
    check_triton_leaves_on_pytorch,
    codes,
    count,
    lower_cpu,
    quantize_ir,
    quantized,
    t,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import fxopt
import fxopt.export.engines
from fxopt.infra.rewrite import apply_rules
from fxopt.ops.int8 import BatchNorm2dInt8

lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
quant = __import__("fxopt.passes.quant.quantize", fromlist=["quantize"])
OPS = torch.ops.fxopt
BN8, CONV8, CAT8 = (OPS.batch_norm2d_int8.default, OPS.conv2d_int8.default,
                    OPS.cat_int8.default)
CPU_BN8 = OPS.cpu_batch_norm2d_int8.default
Q, DQ = OPS.quantize.default, OPS.dequantize.default
CPU_Q, CPU_DQ = OPS.cpu_quantize.default, OPS.cpu_dequantize.default
G = torch.Generator().manual_seed(13)


def _bn_params(C, g=G):
    return (torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g),
            torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5)


def _bn8(q, p, grids, act="none"):
    w, b, m, v = p
    (sx, zx), (sy, zy) = grids
    return OPS.batch_norm2d_int8(q, w, b, m, v, 1e-5, t(sx), t(zx, torch.int64), t(sy),
                                 t(zy, torch.int64), act=act)


@pytest.mark.parametrize("act", ["none", "relu"])
def test_reference_is_the_float_batch_norm_and_pytorchs_kernel(act):
    """The reference is the float BatchNorm of the values requantized once; PyTorch's
    quantized kernel (the CPU row's) lands on the same codes (within one, at a tie), same
    layout."""
    grids = ((0.037, 117), (0.021, 0 if act == "relu" else 121))
    for channels_last, C in ((True, 16), (True, 13), (False, 24)):  # 13: the kernel's tail
        q = codes((2, C, 9, 7), channels_last=channels_last, generator=G)
        p = _bn_params(C)
        ref = _bn8(q, p, grids, act)
        x = (q.long() - grids[0][1]).float() * grids[0][0]
        y = F.batch_norm(x, p[2], p[3], p[0], p[1], False, 0.0, 1e-5)
        y = y.relu() if act == "relu" else y
        want = torch.clamp(torch.round(y / grids[1][0]) + grids[1][1], 0, 255)
        assert (ref.float() - want).abs().max() <= 1  # a division, not the reciprocal
        fn = torch.ops.quantized.batch_norm2d_relu if act == "relu" else \
            torch.ops.quantized.batch_norm2d
        ker = fn(quantized(q, *grids[0]), *p[:2], *p[2:], 1e-5, *grids[1]).int_repr()
        assert (ker.int() - ref.int()).abs().max() <= 1
        cpu = OPS.cpu_batch_norm2d_int8(q, *p[:2], *p[2:], 1e-5, t(grids[0][0]),
                                        t(grids[0][1], torch.int64), t(grids[1][0]),
                                        t(grids[1][1], torch.int64), act=act)
        assert torch.equal(cpu, ker)  # the kernel writes channels-last; the twin keeps q's
        assert cpu.stride() == ref.stride() and cpu.dtype == ref.dtype == torch.uint8


@pytest.mark.parametrize("cl", [False, True])
def test_fake_matches_real(cl):
    q = codes((2, 8, 5, 6), channels_last=cl, generator=G)
    w, b, m, v = _bn_params(8)
    args = (q, w, b, m, v, 1e-5, t(0.1), t(3, torch.int64), t(0.05), t(0, torch.int64))
    real = OPS.batch_norm2d_int8(*args, act="relu")
    mode = FakeTensorMode()
    with mode:
        fake = OPS.batch_norm2d_int8(*torch.utils._pytree.tree_map_only(
            torch.Tensor, mode.from_tensor, args), act="relu")
    assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()
    torch.library.opcheck(OPS.batch_norm2d_int8, args, {"act": "relu"},
                          test_utils=("test_schema", "test_faketensor"))


# -- the quantizer ------------------------------------------------------------------------------
def _randomize(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    C = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(C, generator=g) - 0.5)
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(C, generator=g) - 0.5)


class DenseLayer(nn.Module):
    """DenseNet's pattern: two convs concatenated, BatchNorm -> ReLU -> 1x1 conv (the
    BatchNorm cannot fold into the conv before it: the concat is between), and ``relu=False``:
    BatchNorm straight into a zero-padded 3x3 conv (no fold either: see the module doc)."""

    def __init__(self, relu=True, affine=True):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(16, affine=affine)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.c3 = nn.Conv2d(16, 8, 1 if relu else 3, padding=0 if relu else 1)
        _randomize(self.norm, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        y = torch.cat([a, self.c2(a)], 1)
        return self.c3(self.relu(self.norm(y)))


class LeftAlone(nn.Module):
    """BatchNorms the quantizer leaves float: of the float input, and a BatchNorm1d (of a
    float mean: a Linear then BatchNorm1d is folded before quantization)."""

    def __init__(self):
        super().__init__()
        self.bn0, self.c1 = nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1)
        self.fc, self.bn1 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        _randomize(self.bn0, 6)
        _randomize(self.bn1, 7)

    def forward(self, x):
        y = torch.relu(self.c1(self.bn0(x))).mean((2, 3))
        return self.fc(self.bn1(y))


@pytest.mark.parametrize("relu,affine", [(True, True), (False, True), (True, False)])
def test_batch_norm_after_cat_golden_and_equal_to_the_simulation(relu, affine):
    x = torch.randn(2, 3, 16, 16)
    gm, rec, ctx, before = quantize_ir(DenseLayer(relu, affine), x)
    assert (count(gm, Q), count(gm, CONV8), count(gm, CAT8), count(gm, BN8),
            count(gm, DQ)) == (1, 3, 1, 1, 1)
    assert rec.stats["batch_norm"] == 1
    assert not any(n.op == "call_module" or n.target is F.relu for n in gm.graph.nodes)
    bn = next(n for n in gm.graph.nodes if n.target is BN8)
    v = BatchNorm2dInt8.of(bn)
    assert v.q.target is CAT8 and v.act == ("relu" if relu else "none")
    assert (v.x_scale, v.x_zp) == tuple(v.q.args[4:6])  # the concat's grid in
    (reader,) = bn.users
    assert reader.target is CONV8 and (reader.args[8], reader.args[9]) == (v.y_scale, v.y_zp)
    assert (v.weight is None) == (not affine) and bn.meta["tensor_meta"].dtype == torch.uint8
    if relu:  # the pair on the ReLU's grid: its zero point is the clamp
        assert int(gm.get_buffer(v.y_zp.target)) == 0
    res = quant.quantize_int8(before, ctx)
    assert res.gm.code == gm.code and res.max_abs_tolerance == rec.tolerance
    for xb in calibration(n=3, seed=7, shape=(4, 3, 18, 14)):
        with torch.no_grad():
            assert torch.equal(gm(xb), res.reference(xb))


def test_for_openvino_a_concat_read_only_by_batch_norms_stays_float():
    """OpenVINO folds the concat's input scales into the BatchNorm: no grid of the concat's own
    (``without_cat_grids_before_batch_norms``; densenet121 there: 21.69 ms against NNCF's 20.24
    before, 19.95 against 19.89 after)."""
    x = torch.randn(2, 3, 16, 16)
    gm, rec, _, before = quantize_ir(DenseLayer(), x, target="openvino")
    assert rec.stats["float_concats"] == 1 and "batch_norm" not in rec.stats
    assert any("1 concatenation(s) read only by a BatchNorm kept float" in n for n in rec.notes)
    # the convs' codes dequantized into the float concat, BatchNorm and ReLU, then c3's quantize
    assert (count(gm, Q), count(gm, CONV8), count(gm, CAT8), count(gm, BN8),
            count(gm, DQ)) == (2, 3, 0, 0, 3)
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    assert all(a.target is DQ for a in cat.args[0])
    # the CPU plan keeps its int8 concat: PyTorch's int8 BatchNorm kernel takes its codes
    cpu, cpu_rec, _, _ = quantize_ir(DenseLayer(), x)
    assert count(cpu, CAT8) == 1 and "float_concats" not in cpu_rec.stats


@pytest.mark.skipif("openvino" not in fxopt.export.engines.installed_engines(),
                    reason="openvino is not installed")
def test_a_dense_layer_on_openvino_within_its_check():
    x = torch.randn(2, 3, 16, 16)
    opt = fxopt.optimize(DenseLayer().eval(), x, target="openvino", quantize="int8",
                         calibration_data=calibration())
    engine = opt.report.engine
    assert engine["engine"] == "openvino" and engine["check"]["batches"] == [2, 3]
    assert engine["check"]["max_abs"] <= engine["check"]["tolerance"]
    assert opt.report.record("quantize_int8").stats["float_concats"] == 1


def test_float_input_and_1d_batch_norms_are_left_alone():
    gm, rec, _, _ = quantize_ir(LeftAlone(), torch.randn(2, 3, 16, 16))
    assert count(gm, BN8) == 0 and "batch_norm" not in rec.stats
    mods = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(mods) == 2 and count(gm, CONV8) == 1 and count(gm, OPS.linear_int8.default) == 1


def test_a_relu_with_other_readers_of_the_batch_norm_is_not_fused():
    class TwoReaders(DenseLayer):
        def forward(self, x):
            a = torch.relu(self.c1(x))
            n = self.norm(torch.cat([a, self.c2(a)], 1))
            return self.c3(torch.relu(n)) + n[:, :8]

    gm, _, _, _ = quantize_ir(TwoReaders(), torch.randn(2, 3, 16, 16))
    (bn,) = [n for n in gm.graph.nodes if n.target is BN8]
    assert BatchNorm2dInt8.of(bn).act == "none"


# -- the CPU lowering and the whole path ---------------------------------------------------------
needs_engine = pytest.mark.skipif(not lower.quantized_engine_available(),
                                  reason="no quantized CPU engine")


@needs_engine
@pytest.mark.parametrize("relu", [True, False])
def test_cpu_row_runs_pytorchs_batch_norm_on_views_of_the_codes(relu):
    ir, _, ctx, _ = quantize_ir(DenseLayer(relu), torch.randn(2, 3, 16, 16))
    table = apply_rules(copy.deepcopy(ir), lower.RULES, context=lower.CpuLowering())
    assert table.counts["batch_norm2d_int8"] == 1 and table.rejected == []
    low, rec = lower_cpu(ir, ctx)
    assert not any("more than one code" in note for note in rec.notes), rec.notes
    assert rec.stats["batch_norm"] == 1 and rec.stats["fallback"] == 0
    assert count(low, CPU_BN8) == 1 and count(low, BN8) == 0
    for xb in calibration(n=3, seed=8, shape=(4, 3, 18, 14)):
        with torch.no_grad():
            assert (low(xb) - ir(xb)).abs().max().item() <= rec.tolerance


@needs_engine
def test_dense_layer_int8_end_to_end_no_dequantize_around_the_batch_norm():
    """``optimize(target="cpu")``: one quantize at the input, one dequantize at the output,
    nothing float in between; the module within fxopt's int8 bound of eager (optimize checks
    it) and the int8 error small."""
    cal = calibration(n=4, seed=2, shape=(2, 3, 16, 16))
    m = DenseLayer().eval()
    opt = fxopt.optimize(m, cal[0], quantize="int8", calibration_data=cal, target="cpu")
    gm = opt.graph_module
    assert (count(gm, CPU_Q), count(gm, CPU_DQ), count(gm, CPU_BN8)) == (1, 1, 1)
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    q = opt.report.record("quantize_int8")
    assert q.stats["sqnr_db"] > 25, q.stats
    with torch.no_grad():
        err = (opt(cal[1]) - m(cal[1])).abs().max().item()
    assert err < 0.1 * m(cal[1]).abs().max().item()


# -- ONNX QDQ export, both forms ------------------------------------------------------------------
@pytest.mark.parametrize("form,row", [("ir", "batch_norm2d_int8"),
                                      ("cpu", "cpu_batch_norm2d_int8")])
def test_onnx_export_both_forms(tmp_path, form, row):
    """The IR row and, once lowered, the CPU twin's row each write one BatchNormalization
    between DequantizeLinear and QuantizeLinear, checked in ORT."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fxopt.export.onnx import export_onnx

    cal = calibration(shape=(2, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxopt.optimize(DenseLayer().eval(), cal[0], quantize="int8", calibration_data=cal,
                             disable=["lower_int8_cpu"] if form == "ir" else [])
        result = export_onnx(opt, cal[0], tmp_path / f"dense_{form}.onnx")
    assert result.kept == [] and result.translated.get(row) == 1, result.translated
    assert result.check.ok and result.check.max_abs <= result.output_step * (1 + 1e-4) + 1e-6
    model = onnx.load(str(result.path))
    (bn,) = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[bn.input[0]] == "DequantizeLinear"


# -- the Triton lowering: no kernel, left on PyTorch and named -----------------------------------
def test_triton_lowering_leaves_batch_norm2d_int8_on_pytorch(monkeypatch):
    x = torch.randn(1, 3, 16, 16)
    ir, _, _, _ = quantize_ir(DenseLayer(), x)
    check_triton_leaves_on_pytorch(monkeypatch, ir, x, BN8, "batch_norm2d_int8")
