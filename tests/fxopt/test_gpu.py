"""The pipeline on a CUDA device (skipped without one): outputs equal eager, saves and loads."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.tolerances import compare_outputs, strict_fp32

pytestmark = pytest.mark.gpu


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)) + y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _net():
    m = Net().eval()
    for bn in (m.b1, m.b2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.cuda()


def test_default_pipeline_on_cuda(tmp_path):
    m = _net()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    opt = fxopt.optimize(m, x)
    assert opt.target == "cuda"
    with torch.no_grad(), strict_fp32():  # float32 math on both sides, not TF32 rounding
        assert compare_outputs(opt(x), m(x)).ok
    assert any("fxopt" in str(n.target) for n in opt.graph_module.graph.nodes)
    back = fxopt.load(opt.save(tmp_path / "m.fxopt")).cuda()
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))


def test_resnet18_on_cuda():
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.resnet18().eval().cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    opt = fxopt.optimize(m, x, prune=0.5)
    assert opt.report.after.params < opt.report.before.params
    assert all(r.status == "ok" for r in opt.report.passes)
