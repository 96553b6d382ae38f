"""fuse_act on transposed convolutions (``conv_transpose2d_act``): every case of the layer with
an activation, the residual add, what is left alone, and the fused op through everything its
schema promises (the pipeline, MACs, pictures, ONNX, int8 and Triton leaving it float, QAT).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fuse_act_checks import (ACTIVATIONS, DECONV, LayerAct, TwoUsers, compute_nodes, fused_nodes,
                             run)

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.ir.metrics import count_macs
from fxopt.ir.tolerances import compare_outputs
from fxopt.ops.fused import CONV_TRANSPOSE2D_ACT
from fxopt.passes.fusion.fuse_act import fuse_act

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
    # every quantizable layer int8 (unseeded batches: near the default's accuracy target)
    int8 = fxopt.optimize(model, x, quantize=fxopt.QuantConfig(min_sqnr_db=None),
                          calibration_data=batches)
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
