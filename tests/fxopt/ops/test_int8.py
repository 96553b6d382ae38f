"""The int8 IR ops (fxopt.ops_int8) against hand and int64 / float64 computations.

Layers: exact integer accumulation (checked in int64), float32 epilogue, codes out. Pools,
add and cat: within one code of the float computation on the dequantized values. Fake
implementations: the shapes, dtypes and layouts of the real ones.
"""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fxopt.ops.int8  # noqa: F401
from fxopt.ops.int8 import codes_dtype

OPS = torch.ops.fxopt
G = torch.Generator().manual_seed(0)


def _t(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def _codes(shape, lo=0, hi=255, dtype=torch.uint8):
    return torch.randint(lo, hi + 1, shape, generator=G).to(dtype)


def _wq(shape):
    return torch.randint(-127, 128, shape, generator=G, dtype=torch.int64).to(torch.int8)


def _requant(v64, scale, zp, qmin=0, qmax=255):
    """float64 values -> codes, round half to even (the values here are far from ties)."""
    return (torch.round(v64 / float(scale)) + zp).clamp(qmin, qmax).to(torch.int64)


# -- quantize / dequantize --------------------------------------------------------------------
@pytest.mark.parametrize("qmin, qmax, zp", [(0, 255, 37), (-128, 127, 0)])
def test_quantize_dequantize_round_trip_exact_on_grid(qmin, qmax, zp):
    s = _t(0.0371)
    codes = torch.arange(qmin, qmax + 1)
    x = (codes - zp).float() * s  # the grid points
    q = OPS.quantize(x, s, _t(zp, torch.int64), qmin, qmax)
    assert q.dtype == codes_dtype(qmin)
    assert torch.equal(q.to(torch.int64), codes)
    back = OPS.dequantize(q, s, _t(zp, torch.int64))
    assert back.dtype == torch.float32 and torch.equal(back, x)


def test_quantize_rounds_half_to_even_and_clamps():
    s, zp = _t(0.5), _t(10, torch.int64)
    x = torch.tensor([0.25, 0.75, -0.25, 1000.0, -1000.0, 0.1])  # 0.5, 1.5, -0.5 codes: ties
    q = OPS.quantize(x, s, zp, 0, 255).to(torch.int64)
    assert q.tolist() == [10, 12, 10, 255, 0, 10]


# -- layers -----------------------------------------------------------------------------------
def _conv_int64(q, zp, w, stride, padding, dilation, groups):
    """Exact integer conv via float64 (every sum here is far below 2**53)."""
    acc = F.conv2d((q.to(torch.int64) - zp).double(), w.double(), None, stride, padding, dilation,
                   groups)
    assert torch.equal(acc, acc.round())
    return acc


@pytest.mark.parametrize("cin, cout, k, stride, padding, dilation, groups", [
    (4, 6, 3, 1, 1, 1, 1),
    (6, 6, 3, 2, 1, 1, 6),       # depthwise, strided
    (8, 12, 3, 1, 2, 2, 4),      # grouped, dilated
    (5, 7, (1, 3), (2, 1), (0, 1), 1, 1),
    (512, 4, 3, 1, 1, 1, 1),     # K = 512 * 9 with full 0..255 codes: the split accumulation
])
def test_conv2d_int8_exact(cin, cout, k, stride, padding, dilation, groups):
    k2 = (k, k) if isinstance(k, int) else k
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    q = _codes((2, cin, 6, 7))
    w = _wq((cout, cin // groups, *k2))
    xs, xz = _t(0.02), _t(128, torch.int64)
    ws = torch.rand(cout, generator=G) * 1e-3 + 1e-4
    b = torch.randn(cout, generator=G)
    args = (pair(stride), pair(padding), pair(dilation), groups)
    acc = _conv_int64(q, 128, w, *args)
    y64 = acc * (xs.double() * ws.double()).view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    # the float output (out_int8=False) on a fine grid shows the accumulator
    ys, yz = _t(float(y64.abs().max()) / 2 ** 30), _t(0, torch.int64)
    got = OPS.conv2d_int8(q, w, ws, b, *args, xs, xz, ys, yz, y_qmin=-2 ** 31, y_qmax=2 ** 31 - 1)
    assert got.dtype == torch.float32 and got.shape == acc.shape
    # float32 epilogue: a few ulps of the largest value; one unit of the accumulator is
    # x_scale * w_scale >= 2e-6, far above that
    assert torch.allclose(got.double(), y64, rtol=1e-6, atol=3e-7 * float(y64.abs().max()))
    # codes out, a coarse grid: within one code of the float64 value, relu applied
    ys, yz = _t(float(y64.abs().max()) / 100), _t(3, torch.int64)
    codes = OPS.conv2d_int8(q, w, ws, b, *args, xs, xz, ys, yz, act="relu", out_int8=True)
    want = _requant(torch.relu(y64), ys, 3)
    assert codes.dtype == torch.uint8
    assert (codes.to(torch.int64) - want).abs().max() <= 1
    assert (codes.to(torch.int64) == want).float().mean() > 0.99


def test_conv2d_int8_split_accumulation_matches_int64():
    """K = 512*9 codes 0..255 around zero point 0: sums pass 2**24; the split keeps them exact."""
    q = torch.full((1, 512, 3, 3), 255, dtype=torch.uint8)
    q[0, ::2] = _codes((256, 3, 3))
    w = torch.full((2, 512, 3, 3), 127, dtype=torch.int8)
    w[1] = _wq((512, 3, 3))
    acc64 = (q.to(torch.int64)[0].reshape(1, -1) * w.to(torch.int64).reshape(2, -1)).sum(1)
    assert int(acc64[0]) > 2 ** 24
    one = _t(1.0)
    got = OPS.conv2d_int8(q, w, torch.ones(2), None, [1, 1], [0, 0], [1, 1], 1, one,
                          _t(0, torch.int64), one, _t(0, torch.int64),
                          y_qmin=-2 ** 31, y_qmax=2 ** 31 - 1)
    # the epilogue rounds the exact sum to float32 once
    assert torch.equal(got.reshape(-1), acc64.float())


def test_conv2d_int8_float_input_quantized_on_its_grid():
    x = torch.randn(1, 3, 5, 5, generator=G)
    xs, xz = _t(0.03), _t(120, torch.int64)
    w, ws = _wq((4, 3, 3, 3)), torch.full((4,), 2e-3)
    q = OPS.quantize(x, xs, xz, 0, 255)
    ys, yz = _t(0.01), _t(100, torch.int64)
    a = OPS.conv2d_int8(x, w, ws, None, [1, 1], [1, 1], [1, 1], 1, xs, xz, ys, yz, out_int8=True)
    b = OPS.conv2d_int8(q, w, ws, None, [1, 1], [1, 1], [1, 1], 1, xs, xz, ys, yz, out_int8=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("k", [64, 5000])  # one float32 product; split or float64 above 2**24
def test_linear_int8_exact(k):
    q = _codes((3, k))
    w = _wq((5, k))
    xs, xz, ws = _t(0.01), _t(77, torch.int64), torch.rand(5, generator=G) * 1e-3 + 1e-4
    b = torch.randn(5, generator=G)
    acc = (q.to(torch.int64) - 77) @ w.to(torch.int64).t()
    y64 = acc.double() * (xs.double() * ws.double()) + b.double()
    ys = _t(float(y64.abs().max()) / 2 ** 30)
    got = OPS.linear_int8(q, w, ws, b, xs, xz, ys, _t(0, torch.int64),
                          y_qmin=-2 ** 31, y_qmax=2 ** 31 - 1)
    assert torch.allclose(got.double(), y64, rtol=1e-6, atol=3e-7 * float(y64.abs().max()))
    ys, yz = _t(float(y64.abs().max()) / 60), _t(128, torch.int64)
    codes = OPS.linear_int8(q, w, ws, b, xs, xz, ys, yz, out_int8=True)
    assert codes.dtype == torch.uint8
    assert (codes.to(torch.int64) - _requant(y64, ys, 128)).abs().max() <= 1


def test_linear_int8_symmetric_codes_in_and_out():
    q = _codes((2, 16), -128, 127, torch.int8)
    w = _wq((3, 16))
    ws = torch.full((3,), 1e-2)
    acc = q.to(torch.int64) @ w.to(torch.int64).t()
    ys = _t(float((acc.double() * 1e-3).abs().max()) / 100)
    codes = OPS.linear_int8(q, w, ws, None, _t(0.1), _t(0, torch.int64), ys, _t(0, torch.int64),
                            x_qmin=-128, x_qmax=127, y_qmin=-128, y_qmax=127, out_int8=True)
    assert codes.dtype == torch.int8
    assert (codes.to(torch.int64) - _requant(acc.double() * 1e-3, ys, 0, -128, 127)).abs().max() <= 1


# -- add, cat, pools ---------------------------------------------------------------------------
def _deq(q, s, z):
    return (q.to(torch.int64) - z).double() * s


def test_add_int8_within_one_code():
    a, b = _codes((2, 3, 4, 4)), _codes((2, 3, 4, 4))
    sa, za, sb, zb, sy, zy = 0.05, 100, 0.02, 30, 0.06, 90
    y = OPS.add_int8(a, _t(sa), _t(za, torch.int64), b, _t(sb), _t(zb, torch.int64), _t(sy),
                     _t(zy, torch.int64), act="relu")
    want = _requant(torch.relu(_deq(a, sa, za) + _deq(b, sb, zb)), sy, zy)
    assert y.dtype == torch.uint8 and (y.to(torch.int64) - want).abs().max() <= 1


def test_cat_int8_within_one_code():
    qs = [_codes((1, 2, 3, 3)), _codes((1, 4, 3, 3))]
    grids = [(0.1, 10), (0.03, 200)]
    y = OPS.cat_int8(qs, [_t(s) for s, _ in grids], [_t(z, torch.int64) for _, z in grids], 1,
                     _t(0.12), _t(60, torch.int64), 0, 255)
    want = _requant(torch.cat([_deq(q, s, z) for q, (s, z) in zip(qs, grids)], 1), 0.12, 60)
    assert y.shape == (1, 6, 3, 3) and (y.to(torch.int64) - want).abs().max() <= 1


def test_pools_on_codes():
    q = _codes((2, 3, 9, 9))
    s, z = 0.04, 17
    y = OPS.adaptive_avg_pool2d_int8(q, [2, 3], _t(s), _t(z, torch.int64), 0, 255)
    want = _requant(F.adaptive_avg_pool2d(_deq(q, s, z), [2, 3]), s, z)
    assert y.dtype == torch.uint8 and (y.to(torch.int64) - want).abs().max() <= 1
    m = OPS.max_pool2d_int8(q, [3, 3], [2, 2], [1, 1], [1, 1], False)
    assert m.dtype == torch.uint8
    assert torch.equal(m.to(torch.int64), F.max_pool2d(q.double(), 3, 2, 1).to(torch.int64))
    qs = _codes((1, 2, 5, 5), -128, 127, torch.int8)
    assert torch.equal(OPS.max_pool2d_int8(qs, [2, 2], [2, 2], [0, 0], [1, 1], True),
                       F.max_pool2d(qs.float(), 2, 2, ceil_mode=True).to(torch.int8))


# -- fake implementations ----------------------------------------------------------------------
def _calls():
    s, z = _t(0.1), _t(3, torch.int64)
    x = torch.randn(2, 8, 7, 6, generator=G)
    q = _codes((2, 8, 7, 6))
    w, ws = _wq((4, 2, 3, 3)), torch.full((4,), 1e-2)
    conv = dict(stride=[2, 1], padding=[1, 0], dilation=[1, 2], groups=4)
    cargs = lambda inp: (inp, w, ws, None, conv["stride"], conv["padding"],  # noqa: E731
                         conv["dilation"], conv["groups"], s, z, s, z)
    lq, lw = _codes((3, 5, 16)), _wq((7, 16))
    return [
        (OPS.conv2d_int8, cargs(q), dict(out_int8=True)),
        (OPS.conv2d_int8, cargs(q), {}),
        (OPS.conv2d_int8, cargs(x.to(memory_format=torch.channels_last)), {}),
        (OPS.conv2d_int8, cargs(x), dict(out_int8=True, y_qmin=-128, y_qmax=127)),
        (OPS.linear_int8, (lq, lw, torch.full((7,), 1e-2), None, s, z, s, z), dict(out_int8=True)),
        (OPS.linear_int8, (lq.float(), lw, torch.full((7,), 1e-2), None, s, z, s, z), {}),
        (OPS.quantize, (x, s, z, 0, 255), {}),
        (OPS.quantize, (x, s, z, -128, 127), {}),
        (OPS.dequantize, (q, s, z), {}),
        (OPS.add_int8, (q, s, z, q, s, z, s, z), dict(act="relu")),
        (OPS.adaptive_avg_pool2d_int8, (q, [1, 1], s, z, 0, 255), {}),
        (OPS.max_pool2d_int8, (q, [3, 3], [2, 2], [1, 1], [1, 1], True), {}),
        (OPS.cat_int8, ([q, q[:, :3]], [s, s], [z, z], 1, s, z, 0, 255), {}),
    ]


@pytest.mark.parametrize("i", range(13))
def test_fake_matches_real(i):
    op, args, kwargs = _calls()[i]
    real = op(*args, **kwargs)
    mode = FakeTensorMode()
    fake_args = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
    with mode:
        fake = op(*fake_args, **kwargs)
    assert fake.shape == real.shape and fake.dtype == real.dtype
    assert fake.stride() == real.stride() or real.numel() <= 1


def test_opcheck_layers():
    op, args, kwargs = _calls()[0]
    torch.library.opcheck(op, args, kwargs, test_utils=("test_schema", "test_faketensor"))
