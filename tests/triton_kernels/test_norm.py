"""``add_layer_norm`` against ``F.layer_norm(x + r)``: the sum and the normalized value, float32
and fp16/bf16, odd and non-power-of-2 widths (masked tails), with and without the affine
parameters, a broadcast residual, and the launcher's refusals.

The sum is PyTorch's ``x + r`` bit for bit (float32 sum rounded once; bf16 under the interpreter
truncates, so only within tolerance there). The normalized value is within the dtype's tolerance
of the float64 LayerNorm of the rounded sum (the reference's ``n`` rows, float64).
"""
import pytest
import torch
import torch.nn.functional as F

from fxopt.triton_kernels import norm as N

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# (shape, normalized size): one element, odd rows, non-power-of-2 widths, ViT's 197 x 192 rows
SHAPES = [((1, 1), 1), ((3, 17), 17), ((2, 5, 33), 33), ((7, 100), 100), ((1, 197, 192), 192),
          ((2, 3, 6, 5), 30)]


def _f64(t):
    return None if t is None else t.cpu().double()


# every shape in every dtype with weight and bias; without bias, without either, in float32
CASES = [(shape, n, dtype, "both") for shape, n in SHAPES for dtype in FLOATS] + [
    (shape, n, torch.float32, affine) for shape, n in SHAPES[1:3] for affine in ("weight", "none")]


@pytest.mark.parametrize("shape,n,dtype,affine", CASES, ids=str)
def test_add_layer_norm(device, tk, shape, n, dtype, affine):
    x = torch.randn(shape, device=device).to(dtype)
    r = torch.randn(shape, device=device).to(dtype)
    w = (torch.rand(n, device=device) + 0.5).to(dtype) if affine != "none" else None
    b = torch.randn(n, device=device).to(dtype) if affine == "both" else None
    s, y = N.add_layer_norm(x, r, w, b, eps=1e-6, n=n)
    assert s.shape == y.shape == x.shape and s.dtype == y.dtype == dtype
    if dtype != torch.bfloat16 or device.type == "cuda":
        assert torch.equal(s, x + r)
    s_ref = (x + r).cpu().double()
    _, y_ref = N.add_layer_norm_reference(s_ref, torch.zeros_like(s_ref), _f64(w), _f64(b),
                                          eps=1e-6, n=n)
    tk.assert_float_close(s.cpu(), _f64(x) + _f64(r), dtype)
    tk.assert_float_close(y.cpu(), y_ref, dtype)
    # and PyTorch's own LayerNorm of the sum PyTorch computes
    norm_shape = shape[-1:] if n == shape[-1] else shape[-2:]
    eager = F.layer_norm((x + r).float(), norm_shape, _f(w, norm_shape), _f(b, norm_shape), 1e-6)
    tk.assert_float_close(y.cpu().double(), eager.cpu().double(), dtype)


def _f(t, shape):
    return None if t is None else t.float().reshape(shape)


def test_broadcast_residual(device, tk):
    """A position embedding ``[1, S, D]`` added to a batch ``[B, S, D]``: expanded, not refused."""
    x = torch.randn(3, 5, 40, device=device)
    pos = torch.randn(1, 5, 40, device=device)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    s, y = N.add_layer_norm(pos, x, w, b, eps=1e-5)
    assert torch.equal(s, pos + x)
    tk.assert_float_close(y.cpu(), F.layer_norm(_f64(pos + x), (40,), _f64(w), _f64(b), 1e-5))


def test_refusals(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(TypeError, match="one dtype"):
        N.add_layer_norm(x, x.half())
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        N.add_layer_norm(x.double(), x.double())
    with pytest.raises(ValueError, match="do not broadcast"):
        N.add_layer_norm(x, torch.randn(3, 8, device=device))
    with pytest.raises(ValueError, match="weight must be"):
        N.add_layer_norm(x, x, torch.randn(7, device=device))
    with pytest.raises(ValueError, match="normalized size"):
        N.add_layer_norm(torch.randn(1, N.MAX_N + 1, device=device),
                         torch.randn(1, N.MAX_N + 1, device=device))
