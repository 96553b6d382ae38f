"""fxopt.quant.isa: the run-time choice of 8-bit or 7-bit activation grids, and that the CPU
kernels fxopt lowers to are exact with full-range (8-bit) uint8 activations where it picks
them (no int16 saturation of u8 x s8 pair sums)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.errors import InputError
from fxopt.ops.onednn import conv2d_int8_onednn, linear_int8_onednn, onednn_int8_available
from fxopt.quant.config import QuantConfig
from fxopt.ops.isa import int8_pairs_saturate
from fxopt.quant.isa import cpu_flags, int8_dot_product_isa, resolve_reduce_range

VNNI = int8_dot_product_isa() is not None
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has neither AVX-512 VNNI nor AMX")


def _proc_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(l.split(":", 1)[1].split()) for l in f if l.startswith("flags")),
                        None)
    except OSError:
        return None


def test_detection_agrees_with_proc_cpuinfo():
    flags = _proc_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags here")
    want = "amx_int8" if "amx_int8" in flags else \
        "avx512_vnni" if "avx512_vnni" in flags else None
    assert int8_dot_product_isa() == want
    assert ("avx512_vnni" in cpu_flags()) == ("avx512_vnni" in flags)


def test_resolve_reduce_range():
    assert resolve_reduce_range(True, isa="avx512_vnni") is True  # explicit wins
    assert resolve_reduce_range(False, isa=None) is False
    assert resolve_reduce_range("auto", isa="avx512_vnni") is False
    assert resolve_reduce_range("auto", isa="amx_int8") is False
    assert resolve_reduce_range("auto", isa=None) == "weights"     # no VNNI: 7-bit weights
    assert resolve_reduce_range("auto", isa=None, target="openvino") == "weights"
    assert resolve_reduce_range("activations", isa=None) is True
    assert resolve_reduce_range("weights", isa="avx512_vnni") == "weights"
    # with VNNI, engines whose grouped convolutions saturate keep 7-bit activation grids
    assert resolve_reduce_range("auto", isa="avx512_vnni", cpu_engine="fbgemm") is True
    assert resolve_reduce_range("auto", isa="avx512_vnni", cpu_engine="x86") is True
    assert resolve_reduce_range("auto", isa=None, cpu_engine="x86") == "weights"
    assert resolve_reduce_range("auto", isa=None, cpu_engine="fbgemm") == "weights"
    assert resolve_reduce_range("auto", isa=None, target="cuda") is False
    assert resolve_reduce_range("auto") == (False if VNNI else "weights")


def test_config_default_is_auto_and_checked():
    assert QuantConfig().reduce_range == "auto"
    assert QuantConfig().resolved().reduce_range == (False if VNNI else "weights")
    assert QuantConfig().weights_7bit is (not VNNI) and not QuantConfig().activations_7bit
    assert QuantConfig(reduce_range=True).resolved().reduce_range is True
    assert QuantConfig(reduce_range="activations").activations_7bit
    assert QuantConfig(reduce_range="weights").weights_7bit
    for bad in ("yes", 1, 0, "Weights"):
        with pytest.raises(InputError, match="reduce_range"):
            QuantConfig(reduce_range=bad)


class _Wide(nn.Module):
    """A depthwise convolution of 128 channels (fbgemm's kernel: more than 100 groups), a plain
    one and a linear layer, all-positive weights on all-positive inputs: full-range codes near
    255 times weight codes near 127, where an int16 pair sum would saturate."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(128, 128, 3, padding=1, groups=128)
        self.pw = nn.Conv2d(128, 32, 1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            for m in (self.dw, self.pw, self.fc):
                m.weight.uniform_(0.8, 1.0)
                m.bias.zero_()

    def forward(self, x):
        y = F.relu(self.pw(F.relu(self.dw(x))))
        return self.fc(y.mean(dim=(2, 3)))


def _wide_int8(reduce_range, check="end", target="cpu"):
    """(the _Wide model optimized to int8 on ``target`` with ``reduce_range``, calibration)"""
    torch.manual_seed(0)
    m = _Wide().eval()
    cal = [torch.rand(2, 128, 8, 8) * 0.9 + 0.1 for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.optimize(m, cal[0], quantize=QuantConfig(reduce_range=reduce_range),
                              calibration_data=cal, target=target, check=check), cal


@pytest.mark.parametrize("reduce_range", ["auto", False, "weights"])
def test_lowered_kernels_exact_on_full_range_grids(reduce_range):
    """On every CPU: with VNNI/AMX the kernels sum full-range codes exactly; without, "auto"
    gives 7-bit weights (exact with any code), and False (8-bit weights and activations) runs
    each layer's one kernel call only on inputs it sums exactly, two calls on the weight's
    halves on the rest (fxopt.ops.cpu): no saturated sum comes back either way."""
    opt, _ = _wide_int8(reduce_range, check="each")
    q, low = opt.report.record("quantize_int8"), opt.report.record("lower_int8_cpu")
    want = "weights" if reduce_range == "weights" or reduce_range == "auto" and not VNNI \
        else False
    assert q.stats["reduce_range"] == want
    assert low.status == "ok" and low.stats["conv2d"] == 2, low.notes
    # every lowered op within one code of the int8 IR (a saturating kernel is tens off)
    assert not [n for n in low.notes if "more than one code" in n], low.notes


@needs_vnni
@pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN int8 kernels")
@pytest.mark.parametrize("groups", [1, 128])
def test_onednn_int8_ops_exact_on_full_range_codes(groups):
    """torch.ops.onednn.qconv2d_pointwise / qlinear_pointwise (fxopt's oneDNN rows, and the
    plain-int8 lowering's) on codes of 255 times weights of 127: the exact integer sum."""
    c = 128
    q = torch.full((1, c, 6, 6), 255, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    w = torch.full((c, c // groups, 3, 3), 127, dtype=torch.int8)
    ws = torch.full((c,), 1e-3)
    acc = F.conv2d(q.double(), w.double(), None, 1, 1, 1, groups) * 1e-3 * 0.01
    y_scale = float(acc.max()) / 255
    y = conv2d_int8_onednn(q, w, ws, None, [1, 1], [1, 1], [1, 1], groups, 0.01, 0, y_scale, 0,
                           ("hardswish", [], ""))
    ref = torch.clamp(torch.round(F.hardswish(acc.float()) / y_scale), 0, 255)
    assert y is not None and (y.double() - ref.double()).abs().max() <= 1
    x = torch.full((4, 512), 255, dtype=torch.uint8)
    wl = torch.full((64, 512), 127, dtype=torch.int8)
    accl = (x.double() @ wl.double().t()) * 1e-3 * 0.01
    yl = linear_int8_onednn(x, wl, torch.full((64,), 1e-3), None, 0.01, 0,
                            float(accl.max()) / 255, 0, ("hardswish", [], ""))
    refl = torch.clamp(torch.round(F.hardswish(accl.float()) / (float(accl.max()) / 255)), 0, 255)
    assert yl is not None and (yl.double() - refl.double()).abs().max() <= 1


@pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN int8 kernels")
@pytest.mark.parametrize("engine", ["onednn", "fbgemm"])
def test_a_saturating_cpu_runs_wide_weights_on_one_kernel_call_only_for_codes_up_to_127(
        engine, monkeypatch):
    """The guard of fxopt.ops.cpu, as on an x86 CPU without VNNI (forced here, so it runs on
    every CPU): weights beyond [-64, 64] take their one kernel call for input codes at most
    127, and two calls on the weight's halves (each within [-64, 64]) above; weights within it
    take the one call for every code; a fused residual above 127 takes the reference. Every
    result within one code of the reference."""
    from fxopt.ops import cpu, onednn, saturation
    from fxopt.ops.cpu import ONEDNN_CONV2D_INT8, ONEDNN_LINEAR_INT8

    monkeypatch.setattr(saturation, "_SATURATES", True)
    seen = []
    real_conv, real_linear, real_ref = (onednn.conv2d_int8_onednn, onednn.linear_int8_onednn,
                                        cpu._conv_reference)
    monkeypatch.setattr(onednn, "conv2d_int8_onednn",
                        lambda *a: seen.append(("halves", a[1])) or real_conv(*a))
    monkeypatch.setattr(onednn, "linear_int8_onednn",
                        lambda *a: seen.append(("halves", a[1])) or real_linear(*a))
    monkeypatch.setattr(cpu, "_conv_reference",
                        lambda *a, **k: seen.append(("reference",)) or real_ref(*a, **k))
    g = torch.Generator().manual_seed(0)
    w_wide = torch.randint(-128, 128, (16, 8, 3, 3), dtype=torch.int8, generator=g)
    w_wide[0, 0, 0, 0], w_wide[1, 0, 0, 0] = -128, 127
    w_narrow = torch.div(w_wide, 2, rounding_mode="floor")  # within [-64, 63]
    scale, bias = torch.full((16,), 2e-3), torch.randn(16, generator=g)
    cl = torch.channels_last
    low = torch.randint(0, 128, (1, 8, 7, 7), dtype=torch.uint8, generator=g)
    high = low.clone()
    high[0, 0, 3, 3] = 255  # one code past 127
    low, high = low.contiguous(memory_format=cl), high.contiguous(memory_format=cl)

    def conv(q, w, act="hardswish", residual=None):
        seen.clear()
        args = (q, w, scale, bias, [1, 1], [1, 1], [1, 1], 1, 0.05, 3, 0.2, 10)
        if residual is not None:
            args = (*args, residual, 0.1, 5)
            act = "relu"
        y = torch.ops.fxopt.onednn_conv2d_int8(*args, act=act, engine=engine)
        ref = ONEDNN_CONV2D_INT8.reference(*args, act=act)
        assert int((y.int() - ref.int()).abs().max()) <= 1
        return [k[0] for k in seen]

    assert conv(low, w_wide) == []  # the one kernel call (bound or packed)
    assert conv(high, w_narrow) == []
    assert conv(high, w_wide) == ["halves", "halves"]
    lo, hi = saturation.weight_halves(w_wide)
    assert torch.equal(lo.int() + hi.int(), w_wide.int())
    assert int(lo.abs().max()) <= 64 and int(hi.abs().max()) <= 64
    res = torch.randint(0, 256, (1, 16, 7, 7), dtype=torch.uint8, generator=g).contiguous(
        memory_format=cl)
    assert conv(high, w_wide, residual=res) == ["reference"]
    # a linear layer: the halves above 127
    x = torch.randint(0, 256, (3, 24), dtype=torch.uint8, generator=g)
    wl = torch.randint(-128, 128, (12, 24), dtype=torch.int8, generator=g)
    args = (x, wl, torch.full((12,), 1e-3), torch.randn(12, generator=g), 0.05, 3, 0.05, 100)
    seen.clear()
    y = torch.ops.fxopt.onednn_linear_int8(*args, act="gelu", engine=engine)
    assert int((y.int() - ONEDNN_LINEAR_INT8.reference(*args, act="gelu").int()).abs().max()) <= 1
    assert [k[0] for k in seen] == ["halves", "halves"]


@pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN int8 kernels")
def test_full_range_codes_and_weights_are_never_summed_saturated_on_this_cpu():
    """On this CPU as it is (a saturating one runs the guard for real): codes of 255 times
    weights of 127 through the conv and linear ops, plain, with a residual and dynamic: the
    reference within one code (an int16 pair sum would be tens of codes off)."""
    from fxopt.ops.cpu import ONEDNN_CONV2D_INT8, ONEDNN_LINEAR_INT8
    from fxopt.ops.int8_dynamic import linear_int8_dynamic_reference

    q = torch.full((1, 16, 6, 6), 255, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    w = torch.full((16, 16, 3, 3), 127, dtype=torch.int8)
    w[:, :, 0] = -128
    ws, b = torch.full((16,), 1e-3), torch.zeros(16)
    args = (q, w, ws, b, [1, 1], [1, 1], [1, 1], 1, 0.01, 0, 0.02, 3)
    for kw in ({}, {"engine": "fbgemm"}):
        y = torch.ops.fxopt.onednn_conv2d_int8(*args, **kw)
        assert int((y.int() - ONEDNN_CONV2D_INT8.reference(*args).int()).abs().max()) <= 1
    r = torch.randint(0, 256, (1, 16, 6, 6), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    args_r = (*args, r, 0.05, 7)
    y = torch.ops.fxopt.onednn_conv2d_int8(*args_r)
    assert int((y.int() - ONEDNN_CONV2D_INT8.reference(*args_r).int()).abs().max()) <= 1
    x = torch.full((4, 64), 255, dtype=torch.uint8)
    wl = torch.full((8, 64), 127, dtype=torch.int8)
    args_l = (x, wl, torch.full((8,), 1e-4), torch.zeros(8), 0.01, 0, 0.05, 0)
    y = torch.ops.fxopt.onednn_linear_int8(*args_l)
    assert int((y.int() - ONEDNN_LINEAR_INT8.reference(*args_l).int()).abs().max()) <= 1
    xf = torch.rand(4, 64) * 3
    yd = torch.ops.fxopt.linear_int8_dynamic(xf, wl, torch.full((8,), 1e-3), None,
                                              reduce_range=False)
    ref = linear_int8_dynamic_reference(xf, wl, torch.full((8,), 1e-3), None, reduce_range=False)
    assert torch.allclose(yd, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not int8_pairs_saturate(), reason="this CPU sums int8 pairs in int32")
def test_an_export_with_8_bit_weights_and_activations_is_refused_where_engines_saturate(
        tmp_path):
    """On a CPU without VNNI/AMX, ONNX Runtime's int8 kernels saturate on the _Wide model's
    8-bit grids (fxopt's own module does not: its guard): the export's check says so, and
    names the grids that fix it; with the default grids (7-bit weights) the file is exact."""
    pytest.importorskip("onnxruntime")
    full, cal = _wide_int8(False)
    auto, _ = _wide_int8("auto")
    with pytest.raises(fxopt.NumericMismatchError) as e:
        fxopt.export_onnx(full, cal[0], tmp_path / "full.onnx")
    assert "VNNI" in e.value.hint and "reduce_range" in e.value.hint
    assert fxopt.export_onnx(auto, cal[0], tmp_path / "auto.onnx").output_step


@pytest.mark.skipif(not int8_pairs_saturate(), reason="this CPU sums int8 pairs in int32")
def test_openvino_refuses_8_bit_grids_where_its_sums_saturate_and_takes_the_default():
    """target="openvino" on a CPU without VNNI/AMX: the _Wide model on 8-bit grids saturates
    inside OpenVINO (rel err 0.44 against float on the AVX2 EPYC, 2026-12-07): the engine's
    check refuses it and its hint names the grids; the default (7-bit weights) is exact."""
    pytest.importorskip("openvino")
    with pytest.raises(fxopt.NumericMismatchError) as e:
        _wide_int8(False, target="openvino")
    assert "VNNI" in e.value.hint and "reduce_range='auto'" in e.value.hint
    opt, _ = _wide_int8("auto", target="openvino")
    assert opt.report.engine["check"]["max_abs"] <= opt.report.engine["output_step"]
