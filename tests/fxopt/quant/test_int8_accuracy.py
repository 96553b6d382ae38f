"""Int8 says when it is bad (issue 12, item 5).

- The global average pool before the classifier is requantized onto its own observed grid: on
  its input's grid (a wide, sparse activation) most pooled codes were the zero point.
- The report's int8 figures come from data held out of calibration (or a note says they do not).
- A run under the SQNR floor warns with ``fxopt.Int8AccuracyWarning``, naming the worst layers
  and the fix (``QuantConfig(min_sqnr_db=...)``); a healthy model does not warn.
"""
import warnings

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.errors import InputError
from fxopt.ops.int8 import AvgPool2dInt8
from fxopt.quant.config import QuantConfig
from fxopt.quant.measure import sqnr_db

POOL8 = torch.ops.fxopt.adaptive_avg_pool2d_int8.default


class GapNet(nn.Module):
    """conv -> relu -> conv -> relu -> AdaptiveAvgPool2d(1) -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        return self.fc(torch.flatten(self.pool(y), 1))


def _net(wide: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = GapNet().eval()
    if wide:  # a wide, sparse activation before the pool: strong rare responses, a small mean
        with torch.no_grad():
            m.c2.weight.mul_(4)
            m.c2.bias.fill_(-1.5)
            m.fc.bias.zero_()
    return m


def _batches(n, scale=1.0, size=8, hw=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(size, 3, hw, hw, generator=g) for _ in range(n)]


def _int8_warnings(fn):
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        out = fn()
    return out, [w.message for w in ws if isinstance(w.message, fxopt.Int8AccuracyWarning)]


# -- the global pool on its own grid ----------------------------------------------------------
def test_global_pool_quantized_on_its_own_grid():
    """13.3 dB on main (the pooled codes on the conv's grid), 33 dB on the pool's own grid."""
    m = _net(wide=True)
    cal = _batches(6)
    fresh = _batches(1, size=32, seed=7)[0]
    opt, ws = _int8_warnings(lambda: fxopt.optimize(m, cal[0], quantize="int8",
                                                    calibration_data=cal))
    with torch.no_grad():
        measured = sqnr_db(m(fresh), opt(fresh))
    assert measured > 25, measured
    assert opt.report.int8["sqnr_db"] > 25 and not ws


def test_global_pool_ir_carries_the_output_grid():
    m = _net(wide=True)
    cal = _batches(5)
    opt = fxopt.optimize(m, cal[0], quantize="int8", calibration_data=cal,
                         disable=["lower_int8_cpu"])
    (pool,) = [n for n in opt.graph_module.graph.nodes if n.target is POOL8]
    gm = opt.graph_module
    v = AvgPool2dInt8.of(pool)
    y_scale = getattr(gm, v.y_scale.target)
    x_scale = getattr(gm, v.scale.target)
    assert float(y_scale) < float(x_scale) / 4  # a finer grid than the conv's
    # the pooled codes spread over the grid instead of sitting on the zero point
    codes = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is pool:
                codes["p"] = out
            return out

    with torch.no_grad():
        Grab(gm).run(cal[-1])
    p, zp = codes["p"].long(), int(getattr(gm, v.y_zp.target))
    assert (p == zp).float().mean() < 0.5 and p.unique().numel() > 20


def test_own_grid_pool_lowered_on_cpu_equals_the_ir():
    m = _net(wide=True)
    cal = _batches(5)
    ir = fxopt.optimize(m, cal[0], quantize="int8", calibration_data=cal,
                        disable=["lower_int8_cpu"])
    low = fxopt.optimize(m, cal[0], quantize="int8", calibration_data=cal)
    targets = [n.target for n in low.graph_module.graph.nodes]
    assert POOL8 not in targets and torch.ops.fxopt.cpu_adaptive_avg_pool2d_int8.default in targets
    step = low.report.record("quantize_int8").stats["output_step"]
    with torch.no_grad():
        for x in _batches(3, seed=11):
            assert (low(x) - ir(x)).abs().max() <= step * (1 + 1e-4)


# -- figures on held-out data -----------------------------------------------------------------
def _clipping_case():
    """Calibration batches narrower than the data: their grids clip a fresh batch."""
    narrow = _batches(4, scale=0.3, size=4, hw=8)
    wide = _batches(1, scale=2.0, size=16, hw=8, seed=3)
    return _net(), narrow, wide


def test_report_sqnr_is_measured_on_held_out_batches():
    m, narrow, wide = _clipping_case()
    opt, ws = _int8_warnings(lambda: fxopt.optimize(m, narrow[0], quantize="int8",
                                                    calibration_data=narrow + wide))
    st = opt.report.int8
    assert st["measured_on"] == "held_out" and st["held_out"]
    assert st["calibration_batches"] == 4 and st["measured_batches"] == 1
    with torch.no_grad():
        measured = sqnr_db(m(wide[0]), opt(wide[0]))
    assert st["sqnr_db"] == pytest.approx(measured, abs=0.01)
    assert st["sqnr_db"] < 20  # the grids of 4 narrow batches clip it (main said 40 dB)
    assert "held out of calibration" in opt.report.record("quantize_int8").notes[0]


def test_report_uses_example_inputs_when_few_batches():
    m, narrow, wide = _clipping_case()
    opt, _ = _int8_warnings(lambda: fxopt.optimize(m, wide[0], quantize="int8",
                                                   calibration_data=narrow[:3]))
    st = opt.report.int8
    assert st["measured_on"] == "example_inputs" and st["calibration_batches"] == 3
    with torch.no_grad():
        assert st["sqnr_db"] == pytest.approx(sqnr_db(m(wide[0]), opt(wide[0])), abs=0.01)


def test_report_says_so_when_nothing_is_held_out():
    m, narrow, _ = _clipping_case()
    opt, _ = _int8_warnings(lambda: fxopt.optimize(m, narrow[0], quantize="int8",
                                                   calibration_data=narrow[:3]))
    st = opt.report.int8
    assert st["measured_on"] == "calibration" and st["held_out"] is False
    notes = opt.report.record("quantize_int8").notes
    assert any("calibration batches themselves" in n and "at least 5" in n for n in notes), notes


# -- the warning ------------------------------------------------------------------------------
def test_warns_under_the_floor_with_worst_layers_and_fix():
    m, narrow, wide = _clipping_case()
    opt, ws = _int8_warnings(lambda: fxopt.optimize(m, narrow[0], quantize="int8",
                                                    calibration_data=narrow + wide))
    assert len(ws) == 1
    w = ws[0]
    assert w.floor_db == 20 and w.sqnr_db == opt.report.int8["sqnr_db"] < 20
    paths = [p for p, _ in w.worst_layers]
    assert paths and set(paths) <= {"c1", "c2", "fc"}
    dbs = [db for _, db in w.worst_layers]
    assert dbs == sorted(dbs)  # worst first
    text = str(w)
    assert all(p in text for p in paths) and "QuantConfig(min_sqnr_db=20)" in w.hint
    assert opt.report.int8["worst_layers_db"] == dict(w.worst_layers)


def test_the_fix_silences_the_warning():
    m, narrow, wide = _clipping_case()
    opt, ws = _int8_warnings(lambda: fxopt.optimize(
        m, narrow[0], quantize=fxopt.QuantConfig(min_sqnr_db=20),
        calibration_data=narrow + wide))
    assert not ws
    assert opt.report.record("quantize_int8").stats["fallback"]  # layers kept in float


def test_no_warning_on_a_healthy_model():
    m = _net()
    cal = _batches(5, hw=8)
    opt, ws = _int8_warnings(lambda: fxopt.optimize(m, cal[0], quantize="int8",
                                                    calibration_data=cal))
    assert not ws and opt.report.int8["sqnr_db"] > 25
    assert opt.report.int8["sqnr_floor_db"] == 20


def test_warn_sqnr_db_none_never_warns():
    m, narrow, wide = _clipping_case()
    opt, ws = _int8_warnings(lambda: fxopt.optimize(
        m, narrow[0], quantize=QuantConfig(warn_sqnr_db=None), calibration_data=narrow + wide))
    assert not ws and opt.report.int8["sqnr_db"] < 20


@pytest.mark.parametrize("bad", [dict(holdout_fraction=1.5), dict(holdout_fraction="a"),
                                 dict(warn_sqnr_db="20")])
def test_config_fields_are_checked(bad):
    with pytest.raises(InputError) as e:
        QuantConfig(**bad)
    assert e.value.hint


@pytest.mark.parametrize("dtype,grid,y_grid", [
    (torch.uint8, (0.05, 3, 0, 255), (0.004, 0)),      # a finer output grid, as after a relu
    (torch.int8, (0.02, 0, -128, 127), (0.01, 5)),
])
def test_triton_global_pool_kernel_onto_an_output_grid(monkeypatch, dtype, grid, y_grid):
    """The Triton kernel (here under Triton's interpreter) requantizes onto ``y_scale`` /
    ``y_zp`` as the IR op does: within one code at float32 ties."""
    pytest.importorskip("triton")
    from fxopt.ops.int8 import adaptive_avg_pool2d_int8_reference
    from fxopt.triton_kernels import pool as P

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    scale, zp, lo, hi = grid
    g = torch.Generator().manual_seed(0)
    q = torch.randint(lo, hi + 1, (2, 40, 6, 5), generator=g).to(dtype)
    q = q.contiguous(memory_format=torch.channels_last)
    y = P.global_avg_pool2d_int8(q, scale, zp, lo, hi, y_scale=y_grid[0], y_zp=y_grid[1])
    ir = adaptive_avg_pool2d_int8_reference(
        q, [1, 1], torch.tensor(scale), torch.tensor(zp), lo, hi,
        y_scale=torch.tensor(y_grid[0]), y_zp=torch.tensor(y_grid[1]))
    same = adaptive_avg_pool2d_int8_reference(q, [1, 1], torch.tensor(scale), torch.tensor(zp),
                                              lo, hi)
    diff = (y.to(torch.int32) - ir.to(torch.int32)).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.9
    assert not torch.equal(ir, same)  # the output grid was used


def test_holdout_fraction_zero_calibrates_on_every_batch_and_says_so():
    m = _net()
    cal = _batches(5, hw=8)
    opt, _ = _int8_warnings(lambda: fxopt.optimize(
        m, cal[0], quantize=QuantConfig(holdout_fraction=0), calibration_data=cal))
    st = opt.report.int8
    assert st["calibration_batches"] == 5 and st["measured_on"] == "calibration"
    assert any("holdout_fraction=0" in n for n in opt.report.record("quantize_int8").notes)
