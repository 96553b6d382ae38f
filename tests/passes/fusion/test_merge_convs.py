"""merge_convs: convolutions of one input, summed, become one convolution (RepVGG, ACNet)."""
import copy

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.passes.fusion.merge_convs import kernel_offset


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class RepVGGBlock(nn.Module):
    """conv3x3 + BN, conv1x1 + BN and an identity BN, summed, then ReLU (RepVGG's train-time
    block)."""

    def __init__(self, c=8, groups=1):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False),
                                nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups, bias=False),
                                nn.BatchNorm2d(c))
        self.idn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.k3(x) + self.k1(x) + self.idn(x))


class ACBlock(nn.Module):
    """ACNet's asymmetric branches: 3x3 + 1x3 + 3x1 of one input (biases on)."""

    def __init__(self, c=6):
        super().__init__()
        self.sq = nn.Conv2d(c, c, 3, padding=1)
        self.hor = nn.Conv2d(c, c, (1, 3), padding=(0, 1))
        self.ver = nn.Conv2d(c, c, (3, 1), padding=(1, 0))

    def forward(self, x):
        return self.hor(x) + self.sq(x) + self.ver(x)


def _convs(opt) -> list[nn.Module]:
    return [m for m in opt.graph_module.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("groups", [1, 8])
def test_repvgg_block_becomes_one_conv(groups):
    model = _randomize_bn(nn.Sequential(RepVGGBlock(groups=groups), RepVGGBlock(groups=groups)))
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(1))
    opt = fxopt.optimize(model, x)
    rec = opt.report.record("merge_convs")
    assert rec.stats["merged"] == 2 and rec.status == "ok"
    convs = _convs(opt)
    assert len(convs) == 2 and all(c.kernel_size == (3, 3) for c in convs)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(opt(x), ref, rtol=1e-5, atol=1e-5)
        y = torch.randn(3, 8, 7, 9)  # another shape and batch
        assert torch.allclose(opt(y), model(y), rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model untouched


def test_asymmetric_branches_merge_into_the_square_kernel():
    model = ACBlock().eval()
    x = torch.randn(1, 6, 9, 9, generator=torch.Generator().manual_seed(2))
    opt = fxopt.optimize(model, x, pipeline=["merge_convs"])
    assert opt.report.record("merge_convs").stats["merged"] == 2
    (conv,) = _convs(opt)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    w = model.sq.weight.detach().clone()
    w[:, :, 1:2, :] += model.hor.weight.detach()
    w[:, :, :, 1:2] += model.ver.weight.detach()
    assert torch.allclose(conv.weight, w, atol=1e-6)
    assert torch.allclose(conv.bias, model.sq.bias + model.hor.bias + model.ver.bias, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(opt(x), model(x), rtol=1e-5, atol=1e-5)


class TwoConvs(nn.Module):
    def __init__(self, a: nn.Conv2d, b: nn.Conv2d, *, read_a=False, shared=False,
                 second_input=False):
        super().__init__()
        self.a, self.b = a, (a if shared else b)
        self.read_a, self.second_input = read_a, second_input

    def forward(self, x):
        ya = self.a(x)
        yb = self.b(x * 2 if self.second_input else x)
        return ya + yb + (ya.sum() if self.read_a else 0)


@pytest.mark.parametrize("case", ["stride", "groups", "second reader", "shared module",
                                  "different inputs"])
def test_left_alone(case):
    a = nn.Conv2d(4, 4, 3, padding=1)
    b = nn.Conv2d(4, 4, 1)
    kw = {}
    if case == "stride":  # one output shape (3x3 on a 5x5 input), different positions read
        a, b = nn.Conv2d(4, 4, 1, stride=2), nn.Conv2d(4, 4, 3)
    elif case == "groups":
        b = nn.Conv2d(4, 4, 1, groups=2)
    elif case == "second reader":
        kw["read_a"] = True
    elif case == "shared module":
        kw["shared"] = True
    else:
        kw["second_input"] = True
    model = TwoConvs(a, b, **kw).eval()
    x = torch.randn(1, 4, 5, 5)
    opt = fxopt.optimize(model, x, pipeline=["merge_convs"])
    assert opt.report.record("merge_convs").stats["merged"] == 0
    with torch.no_grad():
        assert torch.allclose(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_kernel_offset():
    k3 = nn.Conv2d(1, 1, 3, padding=1)
    assert kernel_offset(k3, nn.Conv2d(1, 1, 1)) == (1, 1)
    assert kernel_offset(k3, nn.Conv2d(1, 1, (1, 3), padding=(0, 1))) == (1, 0)
    assert kernel_offset(k3, nn.Conv2d(1, 1, 1, padding=1)) == (0, 0)  # reads tap 0's place
    assert kernel_offset(k3, nn.Conv2d(1, 1, 1, padding=2)) is None  # reads outside k3
    assert kernel_offset(nn.Conv2d(1, 1, 3, padding=2, dilation=2),
                         nn.Conv2d(1, 1, 1, dilation=2)) == (1, 1)
    assert kernel_offset(nn.Conv2d(1, 1, 3, padding=1, dilation=2),
                         nn.Conv2d(1, 1, 1, dilation=2)) is None  # half a dilation step


def test_timm_repvgg_merges_every_block():
    timm = pytest.importorskip("timm")
    model = timm.create_model("repvgg_a0").eval()
    x = torch.randn(1, 3, 32, 32)
    opt = fxopt.optimize(model, x)
    assert opt.report.record("merge_convs").stats["merged"] == 22
    assert len(_convs(opt)) == 22
    with torch.no_grad():
        ref = model(x)
        assert (opt(x) - ref).norm() / ref.norm() < 1e-5
