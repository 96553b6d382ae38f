"""The float ``add`` and ``mul`` against a float64 reference; add_int8 against fxopt's int8 IR
reference (the pools: ``test_pool.py``).

``add`` and ``mul`` (fp32/fp16/bf16; one kernel, the op a constexpr): within the dtype's
tolerance of the float64 sum or product, and equal to PyTorch's ``a + b`` / ``a * b`` (then
relu) bit for bit, except bf16 under the interpreter, whose float32 -> bfloat16 conversion
truncates (compiled kernels round to nearest even). ``mul`` as a squeeze-excitation gate:
``x * gate``, gate ``[N, C, 1, 1]`` read in place, NHWC or NCHW, with tails.

Exactness: ``add_int8`` with the piecewise-linear activations (none, relu, relu6, leaky_relu,
hardtanh) equals the reference code for code (same float32 operations). Smooth activations
(gelu, silu, ...) go through the kernels' own formulas: within one code.
"""
import math
import operator

import pytest
import torch

from fxopt.ops import int8 as IR
from fxopt.triton_kernels import elementwise as E
from fxopt.triton_kernels._runtime import same_layout
from fxopt.triton_kernels.epilogue import ACTIVATIONS


def _t(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def _ir_add(a, sa, za, b, sb, zb, sy, zy, act="none", act_args=(), qmin=0, qmax=255):
    return IR.add_int8_reference(a.cpu(), _t(sa), _t(za, torch.int64), b.cpu(), _t(sb),
                                 _t(zb, torch.int64), _t(sy), _t(zy, torch.int64), act=act,
                                 act_args=act_args, y_qmin=qmin, y_qmax=qmax)


# shape, channels_last: 1, 17, 127 elements, a multi-block non-multiple of the block, NHWC, NCHW
SHAPES = [((1,), False), ((17,), False), ((127,), False), ((1001,), False),
          ((2, 17, 5, 7), True), ((2, 17, 5, 7), False), ((1, 3, 1, 1), True)]


# -- float add and mul ----------------------------------------------------------------------------
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# op -> (the launcher, the kernel's math in PyTorch, PyTorch's own op)
BINARY = {"add": (E.add, E.add_reference, operator.add),
          "mul": (E.mul, E.mul_reference, operator.mul)}


def _floats(shape, dtype, device, channels_last=False):
    t = torch.randn(shape, device=device).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _exact(dtype, device) -> bool:
    """Whether the kernel rounds as PyTorch does (bf16 under the interpreter truncates)."""
    return dtype != torch.bfloat16 or device.type == "cuda"


def _f64(t):
    return t.cpu().double()


@pytest.mark.parametrize("shape,cl", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("op", BINARY)
def test_float_binary(device, tk, op, shape, cl, dtype, act):
    launch, reference, torch_op = BINARY[op]
    a, b = _floats(shape, dtype, device, cl), _floats(shape, dtype, device, cl)
    out = tk.poisoned(shape, dtype, device, channels_last=cl)
    y = launch(a, b, act=act, out=out)
    assert y is out and y.dtype == dtype
    tk.assert_float_close(y.cpu(), reference(_f64(a), _f64(b), act=act), dtype)
    if _exact(dtype, device):
        assert torch.equal(y, reference(a, b, act=act))
        assert torch.equal(y, torch.relu(torch_op(a, b)) if act == "relu" else torch_op(a, b))


@pytest.mark.parametrize("a_shape,b_shape,a_cl,b_cl", [
    ((2, 17, 5, 7), (17, 1, 1), True, False),      # a per-channel term, NHWC a
    ((2, 17, 5, 7), (1, 17, 1, 1), False, False),
    ((2, 17, 5, 7), (2, 1, 5, 7), True, False),    # broadcast over the channels
    ((2, 17, 5, 7), (), True, False),              # a 0-d tensor
    ((2, 17, 5, 7), (2, 17, 5, 7), True, False),   # one shape, two layouts: b read by strides
    ((2, 17, 5, 7), (2, 17, 5, 7), False, True),
    ((3, 33), (33,), False, False),
    ((2, 3, 4, 5, 6), (3, 1, 5, 1), False, False),  # 5 dims left after merging: b copied
], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", BINARY)
def test_float_binary_broadcast_and_layouts(device, tk, op, a_shape, b_shape, a_cl, b_cl,
                                            dtype):
    launch, reference, torch_op = BINARY[op]
    a = _floats(a_shape, dtype, device, a_cl)
    b = _floats(b_shape, dtype, device, b_cl)
    out = tk.poisoned(a_shape, dtype, device, channels_last=a_cl)
    y = launch(a, b, act="relu", out=out)
    assert y is out and same_layout(a_shape, y.stride(), a.stride())
    tk.assert_float_close(y.cpu(), reference(_f64(a), _f64(b), act="relu"), dtype)
    assert torch.equal(y, torch.relu(torch_op(a, b)))
    # without out=: the output takes a's strides
    assert same_layout(a_shape, launch(a, b).stride(), a.stride())


# a [N, C, H, W] (block tails: 1190, 1960, 24 and 14112 elements against blocks of 256 here)
SE_SHAPES = [(2, 17, 5, 7), (1, 40, 7, 7), (3, 8, 1, 1), (1, 72, 14, 14)]


@pytest.mark.parametrize("shape", SE_SHAPES, ids=str)
@pytest.mark.parametrize("a_cl,gate_cl", [(True, True), (True, False), (False, False)],
                         ids=["nhwc", "nhwc-a", "nchw"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_mul_se_gate(device, tk, shape, a_cl, gate_cl, dtype):
    """``x * gate``: the gate [N, C, 1, 1] (channels-last as a convolution writes it, or not)
    broadcast over H, W and read in place, the output in x's layout."""
    x = _floats(shape, dtype, device, a_cl)
    gate = torch.sigmoid(_floats((shape[0], shape[1], 1, 1), torch.float32, device,
                                 gate_cl)).to(dtype)
    assert E._b_index(x, gate)[0].data_ptr() == gate.data_ptr()  # no copy of the gate
    out = tk.poisoned(shape, dtype, device, channels_last=a_cl)
    y = E.mul(x, gate, out=out)
    assert y is out and same_layout(shape, y.stride(), x.stride())
    tk.assert_float_close(y.cpu(), E.mul_reference(_f64(x), _f64(gate)), dtype)
    if _exact(dtype, device):
        assert torch.equal(y, x * gate)


ACT_ARGS = {"leaky_relu": (0.1,), "hardtanh": (-0.5, 2.0), "clamp": (-math.inf, 1.0),
            "elu": (0.7,)}


@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a not in ("none", "relu")])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("op", BINARY)
def test_float_binary_activations(device, tk, op, act, dtype):
    launch, reference, _ = BINARY[op]
    a, b = _floats((3, 67), dtype, device), _floats((67,), dtype, device)
    args = ACT_ARGS.get(act, ())
    out = tk.poisoned((3, 67), dtype, device)
    y = launch(a, b, act=act, act_args=args, out=out)
    tk.assert_float_close(y.cpu(), reference(_f64(a), _f64(b), act=act, act_args=args), dtype)


def test_mul_errors_name_mul(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="^mul: a must be a float16, bfloat16 or float32 tensor"):
        E.mul(x.long(), x.long())
    with pytest.raises(ValueError, match="^mul: b must broadcast to a's shape"):
        E.mul(x[:, :, :1, :1], x)  # the gate must be b


def test_add_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="a must be a float16, bfloat16 or float32 tensor"):
        E.add(x.long(), x.long())
    with pytest.raises(TypeError, match="b must be a float16, bfloat16 or float32 tensor"):
        E.add(x, x.double())
    with pytest.raises(TypeError, match="one dtype, got torch.float32 and torch.float16"):
        E.add(x, x.half())
    with pytest.raises(ValueError, match="b must broadcast to a's shape"):
        E.add(x[:, :1], x)
    with pytest.raises(ValueError, match="b must broadcast to a's shape"):
        E.add(x, x[..., :3])
    with pytest.raises(ValueError, match="a must be dense"):
        E.add(x[..., ::2], x[..., ::2])
    with pytest.raises(ValueError, match="out must not share memory"):
        E.add(x, x.clone(), out=x)
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor of shape"):
        E.add(x, x, out=torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="unknown activation"):
        E.add(x, x, act="swish2")
    with pytest.raises(ValueError, match="takes 1 argument"):
        E.add(x, x, act="leaky_relu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CPU tensors run only in Triton's interpreter"):
        E.add(x, x)


# -- int8 add --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,cl", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtypes", [(torch.uint8, torch.uint8, torch.uint8),
                                    (torch.uint8, torch.int8, torch.int8)], ids=["u8", "mixed"])
