"""fuse_act on convolutions and linear layers: every activation, residual adds, the CPU lowering
and layout, and the fused graph's life after the pass (printing, save/load, torch.compile).
Transposed convolutions: ``test_fuse_act_conv_transpose.py``."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fuse_act_checks import (ACTIVATIONS, CONV1D, CONV2D, LINEAR, LayerAct, TwoUsers,
                             compute_nodes, fused_nodes, run)

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.ir.tolerances import compare_outputs
from fxopt.passes.fusion.fuse_act import fuse_act

LAYERS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 7), CONV2D),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9), CONV1D),
    "linear": (lambda: nn.Linear(5, 6), (3, 5), LINEAR),
}


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
    assert node.target is LINEAR and node.kwargs["act"] == "gelu" and \
        node.args[3].op == "placeholder"
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


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d in short: the weight is standardized in forward (a computed
    weight, constant once folded) and the conv is a functional call."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) * (w[0].numel() ** -0.5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = StdConv(3, 8, 3, padding=1)
        self.b = StdConv(8, 8, 3, padding="same")
        self.c = StdConv(8, 8, 1, bias=False)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.relu(self.b(y) + y)
        return self.c(y)


def test_computed_weight_convs_fuse_and_quantize():
    """Functional convs whose weight constant folding computed (failed on main: fuse_act {},
    lower_convs {}, no int8 conv): fused like conv modules, and so quantized."""
    torch.manual_seed(0)
    model, x = StdNet().eval(), torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(model, x)
    assert opt.report.record("fuse_act").stats == {"conv_fn_act": 1, "conv_fn_add": 1,
                                                   "fused_act": 1}  # relu(conv + y)
    assert opt.report.record("lower_convs").stats == {"lowered_fn": 1}
    assert not any(n.target is torch.conv2d for n in opt.graph_module.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(opt(x), model(x), atol=1e-5)
    q = fxopt.optimize(model, x, quantize="int8", calibration_data=[x])
    assert q.report.record("quantize_int8").stats["conv2d"] == 3


def test_conv_with_a_weight_computed_from_the_input_is_left_alone():
    class Dynamic(nn.Module):
        def forward(self, x, w):
            return F.relu(F.conv2d(x, w))

    gm = fxopt.capture(Dynamic().eval(), (torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3)))
    res = fuse_act(gm, PassContext(example_inputs=()))
    assert res.stats == {}
    assert any("computed in the graph" in n for n in res.notes)


@pytest.mark.slow
def test_nf_resnet26_computed_weight_convs():
    """timm nf_resnet26 (ScaledStdConv2d): 0 of 29 convs fused before, all 29 now; int8 30/30."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = timm.create_model("nf_resnet26", pretrained=False).eval(), torch.randn(1, 3, 64, 64)
    # every conv int8 (min_sqnr_db=None): the default's accuracy target keeps 2 float here
    opt = fxopt.optimize(model, x, quantize=fxopt.QuantConfig(min_sqnr_db=None),
                         calibration_data=[x])
    fused = opt.report.record("fuse_act").stats
    assert fused.get("conv_fn_act", 0) + fused.get("conv_fn_add", 0) == 20
    assert opt.report.record("lower_convs").stats == {"lowered_fn": 9}
    stats = opt.report.record("quantize_int8").stats
    assert stats["conv2d"] == 29 and stats["linear"] == 1
