"""``to_channels_last`` keeps the numbers: a value written in place keeps its layout, and
normalizations that lose accuracy on channels-last input read a contiguous copy."""
import torch
import torch.nn as nn

import fxopt


class _ConvGroupNorm(nn.Module):
    """conv -> relu -> GroupNorm(16, 16) -> conv, activations far from zero (bias 1): PyTorch's
    channels-last GroupNorm is ~1e-4 off eager here, the contiguous one exact."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(8, 16, 3, padding=1)
        self.g = nn.GroupNorm(16, 16)
        self.c2 = nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            self.c.weight.mul_(0.1)
            self.c.bias.fill_(1.0)

    def forward(self, x):
        return self.c2(self.g(torch.relu(self.c(x))))


class _WritesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        x.mul_(2)
        return self.c(x)


def _nodes(gm, method):
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == method]


def test_group_norm_reads_a_contiguous_copy():
    torch.manual_seed(0)
    m, x = _ConvGroupNorm().eval(), torch.randn(2, 8, 16, 16)
    opt = fxopt.optimize(m, x, target="cpu")  # raised NumericMismatchError on to_channels_last
    gn = next(n for n in opt.graph_module.graph.nodes if n.op == "call_module" and n.target == "g")
    src = gn.args[0]
    assert src.op == "call_method" and src.target == "contiguous" and not src.kwargs
    with torch.no_grad():
        got, want = opt(x), m(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_input_written_in_place_keeps_its_layout():
    torch.manual_seed(0)
    m, x = _WritesInput().eval(), torch.randn(2, 3, 16, 16)
    before = x.clone()
    opt = fxopt.optimize(m, x, target="cpu")  # a copy before x.mul_ missed the write: 0.5 off
    assert torch.equal(x, before)
    assert not [n for n in _nodes(opt.graph_module, "contiguous")
                if n.kwargs.get("memory_format") is torch.channels_last]
    with torch.no_grad():
        assert torch.equal(opt(x.clone()), m(x.clone()))
