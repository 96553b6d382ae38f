"""Structured pruning on real architectures (torchvision, random weights, 64x64 inputs).

Acceptance (issue 4): at ratio 0.5 each model prunes, passes the masked-reference check, and
reports its pruned and frozen groups; resnet18, resnet50, mobilenet_v2 and vgg11_bn freeze only
the classifier. BatchNorm statistics are randomized so that the pruned channels matter.
"""

import pytest
import torch

import fxopt
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.pipelines import expand_pipeline
from fxopt.prune.config import PruneConfig
from fxopt.ir.tolerances import rel_err

torchvision = pytest.importorskip("torchvision")

import prune_zoo as zoo  # noqa: E402  (tests/support, on the path from tests/conftest.py)

ONLY_CLASSIFIER_FROZEN = {"resnet18": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1",
                          "vgg11_bn": "classifier.6"}
# fast enough for the default run (a few seconds each on 2 cores); the rest are marked slow
FAST = ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"]
SLOW = ["resnet50", "vgg11_bn", "densenet121", "efficientnet_b0", "regnet_x_400mf", "googlenet",
        "convnext_tiny"]
ALL = FAST + SLOW
GROUPS_FAST = FAST + ["resnet50", "vgg11_bn"]


def build(name):
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    return zoo.randomize(getattr(torchvision.models, name)(**kwargs))


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", GROUPS_FAST + [pytest.param(n, marks=pytest.mark.slow)
                                                for n in ALL if n not in GROUPS_FAST])
def test_groups(name):
    graph = fxopt.channel_groups(build(name), X[:1])
    assert len(graph.prunable) >= 10
    assert all(g.reasons for g in graph.frozen)
    if name in ONLY_CLASSIFIER_FROZEN:
        assert [g.name for g in graph.frozen] == [ONLY_CLASSIFIER_FROZEN[name]]
        assert graph.frozen[0].reasons == ["reaches the model output"]


def _prune(name):
    model = build(name)
    gm = fxopt.capture(model, X)
    gm.eval()
    ctx = PassContext(example_inputs=(X,), configs=[PruneConfig(ratio=0.5)])
    out, report = PassManager(expand_pipeline(["prune_channels"]), check="each").run(gm, ctx)
    rec = report.record("prune_channels")
    assert rec.status == "ok" and rec.modified, rec.notes
    assert rec.rel_err <= rec.tolerance
    stats = rec.stats
    assert stats["pruned"] >= 10 and stats["pruned"] + stats["frozen"] <= stats["groups"]
    assert stats["channels_after"] < 0.75 * stats["channels_before"]
    assert rec.params_after < 0.6 * rec.params_before
    with torch.no_grad():
        assert rel_err(out(X), model(X)) > 1e-4  # pruning changed the output: the check bit
    if name in ONLY_CLASSIFIER_FROZEN:
        assert stats["frozen"] == 1, rec.notes
    return rec


@pytest.mark.parametrize("name", FAST)
def test_prune_half(name):
    _prune(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_prune_half_slow(name):
    _prune(name)
