"""quantize / dequantize kernels: PyTorch's arithmetic, bit for bit."""
import warnings

import pytest
import torch

from fxopt.triton_kernels import quant as Q


@pytest.mark.parametrize("qdtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,channels_last",
                         [((1,), False), ((17,), False), ((3, 5, 7, 9), True)])
def test_quantize_matches_pytorch(device, tk, qdtype, xdtype, shape, channels_last):
    x = (torch.randn(shape, device=device) * 4).to(xdtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale, zp = 0.037, (120 if qdtype == torch.uint8 else -3)
    out = tk.poisoned(shape, qdtype, device, channels_last=channels_last)
    q = Q.quantize(x, scale, zp, qdtype, out=out)
    lo, hi = (0, 255) if qdtype == torch.uint8 else (-128, 127)
    assert torch.equal(q, Q.quantize_reference(x, scale, zp, lo, hi, qdtype))
    assert q.stride() == x.stride()
    # and torch's own quantizer agrees
    with warnings.catch_warnings():   # quantized tensors are deprecated in recent torch
        warnings.simplefilter("ignore")
        tq = torch.quantize_per_tensor(x.float().cpu(), scale, zp,
                                       torch.quint8 if qdtype == torch.uint8 else torch.qint8)
    assert torch.equal(q.cpu(), tq.int_repr())


def test_quantize_rounds_half_to_even_and_clamps(device):
    x = torch.arange(-40, 41, device=device, dtype=torch.float32) * 0.25   # x / 0.5: every half
    q = Q.quantize(x, 0.5, 3, torch.int8, qmin=-10, qmax=12)
    expect = (torch.round(x * 2) + 3).clamp(-10, 12).to(torch.int8)
    assert torch.equal(q, expect)


@pytest.mark.parametrize("qdtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("shape", [(1,), (127,), (2, 3, 17)])
def test_dequantize(device, tk, qdtype, shape):
    q = tk.codes(shape, qdtype, device)
    out = tk.poisoned(shape, torch.float32, device)
    x = Q.dequantize(q, 0.021, 9, out=out)
    assert torch.equal(x, Q.dequantize_reference(q, 0.021, 9))
    h = Q.dequantize(q, 0.021, 9, out_dtype=torch.float16)
    tk.assert_float_close(h, Q.dequantize_reference(q, 0.021, 9).double())


def test_quant_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="x must be a float16/bfloat16/float32 tensor"):
        Q.quantize(torch.ones(3, dtype=torch.int32), 0.1, 0)
    with pytest.raises(TypeError, match="dtype must be torch.uint8 or torch.int8"):
        Q.quantize(torch.ones(3), 0.1, 0, torch.int32)
    with pytest.raises(ValueError, match="scale must be positive"):
        Q.quantize(torch.ones(3), 0.0, 0)
    with pytest.raises(ValueError, match="must be contiguous or channels-last"):
        Q.quantize(torch.ones(4, 6)[:, ::2], 0.1, 0)
    with pytest.raises(TypeError, match="q must be a uint8 or int8 tensor"):
        Q.dequantize(torch.ones(3), 0.1, 0)
    with pytest.raises(TypeError, match="zero_point must be an integer"):
        Q.quantize(torch.ones(3), 0.1, 0.5)
