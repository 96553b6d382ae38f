"""fold_bn: every layer kind and BN form, the cases it must leave alone, and its bookkeeping."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fold_bn_checks import bn_left, randomize_bn, run_fold

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.ir.graph import count_bytes, count_params
from fxopt.ir.tolerances import compare_outputs, rel_err, tolerance_for
from fxopt.passes.fusion.fold_bn import BNStats, fold_bn, fold_weights

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class LayerBN(nn.Module):
    def __init__(self, layer, bn):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x):
        return self.bn(self.layer(x))


# (layer, BN, input shape)
CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d, (2, 4, 10)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d, (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1), nn.BatchNorm3d, (2, 4, 5, 5, 5)),
    "conv2d_nobias_groups_dilation_stride": (
        lambda: nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        nn.BatchNorm2d, (2, 4, 9, 9)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
                         nn.BatchNorm2d, (1, 6, 8, 8)),
    "conv2d_reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                       nn.BatchNorm2d, (2, 4, 7, 7)),
    "conv2d_replicate": (lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="replicate"),
                         nn.BatchNorm2d, (2, 4, 7, 7)),
    "conv2d_circular": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
                        nn.BatchNorm2d, (2, 4, 7, 7)),
    "conv2d_same": (lambda: nn.Conv2d(4, 6, 4, padding="same"), nn.BatchNorm2d, (2, 4, 7, 7)),
    "conv3d_groups": (lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2, bias=False),
                      nn.BatchNorm3d, (1, 4, 4, 4, 4)),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d, (2, 4, 6)),
    "convT2d_groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                  groups=2, bias=False),
                       nn.BatchNorm2d, (2, 4, 5, 5)),
    "convT2d_dilation": (lambda: nn.ConvTranspose2d(4, 6, 3, dilation=2), nn.BatchNorm2d,
                         (2, 4, 5, 5)),
    "convT3d": (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), nn.BatchNorm3d,
                (1, 4, 3, 3, 3)),
    "linear": (lambda: nn.Linear(5, 7), nn.BatchNorm1d, (4, 5)),
    "linear_nobias": (lambda: nn.Linear(5, 7, bias=False), nn.BatchNorm1d, (4, 5)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", sorted(CASES))
def test_folds_every_layer_kind(case):
    make_layer, bn_type, shape = CASES[case]
    torch.manual_seed(0)
    layer = make_layer()
    channels = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
    model = randomize_bn(LayerBN(layer, bn_type(channels, eps=1e-3, momentum=0.3)))
    gm, res, (params, nbytes) = run_fold(model, torch.randn(*shape))
    assert res.modified and res.stats["folded"] == 1 and res.stats["left"] == 0
    assert bn_left(gm) == 0
    # the folded layer sits where the old one was; the BN and the old parameters are gone
    assert not hasattr(gm, "bn")
    assert gm.layer is not layer and gm.layer.weight is not layer.weight
    assert type(gm.layer) is type(layer)
    assert count_params(gm) < params and count_bytes(gm) < nbytes
    names = [n.name for n in gm.graph.nodes if n.op == "call_module"]
    assert names == ["layer_bn"]
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert node.meta["fxopt_from"] == ["layer", "bn"] and "tensor_meta" in node.meta


@pytest.mark.parametrize("affine", [True, False])
def test_bn_without_affine_and_eps_honoured(affine):
    model = randomize_bn(LayerBN(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=0.5, affine=affine)))
    gm, res, _ = run_fold(model, torch.randn(2, 3, 6, 6))
    assert res.stats["folded"] == 1 and bn_left(gm) == 0


class FunctionalBN(nn.Module):
    """BN written as F.batch_norm over the module's own buffers (positional and keyword forms)."""

    def __init__(self, affine=True, keywords=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.register_buffer("mean", torch.rand(4) - 0.5)
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.weight = nn.Parameter(torch.rand(4) + 0.5) if affine else None
        self.bias = nn.Parameter(torch.rand(4) - 0.5) if affine else None
        self.keywords = keywords

    def forward(self, x):
        y = self.conv(x)
        if self.keywords:
            return F.batch_norm(y, self.mean, self.var, weight=self.weight, bias=self.bias,
                                training=False, momentum=0.7, eps=0.2)
        return F.batch_norm(y, self.mean, self.var, self.weight, self.bias, False, 0.7, 0.2)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("keywords", [False, True])
def test_functional_batch_norm(affine, keywords):
    model = FunctionalBN(affine, keywords)
    gm, res, (params, _) = run_fold(model, torch.randn(2, 3, 6, 6))
    assert res.stats["folded"] == 1 and bn_left(gm) == 0
    assert not hasattr(gm, "mean") and not hasattr(gm, "var")  # the BN constants went
    assert count_params(gm) < params


class SecondUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv output is read by the add too


def test_second_user_is_left_alone_with_a_note():
    model = randomize_bn(SecondUser())
    x = torch.randn(1, 3, 6, 6)
    gm = fxopt.capture(model.eval(), x)
    code = gm.code
    res = fold_bn(gm, PassContext(example_inputs=(x,)))
    assert not res.modified and gm.code == code
    assert res.stats["left"] == 1
    assert any("also used by" in n and "left unfolded" in n for n in res.notes)
    assert compare_outputs(gm(x), model(x)).ok


class SharedConv(nn.Module):
    """One conv module called at two sites, each followed by its own BN (pytorch issue 104593)."""

    def __init__(self, second_bn=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3) if second_bn else nn.Identity()

    def forward(self, x):
        a = self.bn1(self.conv(x))
        return self.bn2(self.conv(a))


def test_shared_conv_gets_private_copies():
    model = randomize_bn(SharedConv())
    gm, res, _ = run_fold(model, torch.randn(2, 3, 5, 5))
    assert res.stats == {"folded": 2, "private_copies": 1, "left": 0}
    assert bn_left(gm) == 0
    assert any("private copy 'conv_bn1'" in n for n in res.notes)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["conv_bn1", "conv"]  # the last site folds in place
    assert gm.conv.weight is not model.conv.weight


def test_shared_conv_with_one_bn_keeps_the_original_for_the_other_site():
    model = randomize_bn(SharedConv(second_bn=False))
    gm, res, _ = run_fold(model, torch.randn(2, 3, 5, 5))
    assert res.stats["private_copies"] == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["conv_bn1", "conv", "bn2"]  # bn2 is the Identity
    assert torch.equal(gm.conv.weight, model.conv.weight)  # the unfolded site is untouched


def test_shared_conv_through_the_manager_equals_eager():
    model = randomize_bn(SharedConv()).eval()
    x = torch.randn(2, 3, 5, 5)
    opt = fxopt.optimize(model, x, pipeline=["fold_bn"])
    rec = opt.report.record("fold_bn")
    assert rec.status == "ok" and rec.stats["folded"] == 2
    with torch.no_grad():
        assert compare_outputs(opt(x), model(x)).ok


@pytest.mark.parametrize("why", ["training", "no_running_stats"])
def test_bn_using_batch_statistics_is_left_alone(why):
    if why == "training":
        model = randomize_bn(LayerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
        x = torch.randn(2, 3, 6, 6)
        gm = fxopt.capture(model, x)
        gm.bn.train()  # the manager refuses such a model; the pass itself leaves the BN
    else:
        model = LayerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
        x = torch.randn(2, 3, 6, 6)
        gm = fxopt.capture(model, x)
    code = gm.code
    res = fold_bn(gm, PassContext(example_inputs=(x,)))
    assert not res.modified and gm.code == code and hasattr(gm, "bn")
    assert any("left alone" in n for n in res.notes)


@pytest.mark.filterwarnings("ignore:fxopt. the model's forward changes its buffers")
def test_functional_bn_in_training_mode_is_left_alone():
    class M(FunctionalBN):
        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, self.weight, self.bias, True)

    x = torch.randn(2, 3, 6, 6)
    gm = fxopt.capture(M().eval(), x)
    res = fold_bn(gm, PassContext(example_inputs=(x,)))
    assert not res.modified and any("training mode" in n for n in res.notes)


class Linear3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(3)  # normalizes dim 1 of [N, 3, 5]: not the features

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_bn_on_3d_output_is_left_alone():
    x = torch.randn(2, 3, 4)
    gm = fxopt.capture(randomize_bn(Linear3d()).eval(), x)
    res = fold_bn(gm, PassContext(example_inputs=(x,)))
    assert not res.modified and any("normalizes dim 1" in n for n in res.notes)


class NotAfterLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(F.relu(x))


def test_negative_bn_not_after_a_layer():
    x = torch.randn(1, 3, 4, 4)
    gm = fxopt.capture(randomize_bn(NotAfterLayer()).eval(), x)
    code = gm.code
    res = fold_bn(gm, PassContext(example_inputs=(x,)))
    assert not res.modified and res.notes == [] and gm.code == code


def test_back_to_back_and_idempotent():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6)))
    x = torch.randn(3, 3, 6, 6)
    gm, res, _ = run_fold(model, x)
    assert res.stats["folded"] == 3 and bn_left(gm) == 0
    code = gm.code
    again = fold_bn(gm, PassContext(example_inputs=(x,)))
    assert not again.modified and gm.code == code


