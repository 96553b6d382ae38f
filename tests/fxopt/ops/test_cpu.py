"""The ops the CPU int8 lowering writes (``fxopt.ops.cpu``): oneDNN's int8 layers
(fxopt.onednn_conv2d_int8 / onednn_linear_int8, also on fbgemm and with a fused residual) and
the IR ops' CPU twins against the int8 IR's exact reference, on random codes, grids and
weights: within one code (a float epilogue may round a tie the other way), and equal where a
kernel refuses (the reference runs); their fakes agree with them (opcheck)."""
from __future__ import annotations

import pytest
import torch

from fxopt.ir.activations import ACTIVATIONS
from fxopt.ops import onednn
from fxopt.ops.cpu import (CPU_ADAPTIVE_AVG_POOL2D_INT8, CPU_ADD_INT8, CPU_AVG_POOL2D_INT8,
                           CPU_BATCH_NORM2D_INT8, CPU_CAT_INT8, CPU_DEQUANTIZE,
                           CPU_MAX_POOL2D_INT8, CPU_MUL_INT8, CPU_OF, CPU_QUANTIZE,
                           CPU_UPSAMPLE_NEAREST2D_INT8, ONEDNN_CONV2D_INT8, ONEDNN_LINEAR_INT8)
from fxopt.ops.isa import SATURATION_FREE_WEIGHT, int8_pairs_saturate
from fxopt.ops.schema import OPS

pytestmark = pytest.mark.skipif(not onednn.onednn_int8_available(),
                                reason="oneDNN's int8 kernels are not available in this build")

CONV_ACTS = sorted(k for k, r in ACTIVATIONS.items() if "conv2d" in r.onednn_int8)
LINEAR_ACTS = sorted(k for k, r in ACTIVATIONS.items() if "linear" in r.onednn_int8)


# Weight codes the kernels sum exactly with any input code on this CPU: full range with int32
# dot products (VNNI, AMX), [-64, 64] where u8 x s8 pairs add in int16 (fxopt.ops.isa), so the
# tests below see the kernels run; test_wide_weights_... covers the other weights there.
W_MAX = SATURATION_FREE_WEIGHT if int8_pairs_saturate() else 127


def _weights(shape, seed, w_max=None):
    w_max = W_MAX if w_max is None else w_max
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.1
    scale = w.flatten(1).abs().amax(1) / w_max
    w_q = torch.round(w / scale.reshape(-1, *[1] * (w.dim() - 1))).clamp(-w_max, w_max)
    return w_q.to(torch.int8), scale, torch.randn(shape[0], generator=g)


