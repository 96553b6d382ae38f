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
    assert resolve_reduce_range("auto", isa=None) is True          # no VNNI: 7-bit
    # engines whose grouped convolutions saturate keep 7-bit grids
    assert resolve_reduce_range("auto", isa="avx512_vnni", cpu_engine="fbgemm") is True
    assert resolve_reduce_range("auto", isa="avx512_vnni", cpu_engine="x86") is True
    assert resolve_reduce_range("auto", isa=None, target="cuda") is False
    assert resolve_reduce_range("auto") is (not VNNI)


def test_config_default_is_auto_and_checked():
    assert QuantConfig().reduce_range == "auto"
    assert QuantConfig().resolved().reduce_range is (not VNNI)
    assert QuantConfig(reduce_range=True).resolved().reduce_range is True
    with pytest.raises(InputError, match="reduce_range"):
        QuantConfig(reduce_range="yes")


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


@needs_vnni
@pytest.mark.parametrize("reduce_range", ["auto", False])
def test_lowered_kernels_exact_on_full_range_grids(reduce_range):
    torch.manual_seed(0)
    m = _Wide().eval()
    cal = [torch.rand(2, 128, 8, 8) * 0.9 + 0.1 for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxopt.optimize(m, cal[0], quantize=QuantConfig(reduce_range=reduce_range),
                             calibration_data=cal, target="cpu", check="each")
    q, low = opt.report.record("quantize_int8"), opt.report.record("lower_int8_cpu")
    assert q.stats["reduce_range"] is False
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