def test_double_precision_fold_is_exact_to_float64():
    model = randomize_bn(LayerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = fxopt.capture(model, x)
    fold_bn(gm, PassContext(example_inputs=(x,)))
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < tolerance_for(torch.float64)


def test_fold_weights_transposed_groups_against_reference():
    # ConvTranspose weights are [C_in, C_out/g, k]: output channel c is group c // (C_out/g).
    torch.manual_seed(1)
    conv = nn.ConvTranspose1d(4, 6, 3, groups=2).double()
    bn = BNStats(torch.randn(6).double(), torch.rand(6).double() + 0.5,
                 torch.randn(6).double(), torch.randn(6).double(), 1e-5, "bn")
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    ref = F.batch_norm(conv(x), bn.mean, bn.var, bn.gamma, bn.beta, False, 0.0, bn.eps)
    w, b = fold_weights(conv.weight, conv.bias, bn, transposed=True, groups=2)
    out = F.conv_transpose1d(x, w, b, groups=2)
    assert rel_err(out, ref) < 1e-12


def test_fuse_from_torch_fx_vs_fxopt_on_shared_conv():
    """What makes fx's fuse wrong (one module, two sites) keeps fxopt right."""
    from torch.fx.experimental.optimization import fuse

    model = randomize_bn(SharedConv()).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
        theirs = fuse(model)(x)
    gm, _, _ = run_fold(model, x)
    with torch.no_grad():
        assert compare_outputs(gm(x), ref).ok
    # informational: torch.fx's fuse is wrong here in the torch versions we support
    print("torch.fx fuse rel err on a shared conv:", rel_err(theirs, ref))


class ShapeReadBlock(nn.Module):
    """timm's BatchNormAct2d: the conv output's shape is read (asserts) beside the BN."""

    def __init__(self, read_values=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.read_values = read_values

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected 4D input")
        torch._assert(y.shape[1] == 8, "expected 8 channels")
        n = y.size(0)
        out = torch.relu(self.bn(y)).reshape(n, -1)
        return out + y.mean() if self.read_values else out


def test_fold_bn_through_shape_reads():
    """Users that read only the conv output's shape do not keep the BN unfolded (failed on main:
    'left': 1); the folded conv takes the old conv's place and feeds them."""
    model = randomize_bn(ShapeReadBlock())
    gm, res, _ = run_fold(model, torch.randn(2, 3, 8, 8))
    assert res.stats["folded"] == 1 and res.stats["left"] == 0
    assert not any(n.op == "call_function" and n.target is F.batch_norm for n in gm.graph.nodes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    conv = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(conv) == 1 and len(conv[0].users) >= 2  # the shape reads read the folded conv


def test_fold_bn_value_reader_still_blocks():
    """A second user that reads the values (``y.mean()``) still keeps the BN unfolded."""
    model = randomize_bn(ShapeReadBlock(read_values=True))
    gm, res, _ = run_fold(model, torch.randn(2, 3, 8, 8))
    assert res.stats["folded"] == 0 and res.stats["left"] == 1
    assert any("also used by" in n for n in res.notes)


TIMM_BN_MODELS = ["mobilenetv2_050", "regnetx_002", "efficientnet_b0", "cspresnet50", "repvgg_a0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_BN_MODELS)
def test_timm_bn_act_all_folded(name):
    """timm's BatchNormAct2d reads ``x.ndim`` beside the BN: every BN after a conv folds (issue
    15). RepVGG's identity-branch BNs have no layer before them (only RepVGG's own branch merge,
    ``reparameterize``, removes them): they are the only ones left."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    opt = fxopt.optimize(model, torch.randn(1, 3, 64, 64))
    left = [n for n in opt.graph_module.graph.nodes
            if (n.op == "call_function" and n.target is F.batch_norm)
            or (n.op == "call_module"
                and isinstance(opt.graph_module.get_submodule(n.target), nn.BatchNorm2d))]
    left = [n for n in left if not n.meta.get("fxopt_path", "").endswith(".identity")]
    assert left == [], f"{len(left)} BN left"
    assert opt.report.record("fold_bn").stats["left"] == 0


class FunctionalConvBN(nn.Module):
    """A conv written as ``F.conv2d`` on the module's own weight (what torch.export's inlined
    leaves and timm's padded ``Conv2dSame`` look like), then BN."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.2)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = F.relu(self.bn(F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, 2)))
        return self.bn2(F.conv2d(y, self.dw, None, 1, 1, 1, 8))


def test_fold_bn_into_functional_conv_with_constant_weights():
    """Failed on main (folded 0): the call is kept, on new folded constants (groups too)."""
    model = randomize_bn(FunctionalConvBN())
    gm, res, _ = run_fold(model, torch.randn(2, 3, 9, 9))
    assert res.stats["folded"] == 2 and res.stats["left"] == 0
    assert not any(n.target is F.batch_norm for n in gm.graph.nodes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())


class LinearNorm(nn.Module):
    """LeViT's ``LinearNorm``: a Linear on tokens [B, N, C], BatchNorm1d over the flattened
    [B*N, C], reshaped back with ``reshape_as`` (a read of the linear output's shape only)."""

    def __init__(self, flatten="method", start=0, end=1, features=6, read_values=False):
        super().__init__()
        self.linear = nn.Linear(5, features)
        self.flat = nn.Flatten(start, end)
        self.bn = nn.BatchNorm1d(features if (start, end) == (0, 1) else 4 * features)
        self.how, self.start, self.end, self.read_values = flatten, start, end, read_values

    def forward(self, x):
        y = self.linear(x)
        if self.how == "method":
            f = y.flatten(self.start, self.end)
        elif self.how == "function":
            f = torch.flatten(y, self.start, self.end)
        else:
            f = self.flat(y)
        out = self.bn(f).reshape_as(y)
        return out + f.mean() if self.read_values else out


@pytest.mark.parametrize("flatten", ["method", "function", "module"])
def test_linear_flatten_bn_folds(flatten):
    """Failed on main (folded 0, LeViT's 48 BN left in the zoo sweep): the flatten stays, on
    the folded linear's output, and ``reshape_as`` reads the folded output's shape."""
    model = randomize_bn(LinearNorm(flatten))
    gm, res, before = run_fold(model, torch.randn(2, 4, 5))
    assert res.stats["folded"] == 1 and res.stats["left"] == 0 and bn_left(gm) == 0
    assert count_params(gm) < before[0]


def test_linear_flatten_bn_on_other_dims_is_left_alone():
    """flatten(1, 2) of [B, N, C] gives [B, N*C]: the BN's channels are not the features."""
    x = torch.randn(2, 4, 5)
    gm = fxopt.capture(randomize_bn(LinearNorm(start=1, end=2)).eval(), x)
    res = fold_bn(gm, PassContext(example_inputs=(x,)))
    assert not res.modified and any("only a Linear flattened" in n for n in res.notes)


def test_linear_flatten_bn_with_a_value_reader_of_the_flatten_is_left_alone():
    model = randomize_bn(LinearNorm(read_values=True))
    gm, res, _ = run_fold(model, torch.randn(2, 4, 5))
    assert res.stats["folded"] == 0 and bn_left(gm) == 1
    assert any("also used by" in n for n in res.notes)


@pytest.mark.slow
def test_levit_linear_norms_fold():
    """timm's LeViT: every LinearNorm/ConvNorm BN folds (zoo sweep: 48 left before); only the
    heads' BN, after a mean with no layer before it, stay."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("levit_128s", pretrained=False).eval()
    opt = fxopt.optimize(model, torch.randn(1, 3, 224, 224))
    gm = opt.graph_module
    left = [n.target for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]
    assert sorted(left) == ["head.bn", "head_dist.bn"]
    assert opt.report.record("fold_bn").stats["left"] == 0
