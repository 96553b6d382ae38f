"""``precision="bf16"`` on ``target="cpu"`` (fxopt/ir/precision.py): the bf16 float path through
oneDNN's fused kernels, float32 in and out, checked against eager in bf16; the refusals (no
native bf16, fp16 on the CPU, bf16 with quantize=). The runs need a CPU with native bf16 and
are skipped elsewhere; the refusal tests run everywhere."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
import fxopt.ir.precision as precision
from fxopt.errors import NotAvailableError, PipelineError
from fxopt.ir.tolerances import TOLERANCES, compare_outputs, rel_err
from fxopt.ops import onednn
from fxopt.ops.fused import CONV2D_ACT, LINEAR_ACT, conv_act_reference, linear_act_reference

BF16 = TOLERANCES[torch.bfloat16]
needs_bf16 = pytest.mark.skipif(not precision.cpu_native_bf16(),
                                reason="needs a CPU with native bf16 (AVX-512 BF16 or AMX)")


class Residual(nn.Module):
    """conv + BN + ReLU, a residual block, max pooling, depthwise conv, pool + linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c1 = nn.Conv2d(16, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        y = F.relu(self.c2(F.relu(self.c1(y))) + y)
        y = F.max_pool2d(F.relu6(self.dw(y)), 2)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class SqueezeExcite(nn.Module):
    """A MobileNet/EfficientNet block: expand + SiLU, depthwise, an SE gate, projection."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(8, 32, 1)
        self.dw = nn.Conv2d(32, 32, 5, padding=2, groups=32)
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = F.silu(self.dw(F.silu(self.expand(x))))
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.project(y * gate) + x


def _model(cls):
    torch.manual_seed(0)
    m = cls().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _eager_bf16(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16))


@needs_bf16
@pytest.mark.parametrize("cls, shape", [(Residual, (2, 3, 16, 16)),
                                        (SqueezeExcite, (2, 8, 12, 12))])
def test_bf16_equals_eager_float32_in_and_out(cls, shape):
    model, x = _model(cls), _x(*shape)
    before = copy.deepcopy(model.state_dict())
    opt = fxopt.optimize(model, x, precision="bf16")
    # every pass was checked in bf16 against the graph before it, with the bf16 tolerance
    checked = [r for r in opt.report.passes if r.modified]
    assert checked and all(r.status == "ok" and r.tolerance == BF16 for r in checked)
    assert all(p.dtype == torch.bfloat16 for p in opt.parameters())
    onednn.clear_weight_cache()
    with torch.no_grad():
        out = opt(x)
        ref32 = model(x)
    assert out.dtype == torch.float32 and out.shape == ref32.shape
    assert onednn.packed_weights() > 0  # the bf16 convolutions ran on oneDNN's fused kernels
    assert compare_outputs(out.to(torch.bfloat16), _eager_bf16(model, x)).ok
    assert rel_err(out, ref32) < BF16
    assert any("casts at the module's boundary" in n for n in opt.report.notes)
    # the user's model is untouched: float32, same values
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@needs_bf16
def test_bf16_module_saves_and_loads(tmp_path):
    model, x = _model(Residual), _x(1, 3, 16, 16)
    opt = fxopt.optimize(model, x, precision="bf16")
    same = fxopt.load(opt.save(tmp_path / "m.fxopt"))
    with torch.no_grad():
        assert torch.equal(same(x), opt(x)) and same(x).dtype == torch.float32


@needs_bf16
def test_bf16_inputs_pass_through():
    """bf16 inputs are taken as they are (the entry cast is a no-op); the output is in the
    dtype of the example inputs given to optimize (float32), fixed in the graph."""
    model, x = _model(Residual), _x(1, 3, 16, 16)
    opt = fxopt.optimize(model, x, precision="bf16")
    with torch.no_grad():
        out = opt(x.to(torch.bfloat16))
    assert out.dtype == torch.float32  # the output's dtype is the example input's
    assert compare_outputs(out.to(torch.bfloat16), _eager_bf16(model, x)).ok


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, index):
        y = F.relu(self.conv(x))
        return y, y.flatten(1)[:, index], index + 1


@needs_bf16
def test_bf16_casts_only_float_tensors():
    """An integer input stays as it is; every bf16 output (4-D ones contiguous, as eager's) is
    cast back to float32, an integer output is not."""
    model, x, index = _model(TwoOutputs), _x(2, 3, 6, 6), torch.tensor([0, 5, 7])
    opt = fxopt.optimize(model, (x, index), precision="bf16")
    with torch.no_grad():
        y, picked, nxt = opt(x, index)
        ref = model(x, index)
    assert (y.dtype, picked.dtype, nxt.dtype) == (torch.float32, torch.float32, torch.int64)
    assert y.is_contiguous() and torch.equal(nxt, ref[2])
    assert rel_err(y, ref[0]) < BF16 and rel_err(picked, ref[1]) < BF16


@needs_bf16
@pytest.mark.parametrize("act", ["silu", "sigmoid", "none"])
@pytest.mark.parametrize("c_in, c_out", [(24, 6), (256, 64)])  # F.linear; the packed matmul
def test_bf16_conv_of_a_1x1_image_is_a_matrix_product(act, c_in, c_out):
    """The SE layers' 1x1 convolutions of a 1x1 image run as a linear layer in bf16."""
    x = _x(3, c_in, 1, 1).to(torch.bfloat16)
    w, b = _x(c_out, c_in, 1, 1).to(torch.bfloat16), _x(c_out).to(torch.bfloat16)
    args = (x, w, b, [1, 1], [0, 0], [1, 1], 1)
    y = CONV2D_ACT.overload(*args, act=act)
    ref = conv_act_reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args),
                             act=act)
    assert y.dtype == torch.bfloat16 and y.shape == (3, c_out, 1, 1) and y.is_contiguous()
    assert rel_err(y, ref) < BF16
    assert onednn.linear_applies(x.flatten(1), w, b, None) == (c_in * c_out >= 8192)


