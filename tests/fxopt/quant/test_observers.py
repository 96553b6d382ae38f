"""Calibration observers and quantization parameters (issue 5), checked against hand-computed
scales and against torch's own fake-quantize ops."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.errors import InputError, PipelineError
from fxopt.quant.observers import (OBSERVERS, HistogramObserver, MinMaxObserver,
                                   MovingAverageMinMaxObserver, MSEObserver, PercentileObserver,
                                   PerChannelMinMaxObserver, make_observer)
from fxopt.quant.qparams import QParams, qparams_from_range, quant_range

VALUES = torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0])  # values -1..3


def f32(v):
    return torch.tensor(v, dtype=torch.float32).item()


def mse(qp, x):
    return float(((qp.fake_quantize(x) - x) ** 2).mean())


# -- qparams_from_range: the formulas ------------------------------------------------------

def test_asymmetric_uint8_by_hand():
    qp = qparams_from_range(-1.0, 3.0, dtype=torch.uint8)
    assert qp.scale.item() == f32(4.0) / f32(255.0) or qp.scale.item() == pytest.approx(4 / 255, rel=1e-7)
    assert qp.zero_point.item() == 64  # 0 - round(-1 / (4/255)) = round(63.75)
    assert (qp.qmin, qp.qmax, qp.dtype, qp.symmetric) == (0, 255, torch.uint8, False)


def test_asymmetric_int8_and_symmetric_by_hand():
    qa = qparams_from_range(-1.0, 3.0, dtype=torch.int8)
    assert qa.scale.item() == pytest.approx(4 / 255, rel=1e-7)
    assert qa.zero_point.item() == -128 + 64
    qs = qparams_from_range(-1.0, 3.0, dtype=torch.int8, symmetric=True)
    assert qs.scale.item() == pytest.approx(3 / 127, rel=1e-7)
    assert (qs.zero_point.item(), qs.qmin, qs.qmax) == (0, -127, 127)
    qu = qparams_from_range(-1.0, 3.0, dtype=torch.uint8, symmetric=True)
    assert (qu.zero_point.item(), qu.qmin, qu.qmax) == (128, 1, 255)
    assert qu.scale.item() == pytest.approx(3 / 127, rel=1e-7)


def test_range_is_widened_to_hold_zero_and_zero_is_exact():
    qp = qparams_from_range(2.0, 6.0, dtype=torch.uint8)  # treated as [0, 6]
    assert qp.zero_point.item() == 0 and qp.scale.item() == pytest.approx(6 / 255, rel=1e-7)
    assert qp.fake_quantize(torch.zeros(3)).eq(0).all()


def test_all_zero_range_gets_eps_scale_and_reduce_range():
    qp = qparams_from_range(0.0, 0.0)
    assert qp.scale.item() == pytest.approx(torch.finfo(torch.float32).eps)
    assert quant_range(torch.uint8, reduce_range=True) == (0, 127)
    assert quant_range(torch.int8, reduce_range=True) == (-64, 63)
    assert quant_range(torch.int8, symmetric=True) == (-127, 127)


def test_qparams_from_range_bad_inputs():
    with pytest.raises(InputError):
        qparams_from_range(1.0, -1.0)
    with pytest.raises(InputError):
        qparams_from_range(float("nan"), 1.0)
    with pytest.raises(InputError):
        qparams_from_range(-1.0, 1.0, dtype=torch.int16)
    with pytest.raises(InputError, match="axis"):
        qparams_from_range(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]))


# -- QParams arithmetic --------------------------------------------------------------------

@pytest.mark.parametrize("dtype,symmetric", [(torch.uint8, False), (torch.int8, False),
                                             (torch.int8, True), (torch.uint8, True)])
def test_round_trip_exact_on_the_grid(dtype, symmetric):
    qp = qparams_from_range(-1.3, 2.7, dtype=dtype, symmetric=symmetric)
    codes = torch.arange(qp.qmin, qp.qmax + 1)
    grid = (codes - qp.zero_point).float() * qp.scale       # k * scale for every k in range
    q = qp.quantize(grid)
    assert q.dtype == dtype
    assert torch.equal(q.to(torch.int64), codes)
    assert torch.equal(qp.dequantize(q), grid)                # bitwise
    assert torch.equal(qp.fake_quantize(grid), grid)


def test_round_half_to_even_and_clamp():
    qp = QParams(torch.tensor(1.0), torch.tensor(0), -127, 127, torch.int8, None, True)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 500.0, -500.0])
    assert qp.quantize(x).tolist() == [0, 2, 2, 0, -2, 127, -127]


def test_fake_quantize_matches_torch_per_tensor_bitwise():
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        x = torch.randn(4096, generator=g) * (0.01 + 10 * torch.rand(1, generator=g))
        for dtype, symmetric in [(torch.uint8, False), (torch.int8, False), (torch.int8, True)]:
            # a range narrower than the data, so clamping is exercised too
            qp = qparams_from_range(x.min() * 0.7, x.max() * 0.8, dtype=dtype, symmetric=symmetric)
            ref = torch.fake_quantize_per_tensor_affine(x, qp.scale.item(), int(qp.zero_point),
                                                        qp.qmin, qp.qmax)
            assert torch.equal(qp.fake_quantize(x), ref)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensor types are deprecated
                qdt = torch.quint8 if dtype == torch.uint8 else torch.qint8
                codes = torch.quantize_per_tensor(x, qp.scale.item(), int(qp.zero_point), qdt)
            expect = codes.int_repr().to(torch.int64).clamp(qp.qmin, qp.qmax)
            assert torch.equal(qp.quantize(x).to(torch.int64), expect)


@pytest.mark.parametrize("axis", [0, 1])
def test_fake_quantize_matches_torch_per_channel_bitwise(axis):
    g = torch.Generator().manual_seed(1)
    for i in range(10):
        w = torch.randn(16, 8, 3, 3, generator=g) * torch.rand(16, 1, 1, 1, generator=g)
        obs = PerChannelMinMaxObserver(axis=axis)
        obs.observe(w)
        qp = obs.qparams()
        ref = torch.fake_quantize_per_channel_affine(w, qp.scale, qp.zero_point.to(torch.int32),
                                                     axis, qp.qmin, qp.qmax)
        assert torch.equal(qp.fake_quantize(w), ref)
        qa = qparams_from_range(w.amin((0, 2, 3)) if axis == 1 else w.amin((1, 2, 3)),
                                w.amax((0, 2, 3)) if axis == 1 else w.amax((1, 2, 3)),
                                dtype=torch.uint8, axis=axis)
        ref = torch.fake_quantize_per_channel_affine(w, qa.scale, qa.zero_point.to(torch.int32),
                                                     axis, qa.qmin, qa.qmax)
        assert torch.equal(qa.fake_quantize(w), ref)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64),
       st.sampled_from([(torch.uint8, False), (torch.int8, False), (torch.int8, True)]),
       st.floats(0.05, 1.0))
def test_error_at_most_half_a_step_inside_the_clip_range(values, kind, shrink):
    x = torch.tensor(values, dtype=torch.float32)
    dtype, symmetric = kind
    qp = qparams_from_range(x.min() * shrink, x.max() * shrink, dtype=dtype, symmetric=symmetric)
    lo, hi = qp.clip_range()
    inside = (x >= lo) & (x <= hi)
    err = (x - qp.fake_quantize(x)).abs()[inside]
    s = qp.scale.item()
    assert bool((err <= s / 2 * (1 + 1e-5) + 1e-30).all())
    outside = ~inside  # outside, values clamp to the nearest end of the grid
    assert bool((qp.fake_quantize(x)[outside].abs() <= torch.maximum(lo.abs(), hi.abs()) * (1 + 1e-6)).all())


# -- observers ------------------------------------------------------------------------------

def test_minmax_by_hand_across_batches():
    obs = MinMaxObserver(dtype=torch.uint8)
    obs.observe(VALUES[:2]); obs.observe(VALUES[2:])
    assert obs.range() == (-1.0, 3.0)
    qp = obs.qparams()
    assert qp.scale.item() == pytest.approx(4 / 255, rel=1e-7) and qp.zero_point.item() == 64
    sym = MinMaxObserver(dtype=torch.int8, symmetric=True)
    sym.observe(VALUES)
    assert sym.qparams().scale.item() == pytest.approx(3 / 127, rel=1e-7)


def test_moving_average_two_batches_by_hand():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.01, dtype=torch.uint8)
    obs.observe(VALUES)                                   # [-1, 3]
    obs.observe(torch.tensor([-2.0, 5.0]))                # moves 1% of the way
    lo, hi = obs.range()
    assert lo == pytest.approx(-1.0 + 0.01 * (-2.0 + 1.0))  # -1.01
    assert hi == pytest.approx(3.0 + 0.01 * (5.0 - 3.0))    # 3.02
    assert obs.qparams().scale.item() == pytest.approx((3.02 + 1.01) / 255, rel=1e-6)


def test_percentile_clips_one_outlier():
    x = torch.cat([torch.linspace(-1, 1, 100_000), torch.tensor([100.0])])
    obs = PercentileObserver(percentile=99.99, dtype=torch.uint8)
    obs.observe(x[:50_000]); obs.observe(x[50_000:])      # range grows: re-binning path
    lo, hi = obs.range()
    assert -1.0 <= lo < -0.95 and 0.95 < hi < 1.1          # the outlier at 100 is clipped
    assert obs.qparams().scale.item() == pytest.approx(2 / 255, rel=0.05)


def test_mse_tighter_than_minmax_with_outliers_and_never_worse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g)
    x[:20] = 30.0
    for symmetric in (False, True):
        m, mm = MSEObserver(symmetric=symmetric, dtype=torch.int8), MinMaxObserver(symmetric=symmetric, dtype=torch.int8)
        m.observe(x); mm.observe(x)
        assert m.range()[1] < mm.range()[1]
        assert mse(m.qparams(), x) < mse(mm.qparams(), x)
    for seed in range(4):
        x = torch.randn(20_000, generator=torch.Generator().manual_seed(seed)) ** 3
        for symmetric in (False, True):
            m, mm = MSEObserver(symmetric=symmetric), MinMaxObserver(symmetric=symmetric)
            m.observe(x); mm.observe(x)
            assert mse(m.qparams(), x) <= mse(mm.qparams(), x)


def test_kl_threshold_sensible_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((100_000,))
    obs = HistogramObserver(dtype=torch.int8, symmetric=True)
    obs.observe(x[:50_000]); obs.observe(x[50_000:])
    t = obs.threshold()
    amax = float(x.abs().max())
    assert float(torch.quantile(x.abs(), 0.99)) < t < amax / 4   # clips the tail, keeps the bulk
    qp = obs.qparams()
    assert qp.scale.item() == pytest.approx(t / 127, rel=1e-6)
    # unsigned data on an asymmetric uint8 grid (256 quantized bins): the grid starts at 0.
    # (Milder tails here: with 256 quantized bins the 2048-bin histogram is too coarse for
    # StudentT(2) |x|, and KL then keeps the full range; see the report / module notes.)
    y = torch.distributions.Laplace(0.0, 1.0).sample((100_000,)).abs()
    u = HistogramObserver(dtype=torch.uint8)
    u.observe(y)
    lo, hi = u.range()
    assert lo >= 0.0 and float(torch.quantile(y, 0.99)) < hi < float(y.max())
    assert u.qparams().zero_point.item() == 0


def test_per_channel_weight_scale_is_max_abs_over_127():
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    w[2] *= 10
    obs = PerChannelMinMaxObserver(axis=0)
    obs.observe(w)
    qp = obs.qparams()
    assert qp.scale.shape == (6,) and qp.axis == 0 and qp.dtype == torch.int8
    expect = w.abs().amax((1, 2, 3)) / 127
    torch.testing.assert_close(qp.scale, expect, rtol=1e-6, atol=0)
    assert qp.zero_point.eq(0).all() and (qp.qmin, qp.qmax) == (-127, 127)
    with pytest.raises(InputError, match="channels"):
        obs.observe(torch.randn(5, 4))


def test_histogram_observers_accept_all_zero_and_constant_batches():
    for name in OBSERVERS:
        obs = make_observer(name)
        obs.observe(torch.zeros(10)); obs.observe(torch.full((10,), 2.0))
        qp = obs.qparams()
        assert qp.scale.item() > 0 and math.isfinite(qp.scale.item())


# -- errors ----------------------------------------------------------------------------------

def test_registry_and_unknown_name():
    assert set(OBSERVERS) == {"minmax", "moving_average", "percentile", "mse", "kl"}
    assert isinstance(make_observer("percentile", percentile=99.9), PercentileObserver)
    with pytest.raises(PipelineError) as e:
        make_observer("entropy")
    assert "minmax" in e.value.hint and "kl" in e.value.hint
    with pytest.raises(PipelineError):
        make_observer("minmax", nonsense=1)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_empty_observer_and_nan_input(name):
    obs = make_observer(name, label="layer1.conv input")
    obs.observe(torch.empty(0))  # an empty batch contributes nothing
    with pytest.raises(InputError, match="no calibration data reached layer1.conv input"):
        obs.qparams()
    with pytest.raises(InputError, match="NaN"):
        obs.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(InputError, match="inf"):
        obs.observe(torch.tensor([1.0, float("inf")]))
    with pytest.raises(InputError, match="float"):
        obs.observe(torch.tensor([1, 2]))


def test_per_channel_empty_and_nan():
    obs = PerChannelMinMaxObserver(label="fc.weight")
    with pytest.raises(InputError, match="no calibration data reached fc.weight"):
        obs.qparams()
    with pytest.raises(InputError, match="NaN"):
        obs.observe(torch.tensor([[float("nan")]]))
