"""Implicit-GEMM conv2d (float and int8) and the depthwise kernel against float64 references."""
import pytest
import torch

from fxopt.triton_kernels import conv as C
from fxopt.triton_kernels import depthwise as D

CL = torch.channels_last
FLOATS = [torch.float32, torch.float16, torch.bfloat16]

# (B, C_in, H, W, C_out, (KH, KW), stride, padding, dilation, groups)
CASES = {
    "3x3": (1, 3, 7, 9, 17, (3, 3), 1, 1, 1, 1),
    "1x1": (2, 17, 6, 5, 8, (1, 1), 1, 0, 1, 1),
    "grouped_s2": (1, 8, 9, 9, 12, (3, 3), 2, 1, 1, 4),
    "rect_dil": (1, 6, 10, 8, 6, (3, 1), (1, 2), (2, 0), 2, 1),
    "wide": (2, 33, 5, 5, 33, (3, 3), 1, 1, 1, 1),
}


def _inputs(case, device, dtype):
    B, Ci, H, W, Co, k, s, p, d, g = CASES[case]
    x = torch.randn(B, Ci, H, W, device=device).to(dtype).contiguous(memory_format=CL)
    fan_in = Ci // g * k[0] * k[1]
    w = (torch.randn(Co, Ci // g, *k, device=device) / fan_in ** 0.5).to(dtype)
    return x, w, (s, p, d, g)


def _out_shape(x, w, s, p, d):
    ref = torch.nn.functional.conv2d(x[:, :1].float().contiguous(),
                                     torch.zeros(w.shape[0], 1, *w.shape[2:], device=x.device),
                                     None, s, p, d)
    return (x.shape[0], w.shape[0], ref.shape[2], ref.shape[3])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", list(CASES))
def test_conv2d_float(device, tk, case, dtype):
    x, w, (s, p, d, g) = _inputs(case, device, dtype)
    b = torch.randn(w.shape[0], device=device)
    shape = _out_shape(x, w, s, p, d)
    res = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=CL)
    out = tk.poisoned(shape, dtype, device, channels_last=True)
    y = C.conv2d(x, w, b, s, p, d, g, res, act="silu", out=out)
    assert y is out and y.is_contiguous(memory_format=CL)
    tk.assert_float_close(y, C.conv2d_reference(x, w, b, s, p, d, g, res, act="silu"))


def test_conv2d_default_output_is_channels_last(device, tk):
    x, w, (s, p, d, g) = _inputs("3x3", device, torch.float32)
    y = C.conv2d(x, w, None, s, p, d, g, act="relu")
    assert y.shape == _out_shape(x, w, s, p, d) and y.is_contiguous(memory_format=CL)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None, s, p, d, g)
    tk.assert_float_close(y, torch.relu(ref))


