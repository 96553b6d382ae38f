"""The int8 pools against fxopt's int8 IR references.

``max_pool2d_int8`` equals the reference code for code (max is exact).
``global_avg_pool2d_int8`` sums exactly in int32 where PyTorch sums float32 values, so it may
differ from ``adaptive_avg_pool2d_int8_reference`` by one code where the mean falls within
float32 rounding of a half-way point (it equals its own exact-sum reference bit for bit).
"""
import pytest
import torch

from fxopt.ops import int8 as IR
from fxopt.triton_kernels import pool as P


def _t(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


POOLS = [  # kernel, stride, padding, dilation, ceil_mode
    ((3, 3), (2, 2), (1, 1), (1, 1), False),    # ResNet's stem pool
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (2, 2), (0, 0), (1, 1), True),     # ceil_mode adds a partial last window
    ((2, 3), (1, 2), (1, 1), (2, 1), True),     # non-square, dilated
    ((1, 1), (1, 1), (0, 0), (1, 1), False),
]


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: f"k{p[0]}s{p[1]}p{p[2]}d{p[3]}c{int(p[4])}")
@pytest.mark.parametrize("shape,cl,dtype", [((2, 17, 9, 11), True, torch.uint8),
                                            ((1, 5, 8, 8), False, torch.int8),
                                            ((1, 1, 3, 2), True, torch.uint8)],
                         ids=["nhwc-u8", "nchw-i8", "tiny"])
def test_max_pool2d_int8_exact(device, tk, pool, shape, cl, dtype):
    k, s, p, d, ceil = pool
    if shape[2] + 2 * p[0] < d[0] * (k[0] - 1) + 1 or shape[3] + 2 * p[1] < d[1] * (k[1] - 1) + 1:
        pytest.skip("window larger than the padded input")
    q = tk.codes(shape, dtype, device, channels_last=cl)
    ref = IR.max_pool2d_int8_reference(q.cpu(), k, s, p, d, ceil)
    out = tk.poisoned(ref.shape, dtype, device, channels_last=True)
    y = P.max_pool2d_int8(q, k, s, p, d, ceil, out=out)
    assert y is out and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.cpu(), ref)


def test_max_pool2d_int8_all_codes_low(device):
    # every code at the dtype's minimum: the padding must not win, nor leave a garbage value
    q = torch.full((1, 4, 5, 5), -128, dtype=torch.int8,
                   device=device).contiguous(memory_format=torch.channels_last)
    y = P.max_pool2d_int8(q, 3, 2, 1)
    assert y.shape == (1, 4, 3, 3) and (y == -128).all()


@pytest.mark.parametrize("shape,cl,dtype,grid", [
    ((2, 17, 7, 7), True, torch.uint8, (0.05, 128, 0, 255)),
    ((2, 33, 5, 3), False, torch.int8, (0.02, 0, -128, 127)),
    ((3, 2, 1, 1), True, torch.uint8, (0.1, 10, 0, 200)),
    ((1, 70, 6, 5), True, torch.uint8, (0.03, 0, 0, 255)),   # relu grid, several HW blocks
])
def test_global_avg_pool2d_int8(device, tk, shape, cl, dtype, grid):
    scale, zp, lo, hi = grid
    q = tk.codes(shape, dtype, device, channels_last=cl)
    out = tk.poisoned((shape[0], shape[1], 1, 1), dtype, device, channels_last=True)
    y = P.global_avg_pool2d_int8(q, scale, zp, lo, hi, out=out)
    assert y is out
    assert torch.equal(y.cpu(), P.global_avg_pool2d_int8_reference(q.cpu(), scale, zp, lo, hi))
    ir = IR.adaptive_avg_pool2d_int8_reference(q.cpu(), [1, 1], _t(scale),
                                               _t(zp, torch.int64), lo, hi)
    diff = (y.cpu().to(torch.int32) - ir.to(torch.int32)).abs()
    assert diff.max().item() <= 1   # one code at float32 rounding ties; equal otherwise
    assert (diff == 0).float().mean().item() > 0.9


def test_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cl = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="padding .* at most half the kernel"):
        P.max_pool2d_int8(cl, 2, 2, 2)
    with pytest.raises(ValueError, match="4-D"):
        P.max_pool2d_int8(cl[0], 2)
    with pytest.raises(ValueError, match="output would be empty"):
        P.max_pool2d_int8(cl, 5, 1, 0)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        P.max_pool2d_int8(cl, (2, 2, 2))
    with pytest.raises(ValueError, match="_qmin <= _qmax"):
        P.global_avg_pool2d_int8(cl, 0.1, 0, 0, 256)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CPU tensors run only in Triton's interpreter"):
        P.max_pool2d_int8(cl, 2)