def _codes(shape, seed):
    return torch.randint(0, 256, shape, dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act", CONV_ACTS)
@pytest.mark.parametrize("groups,stride", [(1, 1), (1, 2), (8, 1)])
def test_conv_within_one_code_of_the_reference(act, groups, stride):
    q = _codes((2, 8, 9, 9), 1).contiguous(memory_format=torch.channels_last)
    w_q, w_s, b = _weights((16, 8 // groups, 3, 3), 2)
    args = (q, w_q, w_s, b, [stride] * 2, [1, 1], [1, 1], groups, 0.04, 120, 0.03, 90)
    y = torch.ops.fxopt.onednn_conv2d_int8(*args, act=act)
    ref = ONEDNN_CONV2D_INT8.reference(*args, act=act)
    assert y.dtype == ref.dtype == torch.uint8 and y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    diff = (y.int() - ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


@pytest.mark.parametrize("cin", [24, 40, 104])
@pytest.mark.parametrize("batch", [2, 8])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_a_strided_1x1_conv_on_a_batch_is_right_on_two_threads(cin, batch, layout):
    """PyTorch's onednn::qconv2d_pointwise computes a 1x1 stride-2 conv wrongly on several
    threads for a batch of two or more where the input channels are not a multiple of 16
    (torch 2.14.1, AVX2 EPYC: up to 169 codes off; a RegNet's downsampling shortcut). fxopt runs
    it as the stride-1 conv of the strided subsample. On two threads: the op and its bound call
    within one code of the reference, and the fused-residual form equal to itself on one
    thread (exact there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q = _codes((batch, cin, 28, 28), cin)
        if layout == "channels_last":
            q = q.contiguous(memory_format=torch.channels_last)
        w_q, w_s, b = _weights((64, cin, 1, 1), 5)
        args = (q, w_q, w_s, b, [2, 2], [0, 0], [1, 1], 1, 0.0102, 0, 0.0183, 106)
        ref = ONEDNN_CONV2D_INT8.reference(*args)
        y = torch.ops.fxopt.onednn_conv2d_int8(*args)
        assert int((y.int() - ref.int()).abs().max()) <= 1
        call = ONEDNN_CONV2D_INT8.cpu_bind(*args)
        assert call is not None and torch.equal(call(q), y)
        residual = _codes((batch, 64, 14, 14), 6).contiguous(memory_format=torch.channels_last)
        fused = [onednn.conv2d_int8_onednn(*args, ("none", [], ""), residual, (0.02, 100))]
        torch.set_num_threads(1)
        fused.append(onednn.conv2d_int8_onednn(*args, ("none", [], ""), residual, (0.02, 100)))
        assert fused[0] is not None and torch.equal(fused[0], fused[1])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("act", LINEAR_ACTS)
def test_linear_within_one_code_of_the_reference(act):
    q = _codes((3, 5, 24), 3)
    w_q, w_s, b = _weights((12, 24), 4)
    act_args = [0.1] if act == "leaky_relu" else []
    args = (q, w_q, w_s, b, 0.05, 128, 0.02, 100)
    y = torch.ops.fxopt.onednn_linear_int8(*args, act=act, act_args=act_args)
    ref = ONEDNN_LINEAR_INT8.reference(*args, act=act, act_args=act_args)
    assert y.shape == (3, 5, 12) and y.dtype == torch.uint8
    assert int((y.int() - ref.int()).abs().max()) <= 1


def _act_args(act):
    return {"leaky_relu": [0.1], "hardtanh": [-0.5, 2.0], "clamp": [-1.0, 3.0],
            "elu": [1.0]}.get(act, [])


# the activations oneDNN fuses no int8 post-op for (relu6/hardtanh/clamp are its hardtanh; a
# convolution's hardsigmoid is too, on scaled scales and bias: below)
EPILOGUE_ACTS = sorted(k for k in ACTIVATIONS
                       if onednn.int8_post_op("conv2d", k, _act_args(k)) is None
                       and k != "hardsigmoid")
LINEAR_EPILOGUE_ACTS = sorted(k for k in ACTIVATIONS
                              if onednn.int8_post_op("linear", k, _act_args(k)) is None)


@pytest.mark.parametrize("act", EPILOGUE_ACTS)
def test_an_activation_onednn_lacks_runs_on_its_float_output(act, monkeypatch):
    """Every activation with no oneDNN post-op (sigmoid, hardsigmoid, GELU, tanh, ...) runs on
    the int8 kernel's float32 output, then the requantize: within one code of the reference,
    and not the reference itself (the kernel's float path is what ran)."""
    q = _codes((2, 8, 9, 9), 5).contiguous(memory_format=torch.channels_last)
    w_q, w_s, b = _weights((16, 8, 3, 3), 6)
    args = (q, w_q, w_s, b, [1, 1], [1, 1], [1, 1], 1, 0.05, 128, 0.02, 100)
    y = torch.ops.fxopt.onednn_conv2d_int8(*args, act=act, act_args=_act_args(act))
    ref = ONEDNN_CONV2D_INT8.reference(*args, act=act, act_args=_act_args(act))
    assert y.dtype == torch.uint8 and y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    diff = (y.int() - ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    calls = []
    real = onednn.conv2d_int8_onednn
    monkeypatch.setattr(onednn, "conv2d_int8_onednn",
                        lambda *a: calls.append(a[12]) or real(*a))
    torch.ops.fxopt.onednn_conv2d_int8(*args, act=act, act_args=_act_args(act))
    assert calls == [None]  # no post-op: the float32 output


def test_a_conv_hardsigmoid_gate_is_one_kernel_call_with_a_hardtanh_post_op(monkeypatch):
    """hardsigmoid(v) = clip(v / 6 + 1/2, 0, 1): the convolution runs with its weight scales
    and bias scaled and oneDNN's hardtanh(0, 1) as the post-op, straight onto the y grid (no
    float output, no separate activation and quantize): within one code of the reference."""
    q = _codes((2, 8, 9, 9), 5).contiguous(memory_format=torch.channels_last)
    w_q, w_s, b = _weights((16, 8, 3, 3), 6)
    calls = []
    real = onednn.conv2d_int8_call
    monkeypatch.setattr(onednn, "conv2d_int8_call",
                        lambda *a: calls.append(a[12:]) or real(*a))
    for bias in (b, None):
        args = (q, w_q, w_s, bias, [1, 1], [1, 1], [1, 1], 1, 0.05, 128, 1 / 255, 0)
        y = torch.ops.fxopt.onednn_conv2d_int8(*args, act="hardsigmoid")
        ref = ONEDNN_CONV2D_INT8.reference(*args, act="hardsigmoid")
        assert y.dtype == torch.uint8 and y.is_contiguous(memory_format=torch.channels_last)
        diff = (y.int() - ref.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
        # both ends of the clip are reached, and the slope between them
        assert int(ref.min()) == 0 and int(ref.max()) == 255 and ((ref > 0) & (ref < 255)).any()
    assert calls == [(("hardtanh", [0.0, 1.0], ""), (1 / 6, 0.5))] * 2
    assert torch.equal(w_s, _weights((16, 8, 3, 3), 6)[1])  # the caller's scales untouched


@pytest.mark.parametrize("act", LINEAR_EPILOGUE_ACTS)
def test_linear_activation_onednn_lacks_runs_on_its_float_output(act):
    q = _codes((3, 5, 24), 3)
    w_q, w_s, b = _weights((12, 24), 4)
    args = (q, w_q, w_s, b, 0.05, 128, 0.02, 100)
    y = torch.ops.fxopt.onednn_linear_int8(*args, act=act, act_args=_act_args(act))
    ref = ONEDNN_LINEAR_INT8.reference(*args, act=act, act_args=_act_args(act))
    assert y.shape == (3, 5, 12) and y.dtype == torch.uint8
    assert int((y.int() - ref.int()).abs().max()) <= 1


def test_weights_packed_once_and_again_after_an_update():
    q = _codes((1, 8, 5, 5), 7)
    w_q, w_s, b = _weights((8, 8, 3, 3), 8)
    args = (q, w_q, w_s, b, [1, 1], [1, 1], [1, 1], 1, 0.05, 128, 0.02, 100)
    first = torch.ops.fxopt.onednn_conv2d_int8(*args, act="hardswish")
    assert torch.equal(torch.ops.fxopt.onednn_conv2d_int8(*args, act="hardswish"), first)
    w_q.neg_()  # in place: the cached packing is stale and must not be used
    again = torch.ops.fxopt.onednn_conv2d_int8(*args, act="hardswish")
    ref = ONEDNN_CONV2D_INT8.reference(*args, act="hardswish")
    assert int((again.int() - ref.int()).abs().max()) <= 1 and not torch.equal(again, first)


def test_fake_and_opcheck():
    q = _codes((2, 8, 7, 7), 9).contiguous(memory_format=torch.channels_last)
    w_q, w_s, b = _weights((4, 8, 3, 3), 10)
    args = (q, w_q, w_s, b, [2, 2], [1, 1], [1, 1], 1, 0.05, 128, 0.02, 100)
    torch.library.opcheck(ONEDNN_CONV2D_INT8.overload, args, {"act": "silu"})
    lw_q, lw_s, lb = _weights((6, 8), 11)
    torch.library.opcheck(ONEDNN_LINEAR_INT8.overload,
                          (_codes((3, 8), 12), lw_q, lw_s, lb, 0.05, 128, 0.02, 100),
                          {"act": "gelu"})


# -- what the lowering writes besides: every activation, fbgemm, a fused residual, the twins -----
@pytest.mark.parametrize("act", ["none", "relu", "relu6", "hardtanh"])
@pytest.mark.parametrize("engine", ["onednn", "fbgemm"])
def test_conv_and_linear_on_either_engine_within_one_code(act, engine):
    """The activations PyTorch's quantized kernels have too (fused or a clamp of the codes),
    on oneDNN's kernel or fbgemm's (packed once per weight, run on a view of the codes)."""
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"no {engine} here")
    act_args = [-0.5, 2.0] if act == "hardtanh" else []
    q = _codes((2, 8, 9, 9), 13).contiguous(memory_format=torch.channels_last)
    w_q, w_s, b = _weights((16, 8, 3, 3), 14)
    args = (q, w_q, w_s, b, [1, 1], [1, 1], [1, 1], 1, 0.04, 120, 0.03, 90)
    y = torch.ops.fxopt.onednn_conv2d_int8(*args, act=act, act_args=act_args, engine=engine)
    ref = ONEDNN_CONV2D_INT8.reference(*args, act=act, act_args=act_args)
    assert y.dtype == torch.uint8 and y.is_contiguous(memory_format=torch.channels_last)
    assert int((y.int() - ref.int()).abs().max()) <= 1
    lq, (lw, ls, lb) = _codes((3, 24), 15), _weights((12, 24), 16)
    largs = (lq, lw, ls, lb, 0.05, 128, 0.02, 100)
    y = torch.ops.fxopt.onednn_linear_int8(*largs, act=act, act_args=act_args, engine=engine)
    ref = ONEDNN_LINEAR_INT8.reference(*largs, act=act, act_args=act_args)
    assert int((y.int() - ref.int()).abs().max()) <= 1


@pytest.mark.parametrize("act", ["none", "relu"])
def test_residual_sum_post_op_within_one_code_and_leaves_the_residual(act):
    """A residual (codes on its own grid) added before the activation, oneDNN's sum post-op:
    within one code of the reference (the float sum, rounded once), the caller's residual
    codes untouched (the kernel writes into a copy)."""
    q = _codes((2, 8, 9, 9), 17).contiguous(memory_format=torch.channels_last)
    r = _codes((2, 16, 9, 9), 18).contiguous(memory_format=torch.channels_last)
    before = r.clone()
    w_q, w_s, b = _weights((16, 8, 3, 3), 19)
    args = (q, w_q, w_s, b, [1, 1], [1, 1], [1, 1], 1, 0.04, 120, 0.05, 30, r, 0.03, 128)
    y = torch.ops.fxopt.onednn_conv2d_int8(*args, act=act)
    ref = ONEDNN_CONV2D_INT8.reference(*args, act=act)
    assert torch.equal(r, before) and y.shape == r.shape
    diff = (y.int() - ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    torch.library.opcheck(ONEDNN_CONV2D_INT8.overload, args, {"act": act})


def _t(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


S, Z, SY, ZY = _t(0.05), _t(120, torch.int64), _t(0.07), _t(100, torch.int64)
_X = _codes((2, 8, 6, 6), 20).contiguous(memory_format=torch.channels_last)
_G = _codes((2, 8, 1, 1), 21)
TWINS = {  # op -> (args, kwargs): a case of each on uint8 codes
    CPU_QUANTIZE: ((torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last) * 3,
                    S, Z, 0, 255), {}),
    CPU_DEQUANTIZE: ((_X, S, Z), {}),
    CPU_ADD_INT8: ((_X, S, Z, _X.flip(0), _t(0.04), _t(3, torch.int64), SY, ZY),
                   {"act": "relu"}),
    CPU_MUL_INT8: ((_X, S, Z, _G, _t(1 / 256), _t(0, torch.int64), SY, ZY), {}),
    CPU_CAT_INT8: (([_X, _X.flip(0)], [S, _t(0.06)], [Z, _t(7, torch.int64)], 1, SY, ZY, 0,
                    255), {}),
    CPU_ADAPTIVE_AVG_POOL2D_INT8: ((_X, [1, 1], S, Z, 0, 255, SY, ZY), {}),
    CPU_AVG_POOL2D_INT8: ((_X, [2, 2], [2, 2], [0, 0], False, True, S, Z, 0, 255), {}),
    CPU_MAX_POOL2D_INT8: ((_X, [3, 3], [2, 2], [1, 1], [1, 1], False), {}),
    CPU_UPSAMPLE_NEAREST2D_INT8: ((_X, None, [2.0, 2.0], S, Z, 0, 255), {}),
    CPU_BATCH_NORM2D_INT8: ((_X, torch.rand(8) + 0.5, torch.randn(8), torch.randn(8),
                             torch.rand(8) + 0.5, 1e-5, S, Z, SY, _t(0, torch.int64)),
                            {"act": "relu"}),
}


def test_every_op_of_the_cpu_family_has_a_case_here():
    assert {op.name for op in TWINS} | {"onednn_conv2d_int8", "onednn_linear_int8"} == \
        {op.name for op in OPS.values() if op.family == "cpu"}
    assert set(CPU_OF.values()) == set(TWINS)


@pytest.mark.parametrize("op", list(TWINS), ids=lambda op: op.name)
def test_twin_on_views_of_the_codes_equals_its_ir_op(op):
    """Each IR op's CPU twin (PyTorch's quantized kernel on a view of the codes, no copy in or
    out) against the IR op on the same plain codes: dtype, shape and layout equal, codes within
    one (equal but for the add, the global pool back on its input's grid and the batch norm,
    where a value at a tie can round either way: PyTorch's kernels compute in another float
    order; the batch norm case was equal in 300 parameter draws here, and one code off once in a
    full-suite run whose draw was another)."""
    args, kwargs = TWINS[op]
    y = op.overload(*args, **kwargs)
    ir = next(t for t, twin in CPU_OF.items() if twin is op)
    ref = ir(*args, **kwargs)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if y.dim() == 4 and y.shape[-1] > 1:
        assert y.stride() == ref.stride()
    tol = 0 if y.dtype == torch.float32 else 1
    assert float((y.double() - ref.double()).abs().max()) <= tol * (1 if tol else 0)
    assert torch.equal(y, ref) or op in (CPU_ADD_INT8, CPU_ADAPTIVE_AVG_POOL2D_INT8,
                                         CPU_BATCH_NORM2D_INT8)


@pytest.mark.parametrize("op", list(TWINS), ids=lambda op: op.name)
def test_twin_fake_and_opcheck(op):
    """The fake (torch.export's, torch.compile's) agrees with the real op."""
    args, kwargs = TWINS[op]
    torch.library.opcheck(op.overload, args, kwargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_a_grid_the_kernels_lack_runs_the_reference():
    """Symmetric int8 codes (a grid of [-128, 127]) have no quantized kernel: the reference."""
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(CPU_QUANTIZE(x, S, _t(0, torch.int64), -128, 127),
                       torch.ops.fxopt.quantize(x, S, _t(0, torch.int64), -128, 127))


@pytest.mark.parametrize("shape,channels_last", [((2, 120, 28, 28), True), ((1, 960, 7, 7), True),
                                                 ((3, 16, 56, 56), False), ((1, 5, 1, 1), True)])
def test_global_pool_onto_its_own_grid_sums_the_codes(shape, channels_last):
    """The squeeze-excitation / head pool onto its own grid sums the codes exactly and scales
    once ((sum - hw * zp) * scale / hw): within one code of the IR's float average everywhere,
    equal on all but ties."""
    q = _codes(shape, 22)
    if channels_last:
        q = q.contiguous(memory_format=torch.channels_last)
    args = (q, [1, 1], _t(0.031), _t(117, torch.int64), 0, 255, _t(0.004), _t(9, torch.int64))
    y = CPU_ADAPTIVE_AVG_POOL2D_INT8.overload(*args)
    ref = next(t for t, twin in CPU_OF.items() if twin is CPU_ADAPTIVE_AVG_POOL2D_INT8)(*args)
    assert y.dtype == ref.dtype == torch.uint8 and y.shape == ref.shape == (*shape[:2], 1, 1)
    diff = (y.int() - ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.02
    if shape[2] * shape[3] >= 49:  # averages of many codes: on the grid, not clamped flat
        clamped = ((y == 0) | (y == 255)).float().mean()
        assert int(y.max()) > int(y.min()) and float(clamped) < 0.5
