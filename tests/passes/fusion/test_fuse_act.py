"""fuse_act: every activation, residual adds, the CPU lowering and layout, and the fused graph's
life after the pass (printing, save/load, torch.compile); transposed convolutions
(``conv_transpose2d_act``) through everything the op schema promises (ONNX, QAT, pictures, MACs)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.ir.metrics import count_macs
from fxopt.ir.tolerances import compare_outputs
from fxopt.ir.verify import verify_structure
from fxopt.ops.fused import CONV_TRANSPOSE2D_ACT
from fxopt.infra.registry import PassResult
from fxopt.passes.fusion.fuse_act import fuse_act, lower_convs
from fxopt.passes.fusion.layout import to_channels_last

CONV2D = torch.ops.fxopt.conv2d_act.default
CONV1D = torch.ops.fxopt.conv1d_act.default
LINEAR = torch.ops.fxopt.linear_act.default
DECONV = torch.ops.fxopt.conv_transpose2d_act.default

# name -> (module or function applied after the layer, expected act, expected act_args)
ACTIVATIONS = {
    "relu": (nn.ReLU(), "relu", []),
    "relu6": (nn.ReLU6(), "relu6", []),
    "leaky_relu": (nn.LeakyReLU(0.2), "leaky_relu", [0.2]),
    "hardtanh": (nn.Hardtanh(-0.5, 0.7), "hardtanh", [-0.5, 0.7]),
    "gelu": (nn.GELU(), "gelu", []),
    "gelu_tanh": (nn.GELU(approximate="tanh"), "gelu_tanh", []),
    "silu": (nn.SiLU(), "silu", []),
    "hardswish": (nn.Hardswish(), "hardswish", []),
    "hardsigmoid": (nn.Hardsigmoid(), "hardsigmoid", []),
    "sigmoid": (nn.Sigmoid(), "sigmoid", []),
    "tanh": (nn.Tanh(), "tanh", []),
    "elu": (nn.ELU(0.5), "elu", [0.5]),
    "mish": (nn.Mish(), "mish", []),
    "clamp": (lambda t: torch.clamp(t, -0.2, 0.4), "clamp", [-0.2, 0.4]),
    "clamp_min": (lambda t: t.clamp(min=0.1), "clamp", [0.1, math.inf]),
    "clamp_max": (lambda t: t.clamp_max(0.3), "clamp", [-math.inf, 0.3]),
}
LAYERS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 7), CONV2D),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9), CONV1D),
    "linear": (lambda: nn.Linear(5, 6), (3, 5), LINEAR),
}


class LayerAct(nn.Module):
    def __init__(self, layer, act):
        super().__init__()
        self.layer = layer
        self.act = act if isinstance(act, nn.Module) else None
        self.fn = None if isinstance(act, nn.Module) else act

    def forward(self, x):
        y = self.layer(x)
        return self.act(y) if self.act is not None else self.fn(y)


def run(model, *inputs, target="cpu", lower=None, channels_last=None):
    """fuse_act, then the CPU pipeline's layout passes (on for target='cpu' unless turned off):
    one PassResult with the stats and notes of all of them."""
    model = model.eval()
    gm = fxopt.capture(model, inputs)
    macs = count_macs(gm)
    ctx = PassContext(example_inputs=inputs, target=target)
    res = fuse_act(gm, ctx)
    cpu = target == "cpu"
    for on, fn in ((cpu if lower is None else lower, lower_convs),
                   (cpu if channels_last is None else channels_last, to_channels_last)):
        if on:
            more = fn(gm, ctx)
            res = PassResult(gm, res.modified or more.modified, {**res.stats, **more.stats},
                             res.notes + more.notes,
                             shapes_changed=res.shapes_changed or more.shapes_changed)
    assert verify_structure(gm, require_meta=True) == []
    assert count_macs(gm) == macs  # fusion moves the work, never drops it
    with torch.no_grad():
        stats = compare_outputs(gm(*inputs), model(*inputs))
    assert stats.ok, f"rel err {stats.rel_err:.2e}"
    return gm, res


def fused_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (CONV1D, CONV2D, LINEAR, DECONV)]


def compute_nodes(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")]


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("act_name", sorted(ACTIVATIONS))
def test_every_activation_fuses(layer_name, act_name):
    make, shape, op = LAYERS[layer_name]
    act, want, want_args = ACTIVATIONS[act_name]
    torch.manual_seed(0)
    gm, res = run(LayerAct(make(), act), torch.randn(*shape) * 2, channels_last=False)
    assert res.modified
    (node,) = fused_nodes(gm)
    assert node.target is op
    assert node.kwargs.get("act") == want and node.kwargs.get("act_args", []) == want_args
    assert [n.target for n in compute_nodes(gm)] == [op]  # nothing else left
    assert node.meta["fxopt_from"] == ["layer", node.meta["fxopt_from"][-1]]
    assert res.stats == {("conv_act" if "conv" in layer_name else "linear_act"): 1}


class ResidualTail(nn.Module):
    """The ResNet block tail: act(conv(x) + y), in either operand order."""

    def __init__(self, act=F.relu, swap=False, act_after=True):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.actf, self.swap, self.act_after = act, swap, act_after

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x)))
        s = x + y if self.swap else y + x
        return self.actf(s) if self.act_after else s


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("act", ["relu", "silu", None])
@pytest.mark.parametrize("layout", [True, False])
def test_residual_tail_is_one_call(swap, act, layout):
    fn = {"relu": F.relu, "silu": F.silu, None: None}[act]
    x = torch.randn(2, 4, 6, 6)
    gm, res = run(ResidualTail(fn, swap, act_after=fn is not None), x, channels_last=layout)
    ops = fused_nodes(gm)
    assert len(ops) == 2
    tail = ops[1]
    assert tail.args[7].op == "placeholder" or tail.args[7].target == "contiguous"
    assert tail.kwargs.get("act", "none") == (act or "none")
    expected = {"conv_act": 1, "conv_add": 1}
    if act:
        expected["fused_act"] = 1
    if layout:  # the input is converted; the 4-D output gets eager's layout back
        expected.update(to_channels_last=1, outputs_contiguous=1)
    assert res.stats == expected
    assert tail.name == "conv2_add" + (f"_{act}" if act else "")


def test_golden_graph_text():
    gm, _ = run(ResidualTail(), torch.randn(1, 4, 5, 5))
    code = gm.code
    assert "contiguous = x.contiguous(memory_format = torch.channels_last)" in code
    assert ("conv1_relu = torch.ops.fxopt.conv2d_act.default(contiguous, conv1_weight, "
            "conv1_bias, [1, 1], [1, 1], [1, 1], 1, act = 'relu')") in code
    assert ("conv2_add_relu = torch.ops.fxopt.conv2d_act.default(conv1_relu, conv2_weight, "
            "conv2_bias, [1, 1], [1, 1], [1, 1], 1, x, act = 'relu')") in code


class TwoUsers(nn.Module):
    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y), y  # the conv output is needed un-activated too


def test_negative_second_user_and_padding_mode():
    for model in (TwoUsers(), LayerAct(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                                       nn.ReLU())):
        x = torch.randn(1, 3, 5, 5)
        gm = fxopt.capture(model.eval(), x)
        code = gm.code
        res = fuse_act(gm, PassContext(example_inputs=(x,), target="cuda"))  # no CPU lowering
        assert not res.modified and gm.code == code
    assert any("padding_mode='reflect'" in n for n in res.notes)


def test_idempotent():
    x = torch.randn(2, 4, 6, 6)
    gm, _ = run(ResidualTail(F.silu), x)
    code = gm.code
    again = fuse_act(gm, PassContext(example_inputs=(x,), target="cpu"))
    assert not again.modified and gm.code == code


class PlainConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return F.max_pool2d(self.b(F.relu(self.a(x))), 2)  # b has no epilogue


def test_cpu_lowering_and_channels_last():
    x = torch.randn(2, 3, 8, 8)
    gm, res = run(PlainConvs(), x)
    assert res.stats == {"conv_act": 1, "lowered": 1, "to_channels_last": 1,
                         "outputs_contiguous": 1}
    assert res.shapes_changed  # strides changed: the manager refreshes tensor_meta
    with torch.no_grad():
        out = gm(x)
    assert out.is_contiguous()  # outputs keep eager's layout
    # not lowered, nor converted, for other targets or when asked not to
    _, res = run(PlainConvs(), x, target="cuda")
    assert res.stats == {"conv_act": 1}
    _, res = run(PlainConvs(), x, lower=False, channels_last=False)
    assert res.stats == {"conv_act": 1}


class ReadsStrides(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return y.as_strided((2, 8), (1, 2))  # reads raw memory: its values depend on the layout


def test_layout_kept_when_the_graph_reads_strides():
    x = torch.randn(2, 3, 5, 5)
    gm, res = run(ReadsStrides(), x)
    assert "to_channels_last" not in res.stats
    assert any("kept the memory layout" in n for n in res.notes)


class LinearResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return F.gelu(x + self.fc(x))


def test_linear_residual():
    gm, res = run(LinearResidual(), torch.randn(3, 6))
    (node,) = fused_nodes(gm)
    assert node.target is LINEAR and node.kwargs["act"] == "gelu" and node.args[3].op == "placeholder"
    assert res.stats == {"linear_add": 1, "fused_act": 1}


class BroadcastAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, bias):
        return F.relu(self.conv(x) + bias)  # bias is [1, 4, 1, 1]: not a same-shape residual


def test_broadcast_add_is_not_a_residual():
    gm, res = run(BroadcastAdd(), torch.randn(2, 3, 5, 5), torch.randn(1, 4, 1, 1),
                  target="cuda")
    assert res.stats == {} and not res.modified


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = ResidualTail()
        self.body.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.body.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
                                  nn.Hardswish())

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@pytest.fixture
def optimized(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    model.stem[1].running_mean.uniform_(-1, 1)
    model.stem[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    return model, x, fxopt.optimize(model, x)


def test_pipeline_prints_saves_and_loads(optimized, tmp_path):
    model, x, opt = optimized
    rec = opt.report.record("fuse_act")
    assert rec.status == "ok" and rec.stats["conv_act"] == 2 and rec.stats["linear_act"] == 1
    assert "torch.ops.fxopt.conv2d_act.default" in str(opt.graph_module.graph)
    loaded = fxopt.load(opt.save(tmp_path / "net.fxopt"))
    with torch.no_grad():
        assert torch.equal(loaded(x), opt(x))
        assert compare_outputs(loaded(x), model(x)).ok


def test_runs_under_torch_compile(optimized):
    model, x, opt = optimized
    torch._dynamo.reset()
    compiled = torch.compile(opt.graph_module, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert compare_outputs(compiled(x), model(x)).ok


def test_exports(optimized):
    model, x, opt = optimized
    ep = torch.export.export(opt.graph_module, (x,))
    assert CONV2D in {n.target for n in ep.graph.nodes}
    with torch.no_grad():
        assert compare_outputs(ep.module()(x), model(x)).ok


@pytest.mark.slow
def test_runs_under_torch_compile_inductor(optimized):
    model, x, opt = optimized
    torch._dynamo.reset()
    compiled = torch.compile(opt.graph_module, fullgraph=True)
    with torch.no_grad():
        assert compare_outputs(compiled(x), model(x)).ok


# -- transposed convolutions: conv_transpose2d_act ------------------------------------------------
# name -> nn.ConvTranspose2d arguments (in, out, kernel, ...), input shape
DECONVS = {
    "plain": (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 5, 5)),
    "stride2_output_padding": (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2,
                                    padding=1, output_padding=1), (2, 4, 5, 4)),
    "grouped_dilated_no_bias": (dict(in_channels=4, out_channels=6, kernel_size=(3, 2),
                                     stride=(2, 1), padding=(2, 0), output_padding=(1, 0),
                                     groups=2, dilation=(2, 1), bias=False), (1, 4, 4, 6)),
}


def _deconv(case):
    return nn.ConvTranspose2d(**DECONVS[case][0])


def fused_view(node):
    """The call's arguments by name (its schema's own view)."""
    return CONV_TRANSPOSE2D_ACT.view.of(node)


@pytest.mark.parametrize("case", sorted(DECONVS))
@pytest.mark.parametrize("act_name", ["relu", "leaky_relu", "hardtanh", "gelu", "silu",
                                      "sigmoid", "clamp_min"])
def test_conv_transpose_act_fuses(case, act_name):
    act, want, want_args = ACTIVATIONS[act_name]
    layer = _deconv(case)
    # run(): the numbers equal eager (fp32 tolerance) and the MAC count is unchanged
    gm, res = run(LayerAct(layer, act), torch.randn(*DECONVS[case][1]) * 2)
    # the CPU layout passes know only conv2d_act: the deconv keeps its input's layout
    assert res.stats == {"conv_transpose_act": 1}
    (node,) = fused_nodes(gm)
    v = fused_view(node)
    assert (v.stride, v.padding, v.output_padding, v.groups, v.dilation) == (
        list(layer.stride), list(layer.padding), list(layer.output_padding), layer.groups,
        list(layer.dilation))
    assert v.act == want and v.act_args == want_args and (v.bias is None) == (layer.bias is None)
    assert node.meta["fxopt_from"] == ["layer", node.meta["fxopt_from"][-1]]


class DeconvSkip(nn.Module):
    """A decoder step: act(deconv(x) + skip), in either operand order."""

    def __init__(self, act=F.relu, swap=False):
        super().__init__()
        self.up = _deconv("stride2_output_padding")
        self.actf, self.swap = act, swap

    def forward(self, x, skip):
        y = self.up(x)
        return self.actf(skip + y if self.swap else y + skip)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_conv_transpose_residual_is_one_call(swap, act):
    fn = {"relu": F.relu, "silu": F.silu}[act]
    x, skip = torch.randn(2, 4, 5, 4), torch.randn(2, 6, 10, 8)
    gm, res = run(DeconvSkip(fn, swap), x, skip, target="cuda")  # no CPU layout passes
    assert res.stats == {"conv_transpose_add": 1, "fused_act": 1}
    (node,) = fused_nodes(gm)
    assert node.name == f"up_add_{act}" and [n.target for n in compute_nodes(gm)] == [DECONV]
    v = fused_view(node)
    assert v.residual.name == "skip" and v.act == act


def test_conv_transpose_golden_graph_text():
    gm, _ = run(DeconvSkip(), torch.randn(1, 4, 3, 3), torch.randn(1, 6, 6, 6), target="cuda")
    assert ("up_add_relu = torch.ops.fxopt.conv_transpose2d_act.default(x, up_weight, up_bias, "
            "[2, 2], [1, 1], [1, 1], 1, [1, 1], skip, act = 'relu')") in gm.code


class DeconvOutputSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x):
        return F.relu(self.up(x, output_size=[10, 10]))  # output_padding chosen per call


def test_conv_transpose_negative_cases():
    x = torch.randn(1, 4, 5, 5)
    # a second user of the un-activated output, and output_size= at the call: left alone
    two_users = TwoUsers()
    two_users.conv = nn.ConvTranspose2d(3, 4, 3, padding=1)  # the same shapes, transposed
    cases = [(two_users, torch.randn(1, 3, 5, 5)), (DeconvOutputSize(), x)]
    notes = []
    for model, inp in cases:
        gm = fxopt.capture(model.eval(), inp)
        code = gm.code
        res = fuse_act(gm, PassContext(example_inputs=(inp,), target="cuda"))
        assert not res.modified and gm.code == code
        notes += res.notes
    assert notes == ["'up' is not fused: called with output_size"]
    # padding_mode='reflect': PyTorch refuses to run it (only zeros is implemented for a
    # transposed conv); fuse_act must not turn it into a zero-padded op that would run
    gm = fxopt.capture(LayerAct(nn.ConvTranspose2d(4, 6, 3), nn.ReLU()).eval(), x)
    gm.get_submodule("layer").padding_mode = "reflect"
    code = gm.code
    res = fuse_act(gm, PassContext(example_inputs=(x,), target="cuda"))
    assert not res.modified and gm.code == code
    assert res.notes == ["'layer' is not fused: padding_mode='reflect'"]


def test_conv_transpose_idempotent():
    x, skip = torch.randn(2, 4, 5, 4), torch.randn(2, 6, 10, 8)
    gm, res = run(DeconvSkip(F.silu), x, skip)
    assert res.modified
    code = gm.code
    again = fuse_act(gm, PassContext(example_inputs=(x, skip), target="cpu"))
    assert not again.modified and gm.code == code and again.stats == {}


class Decoder(nn.Module):
    """conv-bn-relu down, deconv-bn-relu up (stride 2, output_padding), a grouped deconv with a
    skip connection and SiLU, a 1x1 head: what the pipeline, ONNX, int8 and QAT see."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1,
                                                   output_padding=1), nn.BatchNorm2d(4),
                                nn.ReLU())
        self.refine = nn.ConvTranspose2d(4, 4, 3, padding=2, groups=2, dilation=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.up(self.down(x))
        return self.head(F.silu(self.refine(y) + y))


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    model = Decoder().eval()
    for bn in (model.down[1], model.up[1]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    return model, x, fxopt.optimize(model, x)


def _deconv_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is DECONV]


def test_conv_transpose_pipeline_macs_and_pictures(decoder):
    from fxopt.tools.draw_labels import node_kind, node_label

    model, x, opt = decoder
    assert opt.report.record("fold_bn").stats["folded"] == 2  # BN folds into the deconv too
    assert opt.report.record("fuse_act").stats == {"conv_act": 1, "conv_transpose_act": 1,
                                                   "conv_transpose_add": 1, "fused_act": 1}
    gm = opt.graph_module
    up, refine = _deconv_nodes(gm)
    assert fused_view(up).act == "relu" and fused_view(refine).act == "silu"
    assert fused_view(refine).residual is up
    assert count_macs(gm) == count_macs(fxopt.capture(model, x))  # the schema's MAC counter
    with torch.no_grad():
        assert compare_outputs(opt(x), model(x)).ok
    # the pictures read the schema: a fused op, labelled from its arguments
    assert node_kind(gm, refine) == "fused"
    assert node_label(gm, up).startswith("conv3x3/2+relu") and "add+silu" in node_label(gm, refine)


def test_conv_transpose_onnx_round_trip(decoder, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, x, opt = decoder
    res = fxopt.export_onnx(opt, x, tmp_path / "decoder.onnx")  # raises on an ORT mismatch
    assert res.translated == {"conv2d_act": 2, "conv_transpose2d_act": 2} and res.kept == []
    assert res.check is not None and res.check.ok  # ONNX Runtime reproduced the module


def test_conv_transpose_left_alone_by_int8_and_triton(decoder, monkeypatch):
    model, x, opt = decoder
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    int8 = fxopt.optimize(model, x, quantize="int8", calibration_data=batches)
    assert int8.report.record("quantize_int8").stats["conv2d"] == 2  # down and head
    assert len(_deconv_nodes(int8.graph_module)) == 2  # no int8 row: they stay float
    pytest.importorskip("triton")
    from fxopt.passes.lower.triton import lower_to_triton

    monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "1")
    gm = opt.graph_module
    res = lower_to_triton(gm, PassContext(example_inputs=(x,), target="cuda"))
    assert res.modified and len(_deconv_nodes(gm)) == 2
    assert any("conv_transpose2d_act x2" in n for n in res.notes)  # no Triton row: named


def test_conv_transpose_qat_gives_the_weight_a_gradient(decoder):
    model, x, _ = decoder
    qat = fxopt.prepare_qat(model, x, calibration_data=[torch.randn(2, 3, 8, 8)
                                                         for _ in range(3)])
    assert len(_deconv_nodes(qat.graph_module)) == 2  # kept float, run as their decomposition
    out = qat(x)
    out.square().mean().backward()
    for path in ("up.0.weight", "refine.weight"):
        w = qat.graph_module.get_parameter(path)
        assert w.grad is not None and w.grad.abs().sum() > 0, path