@pytest.mark.parametrize("act", ["none", "relu"])
def test_add_int8_exact(device, tk, shape, cl, dtypes, act):
    da, db, dy = dtypes
    a = tk.codes(shape, da, device, channels_last=cl)
    b = tk.codes(shape, db, device, channels_last=cl)
    za, zb = (131 if da == torch.uint8 else -5), (120 if db == torch.uint8 else 3)
    qmin, qmax = (0, 255) if dy == torch.uint8 else (-128, 127)
    zy = 7 if dy == torch.uint8 else -10
    out = tk.poisoned(shape, dy, device, channels_last=cl)
    y = E.add_int8(a, 0.031, za, b, 0.047, zb, 0.053, zy, act=act, y_qmin=qmin, y_qmax=qmax,
                   out=out)
    assert y is out and same_layout(shape, y.stride(), a.stride())
    ref = _ir_add(a, 0.031, za, b, 0.047, zb, 0.053, zy, act, (), qmin, qmax)
    assert torch.equal(y.cpu(), ref)
    if act == "relu":
        assert y.min().item() >= zy


def test_add_int8_rounds_half_to_even_and_clamps(device):
    # a*0.5 + b*0.25 on a grid of 1.0 hits every .25/.5/.75; halves go to even, clamps hold
    a = torch.arange(0, 256, dtype=torch.uint8, device=device)
    b = torch.arange(255, -1, -1, dtype=torch.uint8, device=device)
    # (values: 0.25 * a - 18.75, so -15.75 .. 48 after the zero point)
    y = E.add_int8(a, 0.5, 100, b, 0.25, 130, 1.0, 3, y_qmin=-10, y_qmax=40,
                   out_dtype=torch.int8)
    ref = _ir_add(a, 0.5, 100, b, 0.25, 130, 1.0, 3, qmin=-10, qmax=40)
    assert torch.equal(y.cpu(), ref)
    assert y.min().item() == -10 and y.max().item() == 40
    # ties at a = 77, 81, 85, 89 (values 0.5, 1.5, 2.5, 3.5): to even, then + 3
    assert [y[i].item() for i in (77, 81, 85, 89)] == [3, 5, 5, 7]


