"""The fxopt fused ops: every activation, both CPU paths (oneDNN and reference), fake strides."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fxopt.ops.fused as ops
from fxopt.ir.activations import apply_activation
from fxopt.ops import onednn
from fxopt.ir.tolerances import rel_err, tolerance_for

CL = torch.channels_last
ACTS = {
    "none": ([], lambda t: t),
    "relu": ([], F.relu),
    "relu6": ([], F.relu6),
    "leaky_relu": ([0.2], lambda t: F.leaky_relu(t, 0.2)),
    "hardtanh": ([-0.5, 0.7], lambda t: F.hardtanh(t, -0.5, 0.7)),
    "clamp": ([-0.3, math.inf], lambda t: t.clamp(min=-0.3)),
    "elu": ([0.7], lambda t: F.elu(t, 0.7)),
    "gelu": ([], F.gelu),
    "gelu_tanh": ([], lambda t: F.gelu(t, approximate="tanh")),
    "silu": ([], F.silu),
    "mish": ([], F.mish),
    "hardswish": ([], F.hardswish),
    "hardsigmoid": ([], F.hardsigmoid),
    "sigmoid": ([], torch.sigmoid),
    "tanh": ([], torch.tanh),
}


def _reference64(x, w, b, stride, padding, dilation, groups, residual, act):
    args, fn = ACTS[act]
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    y = conv(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation,
             groups)
    if residual is not None:
        y = y + residual.double()
    return fn(y)


def _inputs(ndim, layout, residual, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 9, 9) if ndim == 2 else (2, 4, 11)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(8, 4 // groups, *([3] * ndim), generator=g) * 0.3
    b = torch.randn(8, generator=g)
    r = torch.randn(2, 8, *shape[2:], generator=g) if residual else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
        r = r.contiguous(memory_format=CL) if r is not None else None
    return x, w, b, r


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv2d_act_matches_float64_reference(act, residual, layout):
    x, w, b, r = _inputs(2, layout, residual)
    args = ACTS[act][0]
    out = torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, r, act=act,
                                     act_args=args)
    ref = _reference64(x, w, b, [1, 1], [1, 1], [1, 1], 1, r, act)
    assert rel_err(out, ref) < tolerance_for(torch.float32)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)  # the layout contract


@pytest.mark.parametrize("act", ["relu", "silu", "clamp"])
def test_conv1d_act_and_strided_grouped_conv2d(act):
    x, w, b, r = _inputs(1, "contiguous", True)
    args = ACTS[act][0]
    out = torch.ops.fxopt.conv1d_act(x, w, b, [1], [1], [1], 1, r, act=act, act_args=args)
    assert rel_err(out, _reference64(x, w, b, [1], [1], [1], 1, r, act)) < 1e-5
    x, w, b, _ = _inputs(2, "channels_last", False, groups=2)
    out = torch.ops.fxopt.conv2d_act(x, w, None, [2, 2], [2, 2], [2, 2], 2, act=act, act_args=args)
    ref = _reference64(x, w, None, [2, 2], [2, 2], [2, 2], 2, None, act)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "hardsigmoid"])
def test_linear_act(act):
    g = torch.Generator().manual_seed(0)
    x, w, b, r = (torch.randn(3, 5, 6, generator=g), torch.randn(7, 6, generator=g),
                  torch.randn(7, generator=g), torch.randn(3, 5, 7, generator=g))
    args, fn = ACTS[act]
    out = torch.ops.fxopt.linear_act(x, w, b, r, act=act, act_args=args)
    ref = fn(F.linear(x.double(), w.double(), b.double()) + r.double())
    assert rel_err(out, ref) < 1e-5


@pytest.mark.skipif(not onednn.mkldnn_available(), reason="oneDNN is not available in this build")
def test_onednn_path_equals_reference_and_caches_packed_weights():
    x, w, b, r = _inputs(2, "channels_last", True)
    onednn.clear_weight_cache()
    for act in ACTS:
        args = ACTS[act][0]
        fast = torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, r, act=act,
                                          act_args=args)
        slow = ops.conv_act_reference(x, w, b, [1, 1], [1, 1], [1, 1], 1, r, act=act,
                                      act_args=args)
        assert rel_err(fast, slow) < 1e-5, act
    assert onednn.packed_weights() == 1  # one packed copy of the weight, reused
    w.mul_(2)  # an in-place change to the weight is seen (the cache is keyed on its version)
    fast = torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, act="relu")
    assert rel_err(fast, F.relu(F.conv2d(x, w, b, 1, 1))) < 1e-5
    del w
    assert onednn.packed_weights() == 0  # freed with the weight


def test_inference_mode_tensors():
    # inference tensors have no version counter: the weight cache must not need one
    with torch.inference_mode():
        x, w, b, r = _inputs(2, "channels_last", True)
        out = torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, r, act="relu")
        ref = _reference64(x, w, b, [1, 1], [1, 1], [1, 1], 1, r, "relu")
    assert rel_err(out, ref) < 1e-5
    assert onednn.mkldnn_available() == (onednn._find_mkldnn_ops() is not None)


def test_fake_implementation_gives_the_real_shapes_and_strides():
    cases = [_inputs(2, "channels_last", True), _inputs(2, "contiguous", False)]
    for x, w, b, r in cases:
        real = torch.ops.fxopt.conv2d_act(x, w, b, [2, 1], [1, 0], [1, 2], 1, None, act="relu")
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx_, fw, fb = mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b)
            fake = torch.ops.fxopt.conv2d_act(fx_, fw, fb, [2, 1], [1, 0], [1, 2], 1, None,
                                              act="relu")
        assert fake.shape == real.shape and fake.stride() == real.stride()


@pytest.mark.parametrize("op,args,kwargs", [
    ("conv2d_act", lambda: (*_inputs(2, "channels_last", True)[:3], [1, 1], [1, 1], [1, 1], 1,
                            _inputs(2, "channels_last", True)[3]), {"act": "silu"}),
    ("conv2d_act", lambda: (*_inputs(2, "contiguous", False)[:3], [2, 2], [0, 0], [1, 1], 1),
     {"act": "leaky_relu", "act_args": [0.1]}),
    ("conv1d_act", lambda: (*_inputs(1, "contiguous", False)[:3], [1], [1], [1], 1), {}),
    ("linear_act", lambda: (torch.randn(3, 5), torch.randn(4, 5), None), {"act": "tanh"}),
])
def test_opcheck(op, args, kwargs):
    torch.library.opcheck(getattr(torch.ops.fxopt, op).default, args(), kwargs)


def test_bad_activation_is_a_clear_error():
    x, w, b, _ = _inputs(2, "contiguous", False)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, act="swish")
    with pytest.raises(ValueError, match="takes 1 act_args"):
        torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, act="leaky_relu")


def test_apply_activation_in_place_equals_out_of_place():
    y = torch.randn(100)
    for act, (args, fn) in ACTS.items():
        assert torch.allclose(apply_activation(y.clone(), act, args, inplace=True), fn(y)), act


# -- conv_transpose2d_act -------------------------------------------------------------------------
# (in_ch, out_ch, kernel, stride, padding, output_padding, groups, dilation, input H, W)
DECONVS = {
    "plain": (4, 6, 3, [1, 1], [1, 1], [0, 0], 1, [1, 1], (5, 5)),
    "stride2_output_padding": (4, 6, 3, [2, 2], [1, 1], [1, 1], 1, [1, 1], (5, 4)),
    "grouped_dilated": (4, 6, 3, [2, 1], [2, 1], [1, 0], 2, [2, 1], (4, 5)),
    "depthwise_k4": (4, 4, 4, [2, 2], [1, 1], [0, 0], 4, [1, 1], (3, 3)),
}


def _deconv_inputs(case, layout="contiguous", residual=False, seed=0):
    cin, cout, k, stride, padding, out_pad, groups, dilation, hw = DECONVS[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, *hw, generator=g)
    w = torch.randn(cin, cout // groups, k, k, generator=g) * 0.3
    b = torch.randn(cout, generator=g)
    shape = F.conv_transpose2d(x, w, b, stride, padding, out_pad, groups, dilation).shape
    r = torch.randn(*shape, generator=g) if residual else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
        r = r.contiguous(memory_format=CL) if r is not None else None
    return (x, w, b, stride, padding, out_pad, groups, dilation), r


def _deconv_reference64(args, residual, act):
    x, w, b, stride, padding, out_pad, groups, dilation = args
    y = F.conv_transpose2d(x.double(), w.double(), b.double(), stride, padding, out_pad, groups,
                           dilation)
    return ACTS[act][1](y if residual is None else y + residual.double())


@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu", "clamp", "gelu", "silu",
                                 "hardswish", "sigmoid"])
@pytest.mark.parametrize("case", sorted(DECONVS))
@pytest.mark.parametrize("layout,residual", [("contiguous", False), ("channels_last", True)])
def test_conv_transpose2d_act_matches_float64_reference(act, case, layout, residual):
    args, r = _deconv_inputs(case, layout, residual)
    out = torch.ops.fxopt.conv_transpose2d_act(*args, r, act=act, act_args=ACTS[act][0])
    ref = _deconv_reference64(args, r, act)
    assert out.shape == ref.shape and rel_err(out, ref) < tolerance_for(torch.float32)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)  # the conv ops' layout contract


@pytest.mark.parametrize("case", sorted(DECONVS))
def test_conv_transpose2d_act_decomposition_is_the_op_and_differentiable(case):
    args, r = _deconv_inputs(case, residual=True)
    w = args[1].clone().requires_grad_(True)
    args = (args[0], w, *args[2:])
    op = ops.CONV_TRANSPOSE2D_ACT
    y = op.decompose(*args, r, act="elu", act_args=[0.5])
    with torch.no_grad():
        assert rel_err(y, op(*args, r, act="elu", act_args=[0.5])) < 1e-6
    y.square().sum().backward()  # QAT runs the decomposition: the weight gets a gradient
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("case", sorted(DECONVS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_transpose2d_act_fake_gives_the_real_shapes_and_strides(case, layout):
    args, _ = _deconv_inputs(case, layout)
    real = torch.ops.fxopt.conv_transpose2d_act(*args, act="relu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = torch.ops.fxopt.conv_transpose2d_act(*fake_args, act="relu")
    assert fake.shape == real.shape and fake.stride() == real.stride()


@pytest.mark.parametrize("case,layout,residual,kwargs", [
    ("plain", "contiguous", False, {}),
    ("stride2_output_padding", "channels_last", True, {"act": "silu"}),
    ("grouped_dilated", "contiguous", True, {"act": "leaky_relu", "act_args": [0.1]}),
])
def test_conv_transpose2d_act_opcheck(case, layout, residual, kwargs):
    args, r = _deconv_inputs(case, layout, residual)
    torch.library.opcheck(torch.ops.fxopt.conv_transpose2d_act.default, (*args, r), kwargs)


def test_conv_transpose2d_act_macs_and_views():
    import torch.fx as fx
    from fxopt.ir.graph import tensor_meta_of
    from fxopt.ir.metrics import count_macs
    from fxopt.ops.schema import view_of

    args, _ = _deconv_inputs("grouped_dilated")
    x, w = args[0], args[1]
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    gm.register_buffer("w", w)
    g = gm.graph
    xn, wn = g.placeholder("x"), g.get_attr("w")
    node = ops.CONV_TRANSPOSE2D_ACT.emit(g, x=xn, weight=wn, bias=None, stride=args[3],
                                         padding=args[4], output_padding=args[5],
                                         groups=args[6], dilation=args[7], act="relu")
    g.output(node)
    gm.recompile()
    for n, value in ((xn, x), (wn, w), (node, gm(x))):
        n.meta["tensor_meta"] = tensor_meta_of(value)
    # each input element scatters into C_out/groups * kh * kw outputs
    assert count_macs(gm) == x.numel() * w.shape[1] * w.shape[2] * w.shape[3]
    v = ops.FusedLayer.of(node)  # QAT reads any fused op through FusedLayer
    assert v.schema is ops.CONV_TRANSPOSE2D_ACT and v.act == "relu" and v.residual is None
    assert view_of(node).output_padding == [1, 0] and not ops.FusedConv.matches(node)
    assert node.target in ops.FUSED_OPS


# -- add_layer_norm: a transformer block's residual add and its LayerNorm ---------------------
def _aln_inputs(shape=(2, 5, 12), affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    n = shape[-1]
    w = torch.rand(n, generator=g) + 0.5 if affine else None
    b = torch.randn(n, generator=g) if affine else None
    return x, r, w, b


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 12), (3, 7), (1, 1, 1)])
def test_add_layer_norm_is_the_add_and_the_layer_norm(shape, affine):
    x, r, w, b = _aln_inputs(shape, affine)
    s, y = torch.ops.fxopt.add_layer_norm(x, r, [shape[-1]], w, b, 1e-6)
    ref = F.layer_norm((x + r).double(), [shape[-1]], None if w is None else w.double(),
                       None if b is None else b.double(), 1e-6)
    assert torch.equal(s, x + r)
    assert rel_err(y, ref) < tolerance_for(torch.float32)
    # over the last two dims, and a residual that broadcasts (a position embedding)
    x, r, _, _ = _aln_inputs((2, 3, 4, 5))
    s, y = torch.ops.fxopt.add_layer_norm(x, r[:1], [4, 5])
    assert torch.equal(s, x + r[:1]) and torch.equal(y, F.layer_norm(x + r[:1], [4, 5]))


def test_add_layer_norm_fake_gradient_and_schema():
    x, r, w, b = _aln_inputs()
    real = torch.ops.fxopt.add_layer_norm(x, r, [12], w, b)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.fxopt.add_layer_norm(*(mode.from_tensor(t) for t in (x, r)), [12],
                                              mode.from_tensor(w), mode.from_tensor(b))
    assert [(f.shape, f.stride()) for f in fake] == [(t.shape, t.stride()) for t in real]
    # both outputs carry gradient: eager's, for x, r, weight and bias
    leaves = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
    s, y = torch.ops.fxopt.add_layer_norm(leaves[0], leaves[1], [12], leaves[2], leaves[3])
    (s.sin().sum() + (y * y).sum()).backward()
    eager = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
    s2 = eager[0] + eager[1]
    (s2.sin().sum() + (F.layer_norm(s2, [12], eager[2], eager[3]) ** 2).sum()).backward()
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5)
    torch.library.opcheck(torch.ops.fxopt.add_layer_norm.default, (x, r, [12], w, b, 1e-5))
    assert ops.ADD_LAYER_NORM.family == "fused" and ops.ADD_LAYER_NORM.decompose is not None
    assert ops.ADD_LAYER_NORM.overload not in ops.FUSED_OPS  # not a layer: fuse_act ignores it
