"""fold_bn's identity-branch rule (RepVGG): ``conv(x) + ... + bn(x)`` folds the BN into the
centre tap of the same-map conv beside it; every case is checked against eager by ``run_fold``."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fold_bn_checks import bn_left, randomize_bn, run_fold


class RepBlock(nn.Module):
    """RepVGG's block: relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn_id(x)), its identity BN as a
    module or as F.batch_norm; ``groups``: 1 or depthwise."""

    def __init__(self, c=6, groups=1, functional=False, stride=1, k=3, pad=None):
        super().__init__()
        self.c3 = nn.Conv2d(c, c, k, stride, k // 2 if pad is None else pad, groups=groups,
                            bias=False)
        self.b3 = nn.BatchNorm2d(c)
        self.c1 = nn.Conv2d(c, c, 1, stride, groups=groups, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.bid = nn.BatchNorm2d(c)
        self.functional = functional

    def forward(self, x):
        y = self.b3(self.c3(x)) + self.b1(self.c1(x))
        if self.functional:
            b = self.bid
            return torch.relu(y + F.batch_norm(x, b.running_mean, b.running_var, b.weight,
                                               b.bias, False, 0.1, b.eps))
        return torch.relu(y + self.bid(x))


@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("functional", [False, True])
def test_identity_branch_bn_folds_into_the_conv_beside_it(groups, functional):
    torch.manual_seed(0)
    model = randomize_bn(RepBlock(groups=groups, functional=functional)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 6, 9, 7)
    gm, res, _ = run_fold(nn.Sequential(model, RepBlock(groups=groups)).eval(), x)
    assert res.stats["identity_folded"] == 2 and bn_left(gm) == 0, res.stats
    assert "identity-branch" in res.notes[-1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the identity BN's add is gone: each block sums its two convs, then the ReLU
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "add"]
    assert len(adds) == 2


@pytest.mark.parametrize("kw", [dict(stride=2), dict(k=3, pad=0), dict(k=1)])
def test_identity_bn_left_where_the_centre_tap_is_not_x(kw):
    torch.manual_seed(0)
    model = randomize_bn(RepBlock(**kw)).eval()
    x = torch.randn(2, 6, 8, 8)
    if kw.get("stride") == 2 or kw.get("pad") == 0:  # shapes differ: not even a valid model
        with pytest.raises(RuntimeError):
            model(x)
        return
    # k=1 with padding 0 is a valid same map (its centre tap is x): it folds
    gm, res, _ = run_fold(model, x)
    assert res.stats["identity_folded"] == 1 and bn_left(gm) == 0


class IdentityBNReadTwice(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.other = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        i = self.bn(x)
        return y + i, i * 2, self.other(x) + self.conv(x)  # bn read twice; conv shared


class IdentityBNWrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, dilation=1), nn.BatchNorm2d(4)
        self.dil = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.dil(x) + self.bn2(x)  # dilated: its centre tap is x, but left alone


@pytest.mark.parametrize("model_cls", [IdentityBNReadTwice, IdentityBNWrongShape])
def test_identity_bn_left_alone_when_folding_would_change_another_reader(model_cls):
    torch.manual_seed(0)
    model = randomize_bn(model_cls()).eval()
    x = torch.randn(1, 4, 6, 6)
    gm, res, _ = run_fold(model, x)
    assert "identity_folded" not in res.stats and bn_left(gm) >= 1
