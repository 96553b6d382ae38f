"""Gradients of the fxopt ops: every float op's backward (declared once, in the schema) equals
eager's for the input, weight, bias and residual; int8 ops refuse backward with a typed error
that points at quantization-aware training; the oneDNN weight cache never serves a stale
weight while training."""
import pytest
import torch
import torch.nn.functional as F

from fxopt.errors import UnsupportedOpError
from fxopt.ir.activations import apply_activation
from fxopt.ops import onednn
from fxopt.ops.schema import OPS

# fp32 gradients of one layer: a different (but exact) summation order, nothing more
TOL = dict(rtol=1e-4, atol=1e-5)

ACTS = {"none": [], "relu": [], "silu": [], "gelu": [], "hardswish": [], "leaky_relu": [0.1],
        "hardtanh": [-0.5, 0.5], "elu": [1.0], "sigmoid": [], "tanh": [], "relu6": [],
        "mish": []}


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _grads(fn, inputs, seed=0):
    """``fn(*inputs)`` and the gradients of a random projection of it w.r.t. ``inputs``."""
    leaves = _leaves(*inputs)
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * g).sum().backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _compare(op_fn, eager_fn, inputs):
    out, grads = _grads(op_fn, inputs)
    ref_out, ref_grads = _grads(eager_fn, inputs)
    torch.testing.assert_close(out, ref_out, **TOL)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None
            continue
        assert g is not None, f"input {i} got no gradient"
        torch.testing.assert_close(g, r, **TOL, msg=lambda m: f"input {i}: {m}")


def _conv_inputs(fmt, bias, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 9, 9, generator=g)
    w = torch.randn(8, 6, 3, 3, generator=g) * 0.2
    b = torch.randn(8, generator=g) if bias else None
    r = torch.randn(2, 8, 5, 5, generator=g) if residual == "full" else \
        torch.randn(1, 8, 1, 1, generator=g) if residual == "broadcast" else None
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        if r is not None and residual == "full":
            r = r.contiguous(memory_format=torch.channels_last)
    return x, w, b, r


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])  # channels-last: oneDNN
@pytest.mark.parametrize("bias,residual", [(True, None), (False, "full"), (True, "broadcast")])
def test_conv2d_act_gradients_equal_eager(act, fmt, bias, residual):
    x, w, b, r = _conv_inputs(fmt, bias, residual)
    a = ACTS[act]

    def op(x, w, b, r):
        return torch.ops.fxopt.conv2d_act(x, w, b, [2, 2], [1, 1], [1, 1], 1, r, act=act,
                                          act_args=a)

    def eager(x, w, b, r):
        y = F.conv2d(x, w, b, 2, 1)
        return apply_activation(y if r is None else y + r, act, a)

    _compare(op, eager, (x, w, b, r))


def test_grouped_dilated_conv1d_and_transposed_gradients():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 4, 17, generator=g), torch.randn(6, 2, 3, generator=g), \
        torch.randn(6, generator=g)
    r = torch.randn(2, 6, 13, generator=g)
    _compare(lambda x, w, b, r: torch.ops.fxopt.conv1d_act(x, w, b, [1], [0], [2], 2, r,
                                                           act="silu"),
             lambda x, w, b, r: F.silu(F.conv1d(x, w, b, 1, 0, 2, 2) + r), (x, w, b, r))
    x, w, b = torch.randn(2, 4, 5, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g), \
        torch.randn(3, generator=g)
    r = torch.randn(2, 3, 10, 10, generator=g)
    _compare(lambda x, w, b, r: torch.ops.fxopt.conv_transpose2d_act(
        x, w, b, [2, 2], [1, 1], [1, 1], 1, [1, 1], r, act="leaky_relu", act_args=[0.2]),
        lambda x, w, b, r: F.leaky_relu(F.conv_transpose2d(x, w, b, 2, 1, 1) + r, 0.2),
        (x, w, b, r))


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "hardtanh"])
def test_linear_act_gradients_equal_eager(act):
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(5, 3, 12, generator=g), torch.randn(7, 12, generator=g), \
        torch.randn(7, generator=g)
    r = torch.randn(5, 3, 7, generator=g)
    a = ACTS[act] or ([-0.5, 0.5] if act == "hardtanh" else [])
    _compare(lambda x, w, b, r: torch.ops.fxopt.linear_act(x, w, b, r, act=act, act_args=a),
             lambda x, w, b, r: apply_activation(F.linear(x, w, b) + r, act, a), (x, w, b, r))


