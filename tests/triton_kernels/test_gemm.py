"""GEMM kernels (float and int8, fused epilogue) against float64 references."""
import math
import os
import subprocess
import sys

import pytest
import torch

from fxopt.triton_kernels import gemm as G
from fxopt.triton_kernels.epilogue import ACTIVATIONS, act_code, activation_reference

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ACT_ARGS = {"leaky_relu": (0.1,), "hardtanh": (-0.5, 0.7), "clamp": (-math.inf, 0.5),
            "elu": (0.8,)}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("mnk,with_bias,with_res,act", [
    ((1, 17, 127), True, False, "relu"),
    ((127, 33, 17), True, True, "gelu"),
    ((17, 127, 64), False, True, "none"),
])
def test_gemm_float(device, tk, dtype, mnk, with_bias, with_res, act):
    M, N, K = mnk
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=device, dtype=dtype) if with_bias else None
    r = torch.randn(M, N, device=device, dtype=dtype) if with_res else None
    out = tk.poisoned((M, N), dtype, device)
    y = G.linear(x, w, b, r, act=act, out=out)
    assert y is out
    tk.assert_float_close(y, G.linear_reference(x, w, b, r, act=act))


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gemm_activations(device, tk, act):
    M, N, K = 17, 19, 33
    x = torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device) * (3 / K ** 0.5)
    b = torch.randn(N, device=device)
    args = ACT_ARGS.get(act, ())
    out = tk.poisoned((M, N), torch.float32, device)
    G.linear(x, w, b, act=act, act_args=args, out=out)
    tk.assert_float_close(out, G.linear_reference(x, w, b, act=act, act_args=args))


def test_gemm_clamp_open_above_and_leading_dims(device, tk):
    x = torch.randn(2, 3, 20, device=device)
    w = torch.randn(7, 20, device=device)
    y = G.linear(x, w, act="clamp", act_args=(-0.3, math.inf))
    assert y.shape == (2, 3, 7)
    tk.assert_float_close(y, G.linear_reference(x, w, act="clamp", act_args=(-0.3, math.inf)))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_gemm_fp32_in_half_out(device, tk, out_dtype):
    x, w = torch.randn(17, 40, device=device), torch.randn(9, 40, device=device)
    y = G.linear(x, w, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    tk.assert_float_close(y, G.linear_reference(x, w))


@pytest.mark.parametrize("a_dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("mnk", [(1, 17, 127), (33, 40, 300)])
def test_gemm_int8_accumulation_is_exact(device, tk, a_dtype, mnk):
    M, N, K = mnk
    a = tk.codes((M, K), a_dtype, device)
    w = tk.weight_codes((N, K), device)
    zp = 131 if a_dtype == torch.uint8 else -5
    out = tk.poisoned((M, N), torch.float32, device)
    G.linear_int8(a, w, torch.ones(N, device=device), a_scale=1.0, a_zp=zp, out=out)
    ref = (a.double() - zp) @ w.double().T          # |acc| < 2**24: exact in float32 too
    assert torch.equal(out.double(), ref)


@pytest.mark.parametrize("a_dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("out_dtype,act,with_res", [
    (torch.float32, "silu", True), (torch.float16, "relu", False), (torch.bfloat16, "none", True),
    (torch.uint8, "relu", False), (torch.int8, "hardswish", True), (torch.uint8, "none", True),
])
def test_gemm_int8_epilogue(device, tk, a_dtype, out_dtype, act, with_res):
    M, N, K = 127, 33, 70
    a = tk.codes((M, K), a_dtype, device)
    w = tk.weight_codes((N, K), device)
    w_scale = torch.rand(N, device=device) * 0.01 + 0.001
    a_scale, a_zp = 0.02, (128 if a_dtype == torch.uint8 else 3)
    b = torch.randn(N, device=device)
    r = torch.randn(M, N, device=device) if with_res else None
    kw = dict(a_scale=a_scale, a_zp=a_zp, act=act)
    if out_dtype in (torch.uint8, torch.int8):
        yf = G.linear_int8_reference(a, w, w_scale, b, r, **kw)
        y_scale, y_zp = tk.grid_for(yf, out_dtype)
        kw.update(y_scale=y_scale, y_zp=y_zp)
    out = tk.poisoned((M, N), out_dtype, device)
    G.linear_int8(a, w, w_scale, b, r, out_dtype=out_dtype, w_colsum=G.weight_colsum(w), out=out,
                  **kw)
    ref = G.linear_int8_reference(a, w, w_scale, b, r, out_dtype=out_dtype, **kw)
    if out_dtype in (torch.uint8, torch.int8):
        tk.assert_codes_close(out, ref)
        # and against the float32 reference the kernel mirrors: one step at most too
        tk.assert_codes_close(out, G.linear_int8_reference(a, w, w_scale, b, r,
                                                         out_dtype=out_dtype,
                                                         compute_dtype=torch.float32, **kw))
    else:
        tk.assert_float_close(out, ref)


def test_gemm_int8_narrow_output_range(device, tk):
    a = tk.codes((17, 20), torch.uint8, device)
    w = tk.weight_codes((5, 20), device)
    ws = torch.full((5,), 0.01, device=device)
    kw = dict(a_scale=0.05, a_zp=100, out_dtype=torch.uint8, y_scale=0.02, y_zp=10, y_qmin=5,
              y_qmax=120)
    y = G.linear_int8(a, w, ws, **kw)
    assert int(y.min()) >= 5 and int(y.max()) <= 120
    tk.assert_codes_close(y, G.linear_int8_reference(a, w, ws, **kw))


def test_activation_names_match_fxopt():
    from fxopt.ir.activations import ACTIVATIONS as FX
    from fxopt.ir.activations import apply_activation
    assert ({k: r.arity for k, r in ACTIVATIONS.items()}
            == {k: len(r.params) for k, r in FX.items()})
    y = torch.randn(1000, dtype=torch.float64) * 4
    for act in ACTIVATIONS:
        args = ACT_ARGS.get(act, ())
        assert torch.allclose(activation_reference(y, act, args),
                              apply_activation(y.clone(), act, args))


def test_activation_table_codes_and_checks():
    """One code per row, 0 (none) to the last, which apply_act branches on; act_code and
    activation_reference read the same rows and check the name and the argument count."""
    assert sorted(r.code for r in ACTIVATIONS.values()) == list(range(len(ACTIVATIONS)))
    assert ACTIVATIONS["none"].code == 0
    assert act_code("leaky_relu", [0.1]) == (ACTIVATIONS["leaky_relu"].code, 0.1, 0.0)
    assert act_code("hardtanh", (-1, 2)) == (ACTIVATIONS["hardtanh"].code, -1.0, 2.0)
    with pytest.raises(ValueError, match="takes 1 argument"):
        act_code("elu", [])
    for bad in ("swish", None):
        with pytest.raises(ValueError, match="unknown activation"):
            act_code(bad)
        with pytest.raises(ValueError, match="unknown activation"):
            activation_reference(torch.zeros(2), bad)


# -- clear errors ------------------------------------------------------------------------------
@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_gemm_errors(interp):
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match="linear: x must be float16"):
        G.linear(x.to(torch.int8), w)
    with pytest.raises(TypeError, match="same dtype"):
        G.linear(x, w.half())
    with pytest.raises(ValueError, match=r"weight must have shape \[N, K\] with K=8"):
        G.linear(x, torch.randn(3, 7))
    with pytest.raises(ValueError, match="K contiguous"):
        G.linear(x, torch.randn(8, 3).T)
    with pytest.raises(ValueError, match=r"bias must have shape \[3\]"):
        G.linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="residual shape"):
        G.linear(x, w, None, torch.randn(4, 4))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        G.linear(x, w, act="swish")
    with pytest.raises(ValueError, match="'leaky_relu' takes 1 argument"):
        G.linear(x, w, act="leaky_relu")
    with pytest.raises(ValueError, match="needs y_scale"):
        G.linear(x, w, out_dtype=torch.uint8)
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor of shape"):
        G.linear(x, w, out=torch.empty(4, 4))


