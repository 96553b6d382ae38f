"""Channel rules of contractions and attention (fxopt/prune/rules_attention.py).

The pruning of the same models against their masked reference runs in
tests/passes/prune/test_prune_channels.py (the ``attention_*`` rows of prune_zoo).
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.prune.channels import analyze_channels, channel_groups
from fxopt.prune.rules_attention import parse_einsum
from fxopt.prune.walk import Unsupported

import prune_zoo as zoo  # noqa: E402  (tests/support, on the path from tests/conftest.py)


def analysis_of(name):
    return analyze_channels(fxopt.capture(*zoo.make(name)))


@pytest.mark.parametrize("name", ["attention_matmul", "attention_sdpa", "attention_einsum"])
def test_qkv_head_dims_are_units_through_the_contraction(name):
    a = analysis_of(name)
    assert a.walk.unknown_ops == {}
    g = {gr.name: gr for gr in a.groups}
    qkv = g["attn.qkv"]
    # [48] -> [3, heads=2, d=8]: head dim j of q, k and v in both heads is one unit
    assert not qkv.frozen and (qkv.channels, qkv.units) == (48, 8)
    assert set(qkv.unit_widths) == {6}
    # the stream (stem, class token, position embedding, proj, fc2) is one prunable group
    assert not g["stem"].frozen and {"proj", "fc2"} <= {p.split(".")[-1] for p in
                                                          g["stem"].layers}


def test_sdpa_keeps_its_scale_when_the_head_dim_shrinks():
    model, x = zoo.make("attention_sdpa")
    opt = fxopt.optimize(model, x, pipeline=["prune_channels"], prune=0.5)
    [node] = [n for n in opt.graph_module.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert node.args[0].meta["tensor_meta"].shape[-1] == 4  # 8 head dims -> 4
    assert node.kwargs["scale"] == pytest.approx(1 / math.sqrt(8))


class ContractWithWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = zoo.cbr(3, 8)
        self.w = nn.Parameter(torch.rand(8, 8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.einsum("nchw,cd->ndhw", self.a(x), self.w))


class CrossCovariance(nn.Module):
    """XCiT/EdgeNeXt: q @ k^T over tokens leaves two channel dims in the output."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.q(x).transpose(-2, -1) @ self.k(x)  # [B, 8, 8]
        return self.head(a.softmax(-1).sum(1))


def test_a_contraction_with_a_tensor_that_cannot_shrink_freezes():
    g = {gr.name: gr for gr in channel_groups(zoo.randomize(ContractWithWeight()),
                                               zoo.X).groups}
    assert g["a.0"].frozen
    assert "contracted with a tensor that cannot shrink" in g["a.0"].reasons[0]


def test_two_pruned_dims_in_one_output_freeze_one():
    graph = channel_groups(CrossCovariance().eval(), torch.randn(2, 5, 8))
    g = {gr.name: gr for gr in graph.groups}
    assert g["k"].frozen and "a second pruned dim" in g["k"].reasons[0]
    assert not g["q"].frozen or "a second pruned dim" not in " ".join(g["q"].reasons)


@pytest.mark.parametrize("eq, ndims, letters, out", [
    ("bhid,bhjd->bhij", [4, 4], ["bhid", "bhjd"], "bhij"),
    ("...id,...jd->...ij", [4, 3], ["abid", "bjd"], "abij"),
    ("ij,jk", [2, 2], ["ij", "jk"], "ik"),
])
def test_parse_einsum(eq, ndims, letters, out):
    got_letters, got_out = parse_einsum(eq, ndims)
    assert got_letters == letters and got_out == out


def test_parse_einsum_refuses_a_trace():
    with pytest.raises(Unsupported):
        parse_einsum("ii->i", [2])


class SwinBlock(nn.Module):
    """torchvision's shifted window attention (V1: the scale follows the head dim) on a
    channels-last stream, shifted windows and their mask included."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        from torchvision.models.swin_transformer import ShiftedWindowAttention

        self.stem = nn.Linear(3, c)
        self.norm = nn.LayerNorm(c)
        self.attn = ShiftedWindowAttention(c, [4, 4], [2, 2], heads)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        s = self.stem(x)
        s = s + self.attn(self.norm(s))
        return self.head(s.mean((1, 2)))


def test_swin_window_attention_prunes_head_dims_with_the_stream():
    pytest.importorskip("torchvision")
    model = zoo.randomize(SwinBlock())
    with torch.no_grad():  # a non-zero relative position bias
        model.attn.relative_position_bias_table.normal_(0, 0.5)
    x = torch.randn(2, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    graph = channel_groups(model, x)
    g = {gr.name: gr for gr in graph.groups}
    assert not g["stem"].frozen and g["stem"].units == 8  # head dim j of both heads
    opt = fxopt.optimize(model, x, pipeline=["prune_channels"], prune=0.5)
    rec = opt.report.record("prune_channels")
    assert rec.status == "ok" and rec.modified and rec.rel_err <= rec.tolerance
    params = dict(opt.graph_module.named_parameters())
    assert params["attn.qkv.weight"].shape == (24, 8)  # 2 heads of dim 4, q/k/v


class SwinMerge(nn.Module):
    """Two Swin stages' worth of stream: a stem, torchvision's PatchMerging (V1 and V2: the
    four strided slices concatenated along the channels, LayerNorm, Linear 4C -> 2C), a head."""

    def __init__(self, merging, c=8):
        super().__init__()
        self.stem = nn.Linear(3, c)
        self.merge = merging(c)
        self.head = nn.Linear(2 * c, 4)

    def forward(self, x):
        return self.head(self.merge(torch.relu(self.stem(x))).mean((1, 2)))


@pytest.mark.parametrize("version", ["PatchMerging", "PatchMergingV2"])
def test_swin_patch_merging_prunes_the_stream_before_it(version):
    """Failed before the rule: the stream before each PatchMerging was frozen ("unsupported op
    torchvision.models.swin_transformer._patch_merging_pad"), stages 1-3 of swin_t unpruned
    (params ratio 0.462 at prune=0.5, now 0.257). Each stream channel is read four times by the
    merge's LayerNorm and Linear: all four go with it."""
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    model = zoo.randomize(SwinMerge(getattr(tv, version)))
    x = torch.randn(2, 6, 6, 3, generator=torch.Generator().manual_seed(0))  # odd: padded
    g = {gr.name: gr for gr in channel_groups(model, x).groups}
    assert not g["stem"].frozen and g["stem"].units == 8
    opt = fxopt.optimize(model, x, pipeline=["prune_channels"], prune=0.5)
    rec = opt.report.record("prune_channels")
    assert rec.status == "ok" and rec.modified and rec.rel_err <= rec.tolerance
    params = dict(opt.graph_module.named_parameters())
    assert params["stem.weight"].shape == (4, 3)
    assert params["merge.reduction.weight"].shape[1] == 16  # 4 slices x 4 kept channels
    if version == "PatchMerging":  # V1 normalizes the 4C slices, V2 the reduction's output
        assert params["merge.norm.weight"].shape == (16,)