@needs_bf16
@pytest.mark.parametrize("act, act_args", [("none", []), ("gelu", []), ("gelu_tanh", []),
                                           ("relu", []), ("hardswish", []), ("elu", [1.0])])
@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 5, 16)])
def test_bf16_linear_act_on_onednn(act, act_args, shape):
    """bf16 ``linear_act`` runs oneDNN's matmul on a packed weight (the activation as its
    post-op, or after it where the table has none): equal to the float64 reference within the
    bf16 tolerance, contiguous, any leading dims, a transposed input too."""
    x = _x(*shape[:-1], 128).to(torch.bfloat16)
    w, b = _x(96, 128).to(torch.bfloat16), _x(96).to(torch.bfloat16)  # packed: >= 8192 weights
    onednn.clear_weight_cache()
    for xx in (x, x.transpose(-1, -2).contiguous().transpose(-1, -2)):
        y = LINEAR_ACT.overload(xx, w, b, act=act, act_args=act_args)
        ref = linear_act_reference(xx.double(), w.double(), b.double(), act=act,
                                   act_args=act_args)
        assert y.dtype == torch.bfloat16 and y.shape == ref.shape and y.is_contiguous()
        assert rel_err(y, ref) < BF16
    assert onednn.packed_weights() == 1


@needs_bf16
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_bf16_linear_with_residual_on_onednn(act):
    """A residual is the packed matmul's ``add`` post-op (then the activation): within the bf16
    tolerance of the float64 reference, a transposed residual too, and the residual is left as
    it was (the activation runs in place on the output only); a residual of another shape
    (broadcast) is not taken and runs the reference."""
    x = _x(2, 5, 128).to(torch.bfloat16)
    w, b = _x(96, 128).to(torch.bfloat16), _x(96).to(torch.bfloat16)
    r = _x(2, 5, 96).to(torch.bfloat16)
    onednn.clear_weight_cache()
    for rr in (r, r.transpose(0, 1).contiguous().transpose(0, 1)):
        before = rr.clone()
        y = LINEAR_ACT.overload(x, w, b, rr, act=act)
        ref = linear_act_reference(x.double(), w.double(), b.double(), rr.double(), act=act)
        assert y.dtype == torch.bfloat16 and y.shape == ref.shape and y.is_contiguous()
        assert rel_err(y, ref) < BF16
        assert torch.equal(rr, before) and y.data_ptr() != rr.data_ptr()  # read, not written
    assert onednn.packed_weights() == 1
    broadcast = _x(96).to(torch.bfloat16)
    assert not onednn.linear_applies(x, w, b, broadcast)
    y = LINEAR_ACT.overload(x, w, b, broadcast, act=act)
    ref = linear_act_reference(x.double(), w.double(), b.double(), broadcast.double(), act=act)
    assert rel_err(y, ref) < BF16


