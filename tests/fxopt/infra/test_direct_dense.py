"""``fxopt.infra.direct``'s links through concatenations, pools and int8 batch norms.

A DenseNet block concatenates every earlier layer's output before each layer, then runs an int8
BatchNorm-ReLU on the concat (it cannot fold into a conv). In the direct twin each layer's
output is handed to the concats as one quint8 tensor (oneDNN's codes viewed once by the layer,
``BoundCall.view_out``; PyTorch's quantized kernels' output as it is), each concat hands its
quint8 result to the batch norm, and the pools pass theirs on, instead of a view of the codes
at every use. Here the twin's outputs must stay the graph's: call after call, beyond the
calibrated range, and once a grid the concat reads is written in place (then it must use the
codes, as the graph does)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.direct import BoundCall
from fxopt.quant.config import QuantConfig


def _dense_layer(channels: int, growth: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, growth, 3,
                                                                         padding=1))


class Dense(nn.Module):
    """Stem, max pool, a dense block of three layers, a transition (BN-ReLU, 1x1 conv, average
    pool), one more dense layer, the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.ModuleList(_dense_layer(8 + 4 * i) for i in range(3))
        self.transition = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 8, 1),
                                        nn.AvgPool2d(2))
        self.last = _dense_layer(8)
        self.fc = nn.Linear(12, 10)
        g = torch.Generator().manual_seed(5)
        for m in self.modules():  # BatchNorm statistics away from the identity
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.data.uniform_(0.5, 1.5, generator=g)

    def forward(self, x):
        features = [F.max_pool2d(torch.relu(self.stem(x)), 2)]
        for layer in self.block:
            features.append(layer(torch.cat(features, 1)))
        y = self.transition(torch.cat(features, 1))
        y = torch.cat([y, self.last(torch.cat([y], 1))], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 16, 16, generator=g) for _ in range(n)]


def _optimized(engine: str):
    torch.manual_seed(0)
    cal = _batches()
    return fxopt.optimize(Dense().eval(), cal[0], quantize=QuantConfig(cpu_engine=engine),
                          calibration_data=cal)


def _nodes(opt, name: str) -> list:
    return [n for n in opt.direct._direct.graph.nodes
            if n.op == "call_function" and name in getattr(n.target, "__name__", "")]


@pytest.mark.parametrize("engine", ["auto", "onednn", "x86"])
def test_linked_concats_batch_norms_and_pools_equal_the_graph(engine):
    opt = _optimized(engine)
    with torch.no_grad():
        for seed, gain in ((11, 1.0), (12, 1.0), (13, 6.0), (14, 0.02), (15, -4.0)):
            x = _batches(1, seed=seed)[0] * gain
            assert torch.equal(opt(x), opt.graph_module(x))
    assert opt.direct._proven and opt.direct.enabled
    cats, norms = _nodes(opt, "_cat_cpu"), _nodes(opt, "_batch_norm_cpu")
    assert len(cats) == 6 and len(norms) == 5
    # every concat feeds an int8 batch norm, or the head's pool (not linked)
    assert sum(n.kwargs.get("quantized_out") is True for n in cats) == 5
    pools = _nodes(opt, "_max_pool_cpu") + _nodes(opt, "_avg_pool2d_cpu")
    assert [n.kwargs.get("quantized_out") for n in pools] == [True, True]  # both feed concats
    # the growth layers' outputs go to concats only: each is handed over as quint8
    layers = [n for n in opt.direct._direct.graph.nodes if isinstance(n.target, BoundCall)
              and all("_cat_cpu" in u.target.__name__ for u in n.users)]
    assert len(layers) == 4 and all(n.target.q_out for n in layers)
    if engine != "x86":  # oneDNN's codes, viewed once by the layer where two concats read them
        assert [len(n.users) > 1 for n in layers] == [True, True, False, False]
        assert [n.target.view_out for n in layers] == [True, True, False, False]
        assert all(n.target.y_grid is not None for n in layers)


@pytest.mark.parametrize("engine", ["onednn", "x86"])
def test_a_concat_input_grid_written_in_place_runs_on_the_codes(engine):
    """The concat's grid of a layer's output is a tensor; written in place, it no longer matches
    the grid of the quint8 tensor the layer hands over, so the concat must read the codes on
    the new grid, as the graph does."""
    opt = _optimized(engine)
    x = _batches(1, seed=21)[0]
    with torch.no_grad():
        opt(x), opt(x)
        cat = max(_nodes(opt, "_cat_cpu"), key=lambda n: len(n.args[0]))
        scale = getattr(opt.graph_module, cat.args[1][-1].target)  # the last layer's grid there
        before = opt.graph_module(x)
        scale.mul_(1.5)
        expected = opt.graph_module(x)
        assert not torch.equal(expected, before)
        assert torch.equal(opt(x), expected)
        assert torch.equal(opt(x), expected)
    assert opt.direct._proven and opt.direct.enabled  # the twin ran them, not the graph
