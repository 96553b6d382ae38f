"""oneDNN's int8 layers (fxopt.onednn_conv2d_int8 / onednn_linear_int8) against the int8 IR's
exact reference, on random codes, grids and weights: within one code (oneDNN's float epilogue
may round a tie the other way), and equal where it refuses (the reference runs)."""
from __future__ import annotations

import pytest
import torch

from fxopt.ir.activations import ACTIVATIONS
from fxopt.ops import onednn
from fxopt.ops.cpu import ONEDNN_CONV2D_INT8, ONEDNN_LINEAR_INT8

pytestmark = pytest.mark.skipif(not onednn.onednn_int8_available(),
                                reason="oneDNN's int8 kernels are not available in this build")

CONV_ACTS = sorted(k for k, r in ACTIVATIONS.items() if "conv2d" in r.onednn_int8)
LINEAR_ACTS = sorted(k for k, r in ACTIVATIONS.items() if "linear" in r.onednn_int8)


def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.1
    scale = w.flatten(1).abs().amax(1) / 127
    w_q = torch.round(w / scale.reshape(-1, *[1] * (w.dim() - 1))).clamp(-127, 127)
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


EPILOGUE_ACTS = sorted(k for k, r in ACTIVATIONS.items() if "conv2d" not in r.onednn_int8)
LINEAR_EPILOGUE_ACTS = sorted(k for k, r in ACTIVATIONS.items() if "linear" not in r.onednn_int8)


def _act_args(act):
    return {"leaky_relu": [0.1], "hardtanh": [-0.5, 2.0], "clamp": [-1.0, 3.0],
            "elu": [1.0]}.get(act, [])


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
                        lambda *a: calls.append(a[-1]) or real(*a))
    torch.ops.fxopt.onednn_conv2d_int8(*args, act=act, act_args=_act_args(act))
    assert calls == [None]  # no post-op: the float32 output


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
