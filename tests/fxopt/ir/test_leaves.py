"""Automatic leaves (fxopt/ir/leaves.py): a submodule symbolic tracing cannot go through runs as
one opaque call; the report names it and what it costs; pruning and int8 work around it."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.boundary import copy_model
from fxopt.ir.capture import capture_model
from fxopt.ir.leaves import layer_counts


class PadSame(nn.Module):
    """Conv2dSame-like: the padding is computed from the input's size in Python."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        pad = 1 if x.shape[-1] % 2 == 0 else 0  # a branch on a traced size: fx stops here
        return self.conv(F.pad(x, (0, pad + 1, 0, pad + 1)))


class Outer(nn.Module):
    """Traceable itself; only its ``inner`` is not: the innermost module becomes the leaf."""

    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1)
        self.inner = PadSame(c)

    def forward(self, x):
        return self.inner(F.relu(self.proj(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.block = Outer(16)
        self.head = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.stem(x))))
        x = F.relu(self.bn2(self.head(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


X = torch.randn(2, 3, 16, 16)


def model():
    torch.manual_seed(0)
    return Net().eval()


def test_untraceable_submodule_becomes_a_leaf():
    m = model()
    captured = capture_model(copy_model(m), (X,))
    gm = captured.gm
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "block.inner" in calls and "block.proj" in calls  # innermost only, Outer traced
    assert [leaf.path for leaf in captured.leaves] == ["block.inner"]
    leaf = captured.leaves[0]
    assert leaf.type_name == "PadSame" and leaf.layers == {"conv": 1, "linear": 0, "bn": 0}
    assert leaf.params == 16 * 16 * 9 + 16
    assert any("opaque" in n and "'block.inner'" in n for n in captured.notes)
    with torch.no_grad():
        assert torch.allclose(gm(X), m(X), atol=1e-6)


def test_auto_leaves_off_raises_with_the_hint():
    with pytest.raises(fxopt.CaptureError, match="block.inner") as e:
        fxopt.capture(model(), X, auto_leaves=False)
    assert "leaf_modules=[PadSame]" in e.value.hint


def test_user_leaf_modules_win():
    """The user's leaves are leaves from the first attempt: nothing is found automatically."""
    captured = capture_model(copy_model(model()), (X,), leaf_modules=["block"])
    assert captured.leaves == []
    assert "block" in {n.target for n in captured.gm.graph.nodes if n.op == "call_module"}


def test_failure_in_the_model_itself_still_raises():
    class Root(nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[0] > 1 else x

    with pytest.raises(fxopt.CaptureError, match="data-dependent"):
        fxopt.capture(Root().eval(), X)


def test_optimize_reports_the_opaque_module_and_its_cost():
    m = model()
    opt = fxopt.optimize(m, X, capture="symbolic_trace")  # "auto" inlines it (below)
    report = opt.report
    assert report.capture["method"] == "symbolic_trace"
    assert [d["path"] for d in report.capture["opaque"]] == ["block.inner"]
    assert report.capture["opaque"][0]["layers"]["conv"] == 1
    assert any("not folded, fused, pruned or quantized" in n for n in report.notes)
    assert report.record("fold_bn").stats["folded"] == 2
    with torch.no_grad():
        assert torch.allclose(opt(X), m(X), atol=1e-4)


def test_prune_freezes_the_leaf_boundary():
    """Channels into and out of the leaf are frozen: the leaf's conv keeps its shape, the
    rest is pruned, and the pruned model matches its masked reference (optimize checks it)."""
    m = model()
    opt = fxopt.optimize(m, X, prune=0.5, capture="symbolic_trace")
    gm = opt.graph_module
    assert gm.get_submodule("block.inner").conv.weight.shape == (16, 16, 3, 3)
    assert opt.report.after.params < opt.report.before.params  # head/fc pruned around it
    assert opt(X).shape == (2, 10)


def test_int8_quantizes_around_the_leaf():
    m = model()
    batches = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    opt = fxopt.optimize(m, X, quantize="int8", calibration_data=batches,
                         capture="symbolic_trace")
    gm = opt.graph_module
    assert "block.inner" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert opt.report.int8 is not None and opt.report.int8["sqnr_db"] > 15
    assert layer_counts(gm.get_submodule("block.inner"))["conv"] == 1  # stays float inside


def test_auto_inlines_the_leaf_through_export():
    """capture="auto": the leaf is captured with torch.export on the inputs it saw and inlined,
    so its conv is fused and quantized like the others."""
    m = model()
    opt = fxopt.optimize(m, X)
    assert opt.report.capture == {"method": "symbolic_trace", "opaque": [],
                                  "inlined": ["block.inner"], "input_shapes": [list(X.shape)]}
    assert any("inlined: block.inner" in n for n in opt.report.notes)
    gm = opt.graph_module
    assert "block.inner" not in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert any(n.meta.get("fxopt_path", "").startswith("block.inner") and n.op == "call_function"
               and "conv2d_act" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(opt(X), m(X), atol=1e-4)
    batches = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    q = fxopt.optimize(m, X, quantize="int8", calibration_data=batches)
    assert q.report.record("quantize_int8").stats["conv2d"] == 4  # the leaf's conv too


TIMM_UNTRACEABLE = ["tf_efficientnet_b0", "vgg11_bn", "mobilevit_xxs", "efficientvit_b0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_UNTRACEABLE)
def test_timm_models_that_stopped_at_capture(name):
    """Issue 15: these stopped at capture; now the default pipeline, prune=0.5 and int8 run,
    with the untraceable modules (Conv2dSame, ConvMlp, MobileVitBlock, LiteMLA) inlined through
    torch.export. symbolic_trace alone keeps them opaque leaves."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    opt = fxopt.optimize(m, x)
    cap = opt.report.capture
    assert cap["opaque"] == []  # each leaf inlined through torch.export
    assert cap["inlined"] or cap["method"] == "export"
    assert opt.report.record("fold_bn").stats["left"] == 0
    pruned = fxopt.optimize(m, x, prune=0.5)
    assert pruned.report.after.params <= pruned.report.before.params
    q = fxopt.optimize(m, x, quantize="int8", calibration_data=[x])
    assert q.report.int8 is not None
    leaves = fxopt.optimize(m, x, capture="symbolic_trace").report.capture["opaque"]
    assert leaves and all(d["path"] for d in leaves)
