"""capture="export" (fxopt/ir/export_capture.py): torch.export's graph in fxopt's IR, so every
pass runs unchanged; the same pass results as the symbolic trace where both work; "auto" falls
back to it; dynamic batch; typed refusals for what it does not handle yet."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.boundary import copy_model
from fxopt.ir.export_capture import capture_exported
from fxopt.ir.metrics import count_macs


class Net(nn.Module):
    """Conv/BN/ReLU, a residual add, pooling, flatten, linear: every fusion rule's input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.bn2(self.conv(y)) + y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class ShapeBranch(Net):
    """A branch on the input's size in the model's own forward: symbolic_trace stops there
    and no submodule can be made a leaf; torch.export takes the example's side."""

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


X = torch.randn(2, 3, 16, 16)


def model(cls=Net):
    torch.manual_seed(0)
    m = cls().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return m


def counts(opt):
    keep = ("fold_bn", "fuse_act", "lower_convs", "prune_channels", "quantize_int8")
    drop = ("sqnr_db", "max_abs_err", "output_step", "top1_agreement")
    return {p.name: {k: v for k, v in p.stats.items() if k not in drop}
            for p in opt.report.passes if p.name in keep}


def test_exported_graph_follows_fxopt_conventions():
    m = model()
    captured = capture_exported(copy_model(m), (X,))
    gm = captured.gm
    assert captured.method == "export"
    mods = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes
            if n.op == "call_module"}
    assert mods == {"stem": nn.Conv2d, "conv": nn.Conv2d, "fc": nn.Linear}
    for n in gm.graph.nodes:
        assert "fxopt_from" in n.meta and "fxopt_path" in n.meta
        if n.op not in ("output",):
            assert "tensor_meta" in n.meta or n.meta.get("fxopt_nontensor"), n.name
    assert all(not str(n.target).startswith("aten") for n in gm.graph.nodes)  # all mapped
    assert {n.meta["fxopt_path"] for n in gm.graph.nodes if n.op == "call_module"} == set(mods)
    with torch.no_grad():
        assert torch.allclose(gm(X), m(X), atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"prune": 0.5}], ids=["default", "prune"])
def test_same_pass_results_as_symbolic_trace(kw):
    m = model()
    traced = fxopt.optimize(m, X, capture="symbolic_trace", **kw)
    exported = fxopt.optimize(m, X, capture="export", **kw)
    assert exported.report.capture["method"] == "export"
    assert counts(exported) == counts(traced)
    assert counts(exported)["fold_bn"]["folded"] == 2
    assert exported.report.after.params == traced.report.after.params
    with torch.no_grad():
        assert torch.allclose(exported(X), traced(X), atol=1e-5)


def test_same_int8_as_symbolic_trace():
    m = model()
    batches = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    traced = fxopt.optimize(m, X, capture="symbolic_trace", quantize="int8",
                            calibration_data=batches)
    exported = fxopt.optimize(m, X, capture="export", quantize="int8", calibration_data=batches)
    assert counts(exported) == counts(traced)
    assert counts(exported)["quantize_int8"]["conv2d"] == 2
    with torch.no_grad():
        assert torch.equal(exported(X), traced(X))


def test_auto_falls_back_to_export_when_the_forward_cannot_be_traced():
    m = model(ShapeBranch)
    x = torch.randn(2, 3, 15, 15)
    with pytest.raises(fxopt.CaptureError, match="data-dependent"):
        fxopt.optimize(m, x, capture="symbolic_trace")
    opt = fxopt.optimize(m, x)  # capture="auto"
    assert opt.report.capture["method"] == "export"
    assert any("torch.export instead" in n for n in opt.report.notes)
    assert opt.report.record("fold_bn").stats["folded"] == 2
    with torch.no_grad():
        assert torch.allclose(opt(x), m(x), atol=1e-4)


class BigUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 16, 3, padding=1))

    def forward(self, x):
        return self.body(x) if x.shape[0] > 0 else x


class MostlyOpaque(Net):
    def __init__(self):
        super().__init__()
        self.big = BigUntraceable()

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.big(self.stem(x)), 1), 1))


def test_auto_inlines_a_leaf_holding_most_parameters():
    """The leaf symbolic tracing needed holds most of the parameters: "auto" inlines it
    through torch.export, so its BN folds; "symbolic_trace" keeps it opaque."""
    m = model(MostlyOpaque)
    opt = fxopt.optimize(m, X)
    assert opt.report.capture["opaque"] == []
    assert opt.report.record("fold_bn").stats["folded"] == 1  # big.body's BN
    traced = fxopt.optimize(m, X, capture="symbolic_trace")
    assert [d["path"] for d in traced.report.capture["opaque"]] == ["big"]
    assert traced.report.record("fold_bn").stats["folded"] == 0


def test_dynamic_batch():
    m = model()
    captured = capture_exported(copy_model(m), (X,), dynamic_batch=True)
    x5 = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(captured.gm(x5), m(x5), atol=1e-5)


