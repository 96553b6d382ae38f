"""``fuse_add_layer_norm``: a residual add and the LayerNorm reading it become one
``add_layer_norm`` call (both values outputs); what it must leave alone; a tiny torchvision ViT
through ``optimize``; the fused graph through ONNX Runtime, the .fxopt file, the pictures, and
int8 quantization beside it."""
import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.ops.fused import ADD_LAYER_NORM
from fxopt.ops.schema import schema_of
from fxopt.passes.fusion.fuse_layer_norm import fuse_add_layer_norm
from fxopt.pipelines import expand_pipeline

D = 16


def counts(gm) -> Counter:
    out = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[type(gm.get_submodule(n.target)).__name__] += 1
        elif n.op == "call_function":
            s = schema_of(n.target)
            out[s.name if s is not None else getattr(n.target, "__name__", "")] += 1
    return out


class PreNorm(nn.Module):
    """A position embedding, two pre-norm residual blocks (a tanh after each Linear, so that
    ``fuse_act`` leaves the adds alone) and a final ``F.layer_norm`` (timm's spelling), one
    LayerNorm without affine parameters: every LayerNorm reads an add, every sum but the last
    is read again by the next add."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 5, D))
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, D)
        self.w, self.b = nn.Parameter(torch.rand(D) + 0.5), nn.Parameter(torch.randn(D))

    def forward(self, x):
        h = x + self.pos
        h = h + torch.tanh(self.fc1(self.ln1(h)))
        h = h + torch.tanh(self.fc2(self.ln2(h)))
        return F.layer_norm(h, (D,), self.w, self.b, 1e-6)


def _x(batch=2):
    return torch.randn(batch, 5, D, generator=torch.Generator().manual_seed(batch))


def _fused(model, x, passes=("cleanup",)):
    gm = fxopt.capture(model.eval(), (x,))
    ctx = PassContext(example_inputs=(x,), target="cpu")
    if passes:
        gm, _ = PassManager(expand_pipeline(list(passes)), check="each").run(gm, ctx)
    before = copy.deepcopy(gm)
    return before, gm, fuse_add_layer_norm(gm, ctx)


def test_pre_norm_block_golden_numeric_idempotent():
    model, x = PreNorm(), _x()
    before, gm, res = _fused(model, x)
    assert res.modified and res.stats == {"add_layer_norm": 3}
    c = counts(gm)
    assert (c["add_layer_norm"], c["LayerNorm"], c["layer_norm"], c["add"]) == (3, 0, 0, 0)
    views = [ADD_LAYER_NORM.view.of(n) for n in gm.graph.nodes if ADD_LAYER_NORM.view.matches(n)]
    assert [v.normalized_shape for v in views] == [[D]] * 3
    assert [(v.weight is None, v.eps) for v in views] == [(False, 1e-5), (True, 1e-5),
                                                          (False, 1e-6)]
    # the first two sums are read again (the next residual add): through output 0
    assert [sorted(u.args[1] for u in v.node.users) for v in views] == [[0, 1], [0, 1], [1]]
    assert views[0].node.meta["fxopt_from"][-1] == "ln1"
    with torch.no_grad():
        for batch in (2, 1, 3):  # the [1, 5, D] embedding broadcasts at any batch
            assert torch.equal(gm(_x(batch)), model(_x(batch)))
    code = gm.code
    again = fuse_add_layer_norm(gm, PassContext(example_inputs=(x,), target="cpu"))
    assert again.modified is False and gm.code == code


class NotFused(nn.Module):
    """LayerNorms the pass must leave alone: over a permuted sum (ConvNeXt's channels-first
    norm), of an add of a number, of an add of two dtypes, with a weight computed in the graph,
    of no add at all."""

    def __init__(self):
        super().__init__()
        self.ln, self.ln_c, self.ln_d = nn.LayerNorm(D), nn.LayerNorm(5), nn.LayerNorm(D).double()
        self.w = nn.Parameter(torch.rand(D))

    def forward(self, x, r):
        a = self.ln_c((x + r).transpose(1, 2))
        b = self.ln(x + 1.0)
        c = self.ln_d(x + r.double()).float()
        d = F.layer_norm(x + r, (D,), torch.sigmoid(self.w))
        return a.sum() + b + c + d + self.ln(x)


def test_layer_norms_it_must_leave_alone():
    model, x, r = NotFused().eval(), _x(), _x(3)[:2]
    gm = fxopt.capture(model, (x, r))  # no cleanup: the computed weight stays computed
    before = copy.deepcopy(gm)
    res = fuse_add_layer_norm(gm, PassContext(example_inputs=(x, r), target="cpu"))
    assert res.modified is False and gm.code == before.code
    notes = " ".join(res.notes)
    assert "mixes torch.float32 and torch.float64" in notes
    assert "weight is computed in the graph" in notes
    with torch.no_grad():
        assert torch.equal(gm(x, r), model(x, r))


def _tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=5).eval()


def _images(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def test_torchvision_vit_through_optimize(tmp_path):
    """Five LayerNorms (ln_1, ln_2 per block, the encoder's ln), each after an add; fuse_act
    folds the MLP's residual add into its second Linear (``linear_act`` with a residual: the
    GEMM's epilogue adds it, which beats adding it in the LayerNorm), so three adds are left
    for this pass: the position embedding (block 0's ln_1) and each block's attention residual
    (ln_2)."""
    model, x = _tiny_vit(), _images()
    opt = fxopt.optimize(model, x, target="cpu", passes=["fuse_add_layer_norm"])
    rec = opt.report.record("fuse_add_layer_norm")
    assert rec.status == "ok" and rec.stats == {"add_layer_norm": 3}
    c = counts(opt.graph_module)
    assert c["add_layer_norm"] == 3 and c["LayerNorm"] == 2
    with torch.no_grad():
        for batch in (2, 3):
            torch.testing.assert_close(opt(_images(batch)), model(_images(batch)))
    # the .fxopt file keeps the fused op and its two outputs
    back = fxopt.load(opt.save(tmp_path / "vit.fxopt"))
    assert counts(back.graph_module)["add_layer_norm"] == 3
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))
    # the pictures draw it
    fxopt.draw(opt, tmp_path / "vit.svg")
    assert (tmp_path / "vit.svg").stat().st_size > 0


def test_fused_graph_exports_to_onnx_and_checks_in_ort(tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = PreNorm(), _x()
    _, gm, res = _fused(model, x)
    assert res.stats["add_layer_norm"] == 3
    out = fxopt.export_onnx(gm, (x,), tmp_path / "prenorm.onnx")  # checked in ORT (raises)
    assert out.translated.get("add_layer_norm") == 3


def test_int8_on_a_vit_is_unchanged_and_the_fusion_after_it_works():
    """The CPU pipeline does not run the fusion, so int8 quantizes around the LayerNorms as it
    did; on CUDA the fusion runs after quantize_int8 (test_pipelines), on the float adds int8
    left: here the same order, the fusion appended after the CPU int8 lowering."""
    model, x = _tiny_vit(), _images()
    batches = [_images(4), _images(5)]
    plain = fxopt.optimize(model, x, target="cpu", quantize="int8", calibration_data=batches)
    assert plain.report.record("fuse_add_layer_norm") is None
    fused = fxopt.optimize(model, x, target="cpu", quantize="int8", calibration_data=batches,
                           passes=["fuse_add_layer_norm"])
    names = [r.name for r in fused.report.passes]
    assert names.index("fuse_add_layer_norm") > names.index("quantize_int8")
    rec = fused.report.record("fuse_add_layer_norm")
    # int8 split the residual adds off their Linears: the LayerNorms read float adds again
    assert rec.status == "ok" and rec.stats["add_layer_norm"] >= 3
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))


def test_fused_graph_torch_exports_and_trains():
    model, x = PreNorm(), _x()
    _, gm, _ = _fused(model, x)
    ep = torch.export.export(gm, (x,))
    with torch.no_grad():
        assert torch.equal(ep.module()(x), model(x))
    # gradients through both outputs of the fused op: eager's
    gm.train()
    gm(x).square().sum().backward()
    ref = copy.deepcopy(model).train()
    ref.zero_grad()
    ref(x).square().sum().backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(gm.get_parameter(name).grad, p.grad, rtol=1e-4, atol=1e-5)


def test_timm_vit_tiny():
    """timm's LayerNorm traces as ``F.layer_norm`` (rule ``add_layer_norm_fn``); its attention
    projection and MLP both end in a Linear, whose residual adds fuse_act folds into the GEMM:
    the position embedding's add (block 0's norm1) is the one left for this pass."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, pretrained=False,
                              num_classes=5, depth=2).eval()
    x = _images()
    opt = fxopt.optimize(model, x, target="cpu", passes=["fuse_add_layer_norm"])
    assert opt.report.record("fuse_add_layer_norm").stats == {"add_layer_norm": 1}
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
