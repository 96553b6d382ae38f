"""Cases shared by the lower_to_triton tests: the float models whose adds and products stay
after fuse_act, built the same way in every module, and small readers of a lowered graph.

On the path from tests/conftest.py; import it after ``pytest.importorskip("triton")``.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from seeded_models import with_bn_stats

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.passes.lower.triton import lower_to_triton

__all__ = ["ActResBlock", "SEBlock", "act_res", "se", "triton_ops", "lowered", "record",
           "float_res_case", "float_se_case", "Block", "MiniResNet", "mini", "mini_int8"]


class ActResBlock(nn.Module):
    """A float ResNet-like block whose adds stay after fuse_act: the branch ends in its own
    activation (so the add cannot be a convolution's residual), then a per-channel shift (a
    broadcast parameter, written first) and a 1x1 convolution reading the sum."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.shift = nn.Parameter(torch.randn(8, 1, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        y = F.relu(x + y)             # relu(add): one triton_add(act="relu")
        return self.head(self.shift + y)  # b broadcasts to a: the operands swap


def act_res(precision=None):
    return with_bn_stats(ActResBlock, 8, 0.3, (0.5, 2.0), lambda m: (m.bn, m.b1, m.b2))


class SEBlock(nn.Module):
    """conv-bn-relu, then a squeeze-excitation gate (pool, 1x1 conv-relu, 1x1 conv-sigmoid)
    times its input (the gate [N, C, 1, 1] written first), then a same-shape gate and a relu,
    then a 1x1 convolution: fuse_act leaves both products (and the relu) to the lowering."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.attn, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = g * y                                       # the SE gate: the operands swap
        y = F.relu(y * torch.sigmoid(self.attn(y)))     # one triton_mul(act="relu")
        return self.head(y)


def se():
    return with_bn_stats(SEBlock, 12, 0.3, (0.5, 2.0), lambda m: (m.bn,))


def triton_ops(gm) -> Counter:
    return Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("fxopt.triton_"))


def lowered(before, x):
    """(x, ``before``'s graph, a copy of it after lower_to_triton, the pass's result)."""
    gm = copy.deepcopy(before.graph_module)
    result = lower_to_triton(gm, PassContext(example_inputs=(x,), target="cpu"))
    return x, before.graph_module, gm, result


def record(opt, name="lower_to_triton"):
    return next(r for r in opt.report.passes if r.name == name)


def float_res_case():
    """(x, the float graph before lower_to_triton, the graph after, the pass's result)."""
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(9))
    before = fxopt.optimize(act_res(), x, target="cpu", disable=["lower_to_triton"])
    return lowered(before, x)


def float_se_case():
    """(x, the float SE graph before lower_to_triton, the graph after, the pass's result)."""
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(13))
    before = fxopt.optimize(se(), x, target="cpu", disable=["lower_to_triton"])
    return lowered(before, x)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class MiniResNet(nn.Module):
    """ResNet's shape in small: stem, 3x3/2 max pool, an identity and a downsampling block,
    global average pool, fc."""

    def __init__(self, pool_size=1):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.l1 = Block(8, 8, 1)
        self.l2 = Block(8, 16, 2)
        self.avg = nn.AdaptiveAvgPool2d(pool_size)
        self.fc = nn.Linear(16 * pool_size ** 2, 5)

    def forward(self, x):
        x = self.l2(self.l1(self.pool(F.relu(self.bn(self.stem(x))))))
        return self.fc(torch.flatten(self.avg(x), 1))


def mini(pool_size=1):
    return with_bn_stats(lambda: MiniResNet(pool_size), 4, 0.3, (0.5, 2.0))


def mini_int8(pool_size=1, size=23):
    """The int8 MiniResNet: (x, its graph before lower_to_triton, the graph after, the result)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, size, size, generator=g)
    cal = [torch.randn(2, 3, size, size, generator=g) for _ in range(3)]
    before = fxopt.optimize(mini(pool_size), x, quantize="int8", calibration_data=cal,
                            target="cpu", disable=["lower_int8_cpu"])
    return lowered(before, x)
