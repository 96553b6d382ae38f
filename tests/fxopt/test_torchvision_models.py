"""Real architectures through capture and the default pipeline, checked against eager.

The default run covers a few models at small inputs; ``-m slow`` runs all twelve at 224x224.
"""
import pytest
import torch

import fxopt
from fxopt.ir.tolerances import compare_outputs

torchvision = pytest.importorskip("torchvision")

ALL = ["alexnet", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121",
       "vgg11_bn", "squeezenet1_0", "shufflenet_v2_x1_0", "regnet_x_400mf", "convnext_tiny",
       "vit_b_16"]
FAST = {"resnet18": 64, "mobilenet_v2": 64, "shufflenet_v2_x1_0": 64, "squeezenet1_0": 64}


def _model(name):
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None).eval()
    # non-default BatchNorm statistics: the defaults (mean 0, var 1) hide folding mistakes
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def _check(name, size):
    m = _model(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = m(x)
    opt = fxopt.optimize(m, x)
    with torch.no_grad():
        out = opt(x)
    stats = compare_outputs(out, ref)
    assert stats.ok, f"{name}: rel err {stats.rel_err:.2e} vs eager ({stats.reason})"
    rep = opt.report
    assert rep.after.params <= rep.before.params
    assert rep.before.macs > 0
    assert all(r.status == "ok" for r in rep.passes), [(r.name, r.status) for r in rep.passes]
    # another input than the one the checks ran on
    x2 = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert compare_outputs(opt(x2), m(x2)).ok


@pytest.mark.parametrize("name", sorted(FAST))
def test_default_pipeline_small(name):
    _check(name, FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_default_pipeline_224(name):
    _check(name, 224)