def test_gemm_int8_errors(interp):
    a, w, ws = (torch.zeros(4, 8, dtype=torch.uint8), torch.ones(3, 8, dtype=torch.int8),
                torch.ones(3))
    with pytest.raises(TypeError, match="uint8 or int8 codes"):
        G.linear_int8(a.float(), w, ws, a_scale=1.0)
    with pytest.raises(TypeError, match="weight must be torch.int8"):
        G.linear_int8(a, w.to(torch.uint8), ws, a_scale=1.0)
    with pytest.raises(ValueError, match="w_scale must have 3 elements"):
        G.linear_int8(a, w, torch.ones(2), a_scale=1.0)
    with pytest.raises(ValueError, match="a_zp=300 is outside"):
        G.linear_int8(a, w, ws, a_scale=1.0, a_zp=300)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        G.linear_int8(a, w, ws, a_scale=1.0, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"y_qmin <= y_qmax"):
        G.linear_int8(a, w, ws, a_scale=1.0, out_dtype=torch.int8, y_scale=0.1, y_qmin=0,
                      y_qmax=200)
    # an infinite y_scale would requantize every code to the zero point
    with pytest.raises(ValueError, match="y_scale must be positive and finite"):
        G.linear_int8(a, w, ws, a_scale=1.0, out_dtype=torch.int8, y_scale=float("inf"))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        G.linear(torch.randn(4, 8), torch.randn(3, 8))


def test_interpreter_switch_set_before_import():
    """TRITON_INTERPRET set before triton and the package are imported (the tests above set it
    after): kernels still run. Needs a fresh interpreter, hence the subprocess."""
    code = ("import torch, fxopt.triton_kernels as tk\n"
            "x, w = torch.randn(5, 9), torch.randn(4, 9)\n"
            "assert tk.interpreting()\n"
            "assert torch.allclose(tk.linear(x, w, act='relu'), torch.relu(x @ w.T), atol=1e-5)\n"
            "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