@pytest.mark.parametrize("act,args,exact", [("relu6", (), True), ("leaky_relu", (0.1,), True),
                                            ("hardtanh", (-0.5, 2.0), True),
                                            ("hardswish", (), False), ("silu", (), False),
                                            ("gelu", (), False)])
def test_add_int8_activations(device, tk, act, args, exact):
    a = tk.codes((3, 40), torch.uint8, device)
    b = tk.codes((3, 40), torch.uint8, device)
    y = E.add_int8(a, 0.02, 128, b, 0.03, 128, 0.01, 128, act=act, act_args=args)
    ref = _ir_add(a, 0.02, 128, b, 0.03, 128, 0.01, 128, act, args)
    if exact:
        assert torch.equal(y.cpu(), ref)
    else:
        tk.assert_codes_close(y.cpu(), ref)


def test_add_int8_kernel_reference_equals_ir():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (4, 9, 6, 6), generator=g, dtype=torch.uint8)
    b = torch.randint(-128, 128, (4, 9, 6, 6), generator=g, dtype=torch.int8)
    ours = E.add_int8_reference(a, 0.02, 140, b, 0.05, 0, 0.04, -2, act="relu", y_qmin=-128,
                                y_qmax=127)
    assert ours.dtype == torch.int8
    assert torch.equal(ours, _ir_add(a, 0.02, 140, b, 0.05, 0, 0.04, -2, "relu", (), -128, 127))


def test_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    u = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    cl = u.contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="a must be a uint8 or int8 tensor"):
        E.add_int8(u.float(), 0.1, 0, u, 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="same shape"):
        E.add_int8(u, 0.1, 0, u[:1], 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="same strides"):
        E.add_int8(u, 0.1, 0, cl, 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="dense"):
        E.add_int8(u[..., ::2], 0.1, 0, u[..., ::2], 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="y_scale must be positive"):
        E.add_int8(u, 0.1, 0, u, 0.1, 0, 0.0, 0)
    with pytest.raises(ValueError, match="y_qmin <= y_qmax"):
        E.add_int8(u, 0.1, 0, u, 0.1, 0, 0.1, 0, y_qmin=0, y_qmax=300)
    with pytest.raises(ValueError, match="unknown activation"):
        E.add_int8(u, 0.1, 0, u, 0.1, 0, 0.1, 0, act="swish2")
    with pytest.raises(TypeError, match="a_zp must be an integer"):
        E.add_int8(u, 0.1, 0.5, u, 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="out must be a torch.uint8 tensor"):
        E.add_int8(u, 0.1, 0, u, 0.1, 0, 0.1, 0, out=torch.empty_like(cl))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CPU tensors run only in Triton's interpreter"):
        E.add_int8(u, 0.1, 0, u, 0.1, 0, 0.1, 0)
