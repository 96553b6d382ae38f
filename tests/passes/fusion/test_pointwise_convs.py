"""pointwise_convs: Linear layers between a permute to channels-last and its inverse become 1x1
convolutions on NCHW, LayerNorms over the channels are written out along dim 1, and the
permutes go (ConvNeXt's blocks; OpenVINO runs them without transposes)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.convnext import CNBlock, LayerNorm2d

import fxopt
from fxopt.pipelines import build_pipeline


def _tiny_convnext(seed=0):
    """torchvision's own ConvNeXt pieces, small: stem, LayerNorm2d, two CNBlocks, a
    downsampling LayerNorm2d + conv, one more CNBlock, the head (LayerNorm2d, Linear)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=4), LayerNorm2d(16),
        CNBlock(16, 0.5, 0.0), CNBlock(16, 0.5, 0.0),
        LayerNorm2d(16), nn.Conv2d(16, 32, 2, stride=2),
        CNBlock(32, 0.5, 0.0),
        nn.AdaptiveAvgPool2d(1), LayerNorm2d(32), nn.Flatten(1), nn.Linear(32, 10))
    for m in model.modules():  # layer scales and LayerNorm affines away from 1 and 0
        if isinstance(m, CNBlock):
            m.layer_scale.data = torch.rand_like(m.layer_scale) + 0.5
        if isinstance(m, nn.LayerNorm):
            m.weight.data = torch.rand_like(m.weight) + 0.5
            m.bias.data = torch.randn_like(m.bias) * 0.2
    return model.eval()


class TimmBlock(nn.Module):
    """timm's ConvNeXt block (conv_mlp=False): permute by method, F.layer_norm with the
    module's own weight, Linear, GELU, Linear, ``x.mul(gamma)`` with gamma of shape (C,),
    permute back, shortcut."""

    def __init__(self, c=12):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm_w = nn.Parameter(torch.rand(c) + 0.5)
        self.norm_b = nn.Parameter(torch.randn(c) * 0.1)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (self.fc1.in_features,), self.norm_w, self.norm_b, 1e-6)
        y = self.fc2(F.gelu(self.fc1(y))).mul(self.gamma)
        return x + y.permute(0, 3, 1, 2)


def _permutes(opt) -> int:
    return sum(1 for n in opt.graph_module.graph.nodes if n.target in (torch.permute, "permute"))


def _linears(opt) -> int:
    return sum(1 for m in opt.graph_module.modules() if isinstance(m, nn.Linear))