@pytest.mark.parametrize("kind", ["export", "inlined leaf"])
def test_export_specialized_graph_refuses_other_shapes(kind, tmp_path):
    """torch.export bakes the example's sizes into the graph (reshapes, constants): before the
    guard, an inlined leaf's graph (timm mobilevit_xxs optimized at batch 1) raised a raw
    RuntimeError at batch 2, and an exported Hugging Face BERT at another sequence length an
    IndexError, where a broadcast against a baked constant could also have passed silently.
    Now any other shape is an InputError naming the shapes, also after save/load; the
    example's shape runs; a symbolically traced graph takes any shape."""
    if kind == "export":
        m, opt = model(), fxopt.optimize(model(), X, capture="export")
    else:
        m = model(MostlyOpaque)
        opt = fxopt.optimize(m, X)
        assert opt.report.capture["inlined"] == ["big"]
    assert opt.report.capture["input_shapes"] == [list(X.shape)]
    path = tmp_path / "m.fxopt"
    opt.save(path)
    for module in (opt, fxopt.load(path, modules=[BigUntraceable])):
        with torch.no_grad():
            assert torch.allclose(module(X), m(X), atol=1e-4)
        for other in (torch.randn(3, 3, 16, 16), torch.randn(2, 3, 8, 8)):
            with pytest.raises(fxopt.InputError, match=r"specialized it to .*\[2, 3, 16, 16\]"
                               ) as e:
                module(other)
            assert "optimize again" in e.value.hint
    traced = fxopt.optimize(model(), X, capture="symbolic_trace")
    assert "input_shapes" not in traced.report.capture
    with torch.no_grad():
        y = torch.randn(3, 3, 8, 8)
        assert torch.allclose(traced(y), m(y) if kind == "export" else model()(y), atol=1e-4)


def test_optimize_dynamic_batch_through_export():
    """optimize(dynamic_batch=True): the export keeps the batch symbolic, so the default
    pipeline, pruning and int8 all run at other batches (the other dims stay guarded); an
    example batch of 1 is refused (torch.export would specialize it)."""
    m = model(ShapeBranch)  # its forward cannot be traced: "auto" exports it
    x = torch.randn(2, 3, 15, 15)
    for kw in ({}, {"prune": 0.5}, {"quantize": "int8", "calibration_data": [x]}):
        opt = fxopt.optimize(m, x, dynamic_batch=True, **kw)
        assert opt.report.capture["method"] == "export"
        assert opt.report.capture["input_shapes"] == [[None, 3, 15, 15]]
        y = torch.randn(4, 3, 15, 15)
        with torch.no_grad():  # batch 4 computes what two calls at the example batch compute
            got, halves = opt(y), torch.cat([opt(y[:2]), opt(y[2:])])
            assert torch.allclose(got, halves, atol=1e-5)
            if not kw:
                assert torch.allclose(got, m(y), atol=1e-4)
        with pytest.raises(fxopt.InputError, match=r"\['\*', 3, 15, 15\]"):
            opt(torch.randn(5, 3, 17, 17))
    with pytest.raises(fxopt.InputError, match="batch of at least 2") as e:
        fxopt.optimize(m, x[:1], dynamic_batch=True)
    assert e.value.hint
    with pytest.raises(fxopt.InputError, match="True or False"):
        fxopt.optimize(m, x, dynamic_batch="yes")


def test_refusals_are_typed():
    class DictOut(nn.Module):
        def forward(self, x):
            return {"y": x * 2}

    with pytest.raises(fxopt.NotAvailableError) as e:
        fxopt.optimize(DictOut().eval(), X, capture="export")
    assert e.value.hint

    with pytest.raises(fxopt.PipelineError, match="capture"):
        fxopt.optimize(model(), X, capture="dynamo")


@pytest.mark.slow
def test_resnet18_export_matches_symbolic_trace():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    for kw in ({}, {"prune": 0.5}, {"quantize": "int8", "calibration_data": [x]}):
        traced = fxopt.optimize(m, x, capture="symbolic_trace", **kw)
        exported = fxopt.optimize(m, x, capture="export", **kw)
        assert counts(exported) == counts(traced), kw
        assert exported.report.after.params == traced.report.after.params


@pytest.mark.slow
def test_timm_untraceable_model_through_export():
    """mobilevit_xxs: symbolic tracing needs a MobileVitBlock leaf; export goes through."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("mobilevit_xxs", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    opt = fxopt.optimize(m, x, capture="export")
    assert opt.report.capture["method"] == "export"
    assert opt.report.record("fold_bn").stats["folded"] > 0
    fxopt.optimize(m, x, capture="export", prune=0.5)
    q = fxopt.optimize(m, x, capture="export", quantize="int8", calibration_data=[x])
    assert q.report.int8 is not None


class Attention(nn.Module):
    """A hand-written attention (matmul, softmax, matmul) beside F.scaled_dot_product_attention:
    torch.export keeps both as ATen overloads."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        n, t = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).view(n, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, dim=-1) @ v
        b = F.scaled_dot_product_attention(q, k, v)
        return self.out((a + b).transpose(1, 2).reshape(n, t, 16))


def test_attention_macs_counted_as_in_the_symbolic_trace():
    """aten.matmul and aten.scaled_dot_product_attention count as their torch twins (they
    counted 0, so an exported transformer's MACs left out its attention)."""
    torch.manual_seed(0)
    m, x = Attention().eval(), torch.randn(2, 10, 16)
    exported = capture_exported(copy_model(m), (x,)).gm
    assert {n.target for n in exported.graph.nodes} >= {
        torch.ops.aten.matmul.default, torch.ops.aten.scaled_dot_product_attention.default}
    # qkv, scores, weighted sum, SDPA (scores + sum), out
    expected = 2 * 10 * 48 * 16 + 2 * 2 * 10 * 10 * 8 * 2 + 2 * (2 * 2) * 10 * 10 * 8 + \
        2 * 10 * 16 * 16
    assert count_macs(fxopt.capture(m, x)) == count_macs(exported) == expected