class PlainLinears(nn.Module):
    """Linear layers with no activation after them (ViT's and ConvNeXt's second MLP layer, a
    classifier) and one with a residual."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(64, 160)

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(x))) + x
        return self.head(y.mean(1))


@needs_bf16
def test_bf16_plain_linears_take_the_packed_matmul():
    """With ``precision="bf16"`` every Linear becomes a ``linear_act`` call (``lower_convs``'s
    ``lowered_linear`` rule for the plain ones), running on packed weights, and the module is
    within the bf16 tolerance of eager bf16; in float32 the plain head stays ``nn.Linear``."""
    model, x = _model(PlainLinears), _x(2, 7, 64)
    onednn.clear_weight_cache()
    opt = fxopt.optimize(model, x, precision="bf16")
    gm = opt.graph_module
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    assert targets.count(LINEAR_ACT.overload) == 3 and "head" not in targets
    assert opt.report.record("lower_convs").stats.get("lowered_linear") == 1
    with torch.no_grad():
        out = opt(x)
    assert compare_outputs(out.to(torch.bfloat16), _eager_bf16(model, x)).ok
    assert onednn.packed_weights() == 3
    fp32 = fxopt.optimize(model, x)
    assert "head" in [n.target for n in fp32.graph_module.graph.nodes if n.op == "call_module"]


# -- refusals (every CPU) -------------------------------------------------------------------------
def test_bf16_refused_without_native_bf16(monkeypatch):
    monkeypatch.delenv("FXOPT_TRITON_ON_CPU", raising=False)
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)
    model = _model(Residual)
    with pytest.raises(NotAvailableError, match="lacks them") as e:
        fxopt.optimize(model, _x(1, 3, 8, 8), precision="bf16", target="cpu")
    assert "precision unset" in e.value.hint


def test_fp16_refused_on_the_cpu(monkeypatch):
    monkeypatch.delenv("FXOPT_TRITON_ON_CPU", raising=False)
    with pytest.raises(PipelineError, match="slower than float32") as e:
        fxopt.optimize(_model(Residual), _x(1, 3, 8, 8), precision="fp16", target="cpu")
    assert "precision='bf16'" in e.value.hint


def test_bf16_with_quantize_refused(monkeypatch):
    monkeypatch.delenv("FXOPT_TRITON_ON_CPU", raising=False)
    x = _x(1, 3, 8, 8)
    with pytest.raises(NotAvailableError, match="together with quantize") as e:
        fxopt.optimize(_model(Residual), x, precision="bf16", quantize="int8",
                       calibration_data=[x])
    assert "precision alone" in e.value.hint


def test_capability_detection_is_a_bool():
    assert isinstance(precision.cpu_native_bf16(), bool)


# -- a torchvision model --------------------------------------------------------------------------
@needs_bf16
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_large", "resnet18"])
def test_torchvision_bf16(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = _x(1, 3, 96, 96)
    opt = fxopt.optimize(model, x, precision="bf16")
    with torch.no_grad():
        out, ref32 = opt(x), model(x)
    assert out.dtype == torch.float32
    assert compare_outputs(out.to(torch.bfloat16), _eager_bf16(model, x)).ok
    assert rel_err(out, ref32) < 3 * BF16  # bf16 rounding over ~50 layers