def test_convnext_blocks_lose_their_permutes_and_keep_their_values():
    model = _tiny_convnext()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    opt = fxopt.optimize(model, x, passes=["pointwise_convs"], check="each")
    rec = opt.report.record("pointwise_convs")
    # 3 blocks: fc1 and fc2 each; LayerNorms: 3 blocks' + 3 LayerNorm2d; 2 permutes each
    assert rec.status == "ok"
    assert rec.stats == {"linear_to_conv": 6, "layer_norm": 6, "permutes": 12}
    assert _permutes(opt) == 0 and _linears(opt) == 1  # the head's Linear reads a 2-D value
    convs = [m for m in opt.graph_module.modules() if isinstance(m, nn.Conv2d)
             and m.kernel_size == (1, 1)]
    assert len(convs) == 6
    with torch.no_grad():
        assert torch.allclose(opt(x), model(x), rtol=1e-5, atol=1e-5)
        y = torch.randn(3, 3, 48, 40)  # another batch and size
        assert torch.allclose(opt(y), model(y), rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model untouched


def test_the_1x1_conv_shares_the_linear_weight_and_trains_like_it():
    model = _tiny_convnext()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    opt = fxopt.optimize(model, x, passes=["pointwise_convs"])
    conv = opt.graph_module.get_submodule("2.block.3")  # CNBlock's first Linear, by its path
    assert isinstance(conv, nn.Conv2d) and not conv.training
    assert torch.equal(conv.weight.flatten(1), model[2].block[3].weight)
    # gradients: to the input and to the weights, as eager's
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    opt(xa).square().sum().backward()
    model(xb).square().sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(conv.weight.grad.flatten(1), model[2].block[3].weight.grad,
                          rtol=1e-4, atol=1e-5)


def test_timm_spelling_with_a_per_channel_gamma():
    torch.manual_seed(3)
    model = nn.Sequential(TimmBlock(), TimmBlock()).eval()
    x = torch.randn(2, 12, 14, 14, generator=torch.Generator().manual_seed(4))
    opt = fxopt.optimize(model, x, passes=["pointwise_convs"], check="each")
    assert opt.report.record("pointwise_convs").stats == {
        "linear_to_conv": 4, "layer_norm": 2, "permutes": 4}
    assert _permutes(opt) == 0
    with torch.no_grad():
        assert torch.allclose(opt(x), model(x), rtol=1e-5, atol=1e-5)


class Chain(nn.Module):
    """permute, LayerNorm, Linear, permute back, with one thing about it that the pass must
    leave alone (``case``)."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.norm = nn.LayerNorm((5, 8) if case == "layer norm over two dims" else 8)
        self.fc = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 8)
        if case == "tied weight":  # the chain's Linear shares its weight with another layer
            self.tied.weight = self.fc.weight

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        if self.case == "other permute":
            y = x.permute(0, 3, 2, 1)
        z = self.fc(self.norm(y))
        if self.case == "shared linear":
            z = self.fc(z)
        if self.case == "second reader":
            return z.permute(0, 3, 1, 2), z.sum()
        if self.case == "no inverse permute":
            return z.mean(dim=(1, 2))
        if self.case == "per-row constant":
            z = z * torch.arange(5.0).view(5, 1)
        if self.case == "other permute":
            return z.permute(0, 3, 2, 1)
        out = z.permute(0, 3, 1, 2)
        if self.case == "shared layer norm":  # the LayerNorm module is called again elsewhere
            return out + self.norm(x.mean(dim=(2, 3)))[..., None, None]
        if self.case == "tied weight":
            return out + self.tied(x.mean(dim=(2, 3)))[..., None, None]
        if self.case == "weight read elsewhere":  # the Linear's weight, read by the forward
            return out + F.linear(x.mean(dim=(2, 3)), self.fc.weight)[..., None, None]
        return out


@pytest.mark.parametrize("case", ["second reader", "no inverse permute", "other permute",
                                  "layer norm over two dims", "shared linear",
                                  "per-row constant", "shared layer norm", "tied weight",
                                  "weight read elsewhere", "float64"])
def test_left_alone(case):
    torch.manual_seed(5)
    model = Chain(case).eval()
    x = torch.randn(2, 8, 5, 5)
    if case == "float64":
        model, x = model.double(), x.double()
    opt = fxopt.optimize(model, x, passes=["pointwise_convs"])
    rec = opt.report.record("pointwise_convs")
    assert not rec.stats and rec.status == "ok"
    assert _linears(opt) == (2 if case == "tied weight" else 1)
    with torch.no_grad():
        for a, b in zip(torch.utils._pytree.tree_leaves(opt(x)),
                        torch.utils._pytree.tree_leaves(model(x))):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_saved_and_loaded(tmp_path):
    model = _tiny_convnext()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    opt = fxopt.optimize(model, x, passes=["pointwise_convs"])
    back = fxopt.load(opt.save(tmp_path / "m.fxopt"))
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))


def test_only_openvino_runs_it_by_default():
    names = build_pipeline("default", target="openvino", quantize=True)
    assert names.index("pointwise_convs") == names.index("fuse_act") - 1
    for target in ("cpu", "onnxruntime", "cuda"):
        assert "pointwise_convs" not in build_pipeline("default", target=target)


def test_openvino_float_and_int8():
    pytest.importorskip("openvino")
    model = _tiny_convnext()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    calib = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i))
             for i in range(4)]
    opt = fxopt.optimize(model, x, target="openvino")
    assert opt.report.record("pointwise_convs").stats["linear_to_conv"] == 6
    with torch.no_grad():
        ref, y = model(x), torch.randn(3, 3, 32, 32)
        assert torch.allclose(opt(x), ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(opt(y), model(y), rtol=1e-5, atol=1e-5)  # the dynamic file
        q = fxopt.optimize(model, x, target="openvino", quantize="int8",
                           calibration_data=calib)
        out = q(x)
    assert q.report.record("pointwise_convs").stats["linear_to_conv"] == 6
    assert q.report.engine["int8"] and q.report.engine["check"]["batches"] == [1, 2]
    sqnr = 10 * torch.log10(ref.square().mean() / (out - ref).square().mean())
    assert sqnr > 20, sqnr


@pytest.mark.slow
def test_torchvision_convnext_tiny_on_openvino():
    pytest.importorskip("openvino")
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny().eval()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 3, 224, 224, generator=g)
    calib = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(4)]
    held = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        ref = model(held)
        for kw in ({}, {"quantize": "int8", "calibration_data": calib}):
            opt = fxopt.optimize(model, x, target="openvino", **kw)
            assert opt.report.record("pointwise_convs").stats == {
                "linear_to_conv": 36, "layer_norm": 23, "permutes": 46}
            assert _permutes(opt) == 0
            out = opt(held)  # batch 2: the dynamic file
            sqnr = 10 * torch.log10(ref.square().mean() / (out - ref).square().mean())
            assert sqnr > (20 if kw else 80), (kw, sqnr)