def test_gradcheck_in_float64():
    """Finite differences, not another implementation: the backward is the op's derivative."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(1, 3, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, r,
                                                      act="silu"), (x, w, b, r))
    lw = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    lx = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: torch.ops.fxopt.linear_act(x, w, None, act="gelu"), (lx, lw))


def test_triton_float_ops_gradients_on_their_cpu_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 6, 3, 3, generator=g) * 0.2, torch.randn(8, generator=g)
    r = torch.randn(2, 8, 8, 8, generator=g)
    _compare(lambda x, w, b, r: torch.ops.fxopt.triton_conv2d(x, w, b, [1, 1], [1, 1], [1, 1],
                                                              1, r, act="relu"),
             lambda x, w, b, r: F.relu(F.conv2d(x, w, b, 1, 1) + r), (x, w, b, r))
    # depthwise: the prepared [KH*KW, C] weight gets its gradient in that layout
    w4 = torch.randn(6, 1, 3, 3, generator=g)
    w2 = w4.reshape(6, 9).t().contiguous()
    _compare(lambda x, w2, b: torch.ops.fxopt.triton_depthwise_conv2d(
        x, w2, b, [3, 3], [2, 2], [1, 1], [1, 1], act="hardswish"),
        lambda x, w2, b: F.hardswish(F.conv2d(x, w2.t().reshape(6, 1, 3, 3), b, 2, 1, 1, 6)),
        (x, w2, torch.randn(6, generator=g)))
    lx, lw, lb = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g), \
        torch.randn(3, generator=g)
    _compare(lambda x, w, b: torch.ops.fxopt.triton_linear(x, w, b, act="silu"),
             lambda x, w, b: F.silu(F.linear(x, w, b)), (lx, lw, lb))
    gate = torch.randn(2, 6, 1, 1, generator=g)
    _compare(lambda a, b: torch.ops.fxopt.triton_add(a, b, act="relu"),
             lambda a, b: F.relu(a + b), (x, torch.randn(2, 6, 8, 8, generator=g)))
    _compare(lambda a, b: torch.ops.fxopt.triton_mul(a, b), lambda a, b: a * b, (x, gate))


def test_every_float_op_has_a_gradient_and_every_int8_op_refuses():
    float_ops = [op for op in OPS.values() if not op.quantized]
    assert {"conv2d_act", "linear_act", "triton_conv2d", "triton_mul"} <= \
        {op.name for op in float_ops}
    for op in float_ops:
        if op.family in ("fused", "triton", "cpu"):
            assert op.differentiable is not None, op.name
    for op in OPS.values():
        if op.quantized:
            assert op.differentiable is None, op.name


def test_int8_op_backward_is_a_typed_error_pointing_at_qat():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 6, generator=g)
    w_scale = w.abs().amax(dim=1) / 127
    w_q = torch.round(w / w_scale[:, None]).to(torch.int8)
    x = torch.randn(3, 6, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    y = torch.ops.fxopt.linear_int8_dynamic(x, w_q, w_scale, b, act="relu")
    assert y.requires_grad  # the forward runs; only the backward refuses
    with pytest.raises(UnsupportedOpError, match="linear_int8_dynamic") as err:
        y.sum().backward()
    assert "prepare_qat" in err.value.hint
    assert x.grad is None and b.grad is None


@pytest.mark.skipif(not onednn.mkldnn_available(), reason="oneDNN is not available in this build")
def test_onednn_cache_is_never_stale():
    """A changed weight is repacked (an optimizer step, ``weight.data = ...``) and the copies
    of its old values are dropped."""
    onednn.clear_weight_cache()
    x, w, b, _ = _conv_inputs("channels_last", True, None)
    w = torch.nn.Parameter(w)

    def run():
        return torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, act="relu")

    y = run()
    y.sum().backward()
    torch.optim.SGD([w], lr=0.5).step()
    with torch.no_grad():
        torch.testing.assert_close(run(), F.relu(F.conv2d(x, w, b, 1, 1)), **TOL)
        assert onednn.packed_weights() == 1 and onednn.packed_copies() == 1
        torch.optim.SGD([w], lr=0.5).step()  # grad still there: a second in-place update
        torch.testing.assert_close(run(), F.relu(F.conv2d(x, w, b, 1, 1)), **TOL)
        w.data = torch.randn_like(w)  # new storage, same tensor object, same version
        torch.testing.assert_close(run(), F.relu(F.conv2d(x, w, b, 1, 1)), **TOL)
    assert onednn.packed_copies() == 1  # the old values' copies went with them
