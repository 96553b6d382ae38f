"""fold_bn + fuse_act on real architectures: no foldable BatchNorm left, outputs equal eager.

The default run covers three models at 64x64; ``-m slow`` runs all ten.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.tolerances import compare_outputs
from fxopt.passes.fusion.fold_bn import LAYER_TYPES

torchvision = pytest.importorskip("torchvision")

ALL = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
       "regnet_x_400mf", "densenet121", "googlenet", "vgg11_bn", "shufflenet_v2_x1_0"]
FAST = ["resnet18", "mobilenet_v3_small", "googlenet"]
FUSED = (torch.ops.fxopt.conv1d_act.default, torch.ops.fxopt.conv2d_act.default,
         torch.ops.fxopt.linear_act.default)


def _model(name):
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    m = torchvision.models.get_model(name, weights=None, **kw).eval()
    for mod in m.modules():  # random statistics: the defaults (mean 0, var 1) hide mistakes
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    return m


def _bn_nodes(gm):
    return [n for n in gm.graph.nodes
            if (n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                      nn.modules.batchnorm._BatchNorm))
            or (n.op == "call_function" and n.target is F.batch_norm)]


def _foldable(gm):
    """BNs whose input is a conv/linear module output read by nothing else."""
    out = []
    for n in _bn_nodes(gm):
        src = n.args[0]
        if (src.op == "call_module" and type(gm.get_submodule(src.target)) in LAYER_TYPES
                and len(src.users) == 1):
            out.append(n)
    return out


def _check(name, size=64):
    model = _model(name)
    x = torch.randn(1, 3, size, size)
    captured = fxopt.capture(model, x)
    foldable = len(_foldable(captured))
    opt = fxopt.optimize(model, x, pipeline=["fold_bn", "fuse_act"])
    gm = opt.graph_module
    rep = opt.report
    assert all(r.status == "ok" for r in rep.passes), [(r.name, r.status, r.notes) for r in rep.passes]
    fold = rep.record("fold_bn")
    assert fold.stats["folded"] == foldable > 0
    assert _foldable(gm) == []
    # what is left are BNs that do not follow a layer (DenseNet's pre-activation BNs)
    assert len(_bn_nodes(gm)) == len(_bn_nodes(captured)) - foldable
    assert rep.after.params < rep.before.params and rep.after.bytes < rep.before.bytes
    assert rep.after.macs == rep.before.macs
    assert sum(1 for n in gm.graph.nodes if n.target in FUSED) > 0
    with torch.no_grad():
        for inp in (x, torch.randn(2, 3, size, size)):  # another batch size than the checked one
            stats = compare_outputs(opt(inp), model(inp))
            assert stats.ok, f"{name}: rel err {stats.rel_err:.2e} vs eager"


@pytest.mark.parametrize("name", FAST)
def test_fold_and_fuse(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ALL) - set(FAST)))
def test_fold_and_fuse_slow(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_fold_and_fuse_224(name):
    _check(name, 224)