@pytest.mark.parametrize("a_dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("case", list(CASES))
def test_conv2d_int8_accumulation_is_exact(device, tk, case, a_dtype):
    B, Ci, H, W, Co, k, s, p, d, g = CASES[case]
    x = tk.codes((B, Ci, H, W), a_dtype, device, channels_last=True)
    w = tk.weight_codes((Co, Ci // g, *k), device)
    zp = 77 if a_dtype == torch.uint8 else -9
    shape = _out_shape(x, w, s, p, d)
    out = tk.poisoned(shape, torch.float32, device, channels_last=True)
    C.conv2d_int8(x, w, torch.ones(Co, device=device), None, s, p, d, g, a_scale=1.0, a_zp=zp,
                  out=out)
    ref = torch.nn.functional.conv2d(x.double() - zp, w.double(), None, s, p, d, g)
    assert torch.equal(out.double(), ref)


@pytest.mark.parametrize("a_dtype,out_dtype,act,with_res,case", [
    (torch.uint8, torch.uint8, "relu", False, "3x3"),
    (torch.uint8, torch.int8, "none", True, "grouped_s2"),
    (torch.int8, torch.uint8, "relu6", True, "rect_dil"),
    (torch.uint8, torch.float16, "relu", True, "wide"),
    (torch.int8, torch.float32, "gelu", False, "1x1"),
])
def test_conv2d_int8_epilogue(device, tk, a_dtype, out_dtype, act, with_res, case):
    B, Ci, H, W, Co, k, s, p, d, g = CASES[case]
    x = tk.codes((B, Ci, H, W), a_dtype, device, channels_last=True)
    w = tk.weight_codes((Co, Ci // g, *k), device)
    w_scale = torch.rand(Co, device=device) * 0.01 + 0.001
    b = torch.randn(Co, device=device)
    shape = _out_shape(x, w, s, p, d)
    r = torch.randn(shape, device=device).contiguous(memory_format=CL) if with_res else None
    kw = dict(a_scale=0.03, a_zp=(120 if a_dtype == torch.uint8 else 0), act=act)
    if out_dtype in (torch.uint8, torch.int8):
        kw.update(zip(("y_scale", "y_zp"), tk.grid_for(
            C.conv2d_int8_reference(x, w, w_scale, b, s, p, d, g, r, **kw), out_dtype)))
    out = tk.poisoned(shape, out_dtype, device, channels_last=True)
    C.conv2d_int8(x, w, w_scale, b, s, p, d, g, r, out_dtype=out_dtype, out=out, **kw)
    ref = C.conv2d_int8_reference(x, w, w_scale, b, s, p, d, g, r, out_dtype=out_dtype, **kw)
    if out_dtype in (torch.uint8, torch.int8):
        tk.assert_codes_close(out, ref)
    else:
        tk.assert_float_close(out, ref)


# (B, C, H, W, (KH, KW), stride, padding, dilation)
DW_CASES = {
    "3x3": (1, 17, 7, 9, (3, 3), 1, 1, 1),
    "s2_c40": (2, 40, 6, 6, (3, 3), 2, 1, 1),
    "5x5_dil": (1, 8, 9, 7, (5, 5), 1, 2, 2),
    "1ch": (1, 1, 5, 4, (3, 3), 1, 1, 1),
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", list(DW_CASES))
def test_depthwise_float(device, tk, case, dtype):
    B, Cc, H, W, k, s, p, d = DW_CASES[case]
    x = torch.randn(B, Cc, H, W, device=device).to(dtype).contiguous(memory_format=CL)
    w = (torch.randn(Cc, 1, *k, device=device) / (k[0] * k[1]) ** 0.5).to(dtype)
    b = torch.randn(Cc, device=device).to(dtype)
    shape = _out_shape(x, w, s, p, d)
    res = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=CL)
    out = tk.poisoned(shape, dtype, device, channels_last=True)
    D.depthwise_conv2d(x, w, b, s, p, d, res, act="hardswish", out=out)
    tk.assert_float_close(out, D.depthwise_conv2d_reference(x, w, b, s, p, d, res,
                                                            act="hardswish"))


def test_depthwise_prepared_weight(device, tk):
    x = torch.randn(1, 17, 7, 9, device=device).contiguous(memory_format=CL)
    w = torch.randn(17, 1, 3, 3, device=device)
    y = D.depthwise_conv2d(x, D.prepare_depthwise_weight(w), None, 1, 1, kernel_size=3)
    tk.assert_float_close(y, D.depthwise_conv2d_reference(x, w, None, 1, 1))


@pytest.mark.parametrize("a_dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("case", list(DW_CASES))
def test_depthwise_int8(device, tk, case, a_dtype):
    B, Cc, H, W, k, s, p, d = DW_CASES[case]
    x = tk.codes((B, Cc, H, W), a_dtype, device, channels_last=True)
    w = tk.weight_codes((Cc, 1, *k), device)
    zp = 200 if a_dtype == torch.uint8 else -20
    shape = _out_shape(x, w, s, p, d)
    out = tk.poisoned(shape, torch.float32, device, channels_last=True)
    D.depthwise_conv2d_int8(x, w, torch.ones(Cc, device=device), None, s, p, d, a_scale=1.0,
                            a_zp=zp, out=out)
    exact = torch.nn.functional.conv2d(x.double() - zp, w.double(), None, s, p, d, Cc)
    assert torch.equal(out.double(), exact)
    # requantized, with bias, residual and an activation
    w_scale = torch.rand(Cc, device=device) * 0.01 + 0.001
    b = torch.randn(Cc, device=device)
    r = torch.randn(shape, device=device).contiguous(memory_format=CL)
    kw = dict(a_scale=0.05, a_zp=zp, act="relu6")
    yf = D.depthwise_conv2d_int8_reference(x, w, w_scale, b, s, p, d, r, **kw)
    y_scale, y_zp = tk.grid_for(yf, torch.uint8)
    kw.update(y_scale=y_scale, y_zp=y_zp, out_dtype=torch.uint8)
    out = tk.poisoned(shape, torch.uint8, device, channels_last=True)
    D.depthwise_conv2d_int8(x, w, w_scale, b, s, p, d, r, out=out, **kw)
    tk.assert_codes_close(out, D.depthwise_conv2d_int8_reference(x, w, w_scale, b, s, p, d, r,
                                                                 **kw))


# -- clear errors ------------------------------------------------------------------------------
@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_conv_errors(interp):
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=CL)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="must be channels-last"):
        C.conv2d(x.contiguous(), w)
    with pytest.raises(TypeError, match="same dtype"):
        C.conv2d(x, w.half())
    with pytest.raises(ValueError, match="weight has 2 input channels per group"):
        C.conv2d(x, torch.randn(6, 2, 3, 3))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        C.conv2d(x, torch.randn(6, 1, 3, 3), groups=3)
    with pytest.raises(ValueError, match="output would be empty"):
        C.conv2d(x, torch.randn(6, 4, 7, 7))
    with pytest.raises(ValueError, match="residual must be channels-last"):
        C.conv2d(x, w, None, 1, 1, residual=torch.randn(1, 6, 5, 5))
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        C.conv2d(x, w, stride=(1, 1, 1))
    with pytest.raises(TypeError, match="x must be torch.uint8, torch.int8"):
        C.conv2d_int8(x, w.to(torch.int8), torch.ones(6), a_scale=1.0)
    xq = torch.zeros(1, 4, 5, 5, dtype=torch.uint8).contiguous(memory_format=CL)
    with pytest.raises(TypeError, match="weight must be a torch.int8 tensor"):
        C.conv2d_int8(xq, w, torch.ones(6), a_scale=1.0)


def test_depthwise_errors(interp):
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match=r"depthwise weight has shape \[C, 1, KH, KW\] with C=4"):
        D.depthwise_conv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="needs kernel_size"):
        D.depthwise_conv2d(x, torch.randn(9, 4))
    with pytest.raises(ValueError, match="must be channels-last"):
        D.depthwise_conv2d(x.contiguous(), torch.randn(4, 1, 3, 3))
    xq = torch.zeros(1, 4, 5, 5, dtype=torch.int8).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="w_scale must be a float tensor with 4 elements"):
        D.depthwise_conv2d_int8(xq, torch.ones(4, 1, 3, 3, dtype=torch.int8), torch.ones(3),
                                a_scale=1.0)
