"""quantize_int8: golden, negative, idempotence, numeric (simulated reference), rules, digits.

The pass runs under the pass manager with check="each", so the int8 graph is compared with
its fake-quant reference (within one quantization step of the output) after the pass.
"""
import math

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.errors import InputError, PreconditionError
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.pipelines import expand_pipeline
from fxopt.ops.int8 import AddInt8, Int8Layer, linear_int8_reference
from fxopt.quant.config import QuantConfig
from fxopt.quant.measure import sqnr_db
from fxopt.tools import digits
from untouched import assert_same, snapshot

quant = __import__("fxopt.passes.quant.quantize", fromlist=["quantize"])
INT8 = torch.ops.fxopt.conv2d_int8.default
LIN8 = torch.ops.fxopt.linear_int8.default


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y) + y)
        return self.fc(y.flatten(1))


class NoLayers(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2 + 1


def _cal(n=4, shape=(4, 3, 8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def run(model, x, steps=("quantize_int8",), cal=None, quantize="int8"):
    gm = fxopt.capture(model.eval(), x)
    gm.eval()
    ctx = PassContext(example_inputs=(x,), configs=[QuantConfig.coerce(quantize)],
                      calibration_data=_cal() if cal is None else cal)
    pm = PassManager(expand_pipeline(list(steps)), check="each")
    out, report = pm.run(gm, ctx)
    return out, report


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 8, 8)


def test_golden_plain_layers(net):
    m, x = net
    gm, report = run(m, x)
    rec = report.record("quantize_int8")
    assert rec.status == "ok" and rec.modified
    assert _targets(gm).count(INT8) == 2 and _targets(gm).count(LIN8) == 1
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]  # the float layers are gone
    assert rec.stats["conv2d"] == 2 and rec.stats["linear"] == 1  # the rules fired
    # int8 weights and the grids are buffers
    assert gm.c1_w_int8_0.dtype == torch.int8 and gm.c1_w_scale_0.shape == (8,)


def test_golden_after_fusion(net):
    m, x = net
    gm, report = run(m, x, steps=("fold_bn", "fuse_act", "quantize_int8"))
    rec = report.record("quantize_int8")
    assert rec.status == "ok"
    # one region: quantize at the entry, int8 codes between the layers, dequantize at the exit
    targets = _targets(gm)
    assert targets.count(torch.ops.fxopt.quantize.default) == 1
    assert targets.count(torch.ops.fxopt.dequantize.default) == 1
    int8 = [n for n in gm.graph.nodes if n.target in (INT8, LIN8)]
    # the residual layer is split: its conv writes a pre-add grid, add_int8 applies the relu
    assert [Int8Layer.of(n).act for n in int8] == ["relu", "none", "none"]
    assert all(Int8Layer.of(n).out_int8 for n in int8)
    adds = [n for n in gm.graph.nodes if n.target is torch.ops.fxopt.add_int8.default]
    assert len(adds) == 1 and AddInt8.of(adds[0]).act == "relu"
    assert adds[0].args[0] is int8[1] and adds[0].args[3] is int8[0]  # both inputs are codes
    assert not [n for n in gm.graph.nodes if n.target in (torch.ops.fxopt.conv2d_act.default,
                                                         torch.ops.fxopt.linear_act.default)]


def test_negative_no_layers():
    x = torch.randn(2, 3, 4, 4)
    gm = fxopt.capture(NoLayers().eval(), x)
    before = gm.code
    res = quant.quantize_int8(gm, PassContext((x,), calibration_data=_cal(shape=(2, 3, 4, 4))))
    assert res.modified is False and gm.code == before


def test_idempotent(net):
    m, x = net
    gm, _ = run(m, x)
    code = gm.code
    res = quant.quantize_int8(gm, PassContext((x,), configs=[QuantConfig()],
                                              calibration_data=_cal()))
    assert res.modified is False and gm.code == code


def test_numeric_within_one_step_of_simulated(net):
    m, x = net
    gm = fxopt.capture(m, x)
    res = quant.quantize_int8(gm, PassContext((x,), calibration_data=_cal()))
    step = res.max_abs_tolerance
    assert step is not None and step > 0
    for xb in _cal(n=3, seed=7):
        with torch.no_grad():
            got, ref = res.gm(xb), res.reference(xb)
        assert (got - ref).abs().max().item() <= step + 1e-6
    assert res.stats["sqnr_db"] > 20 and res.stats["max_abs_err"] < 1.0
    assert 0.0 <= res.stats["top1_agreement"] <= 1.0


def test_symmetric_activations_and_keep_float(net):
    m, x = net
    gm, report = run(m, x, quantize=QuantConfig(activation_symmetric=True, keep_float=["fc"],
                                                activation_observer="percentile"))
    rec = report.record("quantize_int8")
    assert rec.status == "ok" and rec.stats["kept_float"] == 1
    assert _targets(gm).count(INT8) == 2 and LIN8 not in _targets(gm)
    gm, report = run(m, x, quantize={"first_layer": "float", "last_layer": "float"})
    assert _targets(gm).count(INT8) == 1


def test_config_coerce():
    assert QuantConfig.coerce("int8") == QuantConfig()
    assert QuantConfig.coerce({"activation_observer": "kl"}).activation_observer == "kl"
    with pytest.raises(InputError, match="not supported"):
        QuantConfig.coerce("int4")
    with pytest.raises(InputError, match="unknown QuantConfig fields"):
        QuantConfig.coerce({"bits": 4})
    with pytest.raises(InputError, match="observer"):
        QuantConfig(activation_observer="nope")
    assert QuantConfig(keep_float=[nn.Linear]).keeps_float("fc", nn.Linear)
    assert QuantConfig(keep_float=["layer1"]).keeps_float("layer1.0.conv", nn.Conv2d)
    assert not QuantConfig(keep_float=["layer1"]).keeps_float("layer10.conv", nn.Conv2d)


@pytest.mark.parametrize("cal, match", [
    ([], "0 batches"),
    ([torch.randn(2, 3, 5, 5)], "only the batch size may differ"),
    (torch.randn(2, 3, 8, 8), "not a collection"),
    ([{"x": 1}], "expected a tensor"),
])
def test_bad_calibration_data(net, cal, match):
    m, x = net
    with pytest.raises(InputError, match=match):
        run(m, x, cal=cal)


def test_loader_style_batches_and_missing_data(net):
    m, x = net
    cal = [(b, torch.zeros(4, dtype=torch.long)) for b in _cal()]
    gm, report = run(m, x, cal=cal)
    assert report.record("quantize_int8").status == "ok"
    with pytest.raises(PreconditionError, match="calibration data"):
        fxopt.optimize(m, x, passes=["quantize_int8"])


def test_optimize_places_pass_after_fusion_and_saves(net, tmp_path):
    m, x = net
    opt = fxopt.optimize(m, x, quantize="int8", calibration_data=_cal())
    names = [r.name for r in opt.report.passes]
    # after fusion and the CPU layout passes that follow it (fxopt.pipelines)
    assert names.index("quantize_int8") == names.index("fuse_act") + 3
    assert names[names.index("fuse_act") + 1:][:2] == ["lower_convs", "to_channels_last"]
    path = opt.save(tmp_path / "m.fxopt")
    again = fxopt.load(path)
    with torch.no_grad():
        assert torch.equal(again(x), opt(x))


def test_digits_int8_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    loaded = digits.load_or_train_default(cache_dir=tmp_path, progress=False, epochs=3)
    model = loaded.model.eval()
    opt = fxopt.optimize(model, digits.example_batch(), quantize="int8",
                         calibration_data=digits.calibration_batches())
    rec = opt.report.record("quantize_int8")
    assert rec.status == "ok" and rec.stats["conv2d"] >= 1 and rec.stats["linear"] == 1
    assert math.isfinite(rec.stats["sqnr_db"]) and rec.stats["sqnr_db"] > 20
    float_acc = digits.evaluate(model)
    int8_acc = digits.evaluate(opt)
    assert abs(float_acc - int8_acc) <= 0.005 + 1e-9, (float_acc, int8_acc)


def test_digits_small_cnn_int8_accuracy():
    """Acceptance (issue 5): a small plain CNN trained on digits keeps its accuracy in int8
    (within 0.5 points), through int8 chains with max pooling, flatten and two Linear layers."""
    trained = digits.train_digits_model(epochs=6, progress=False, arch="cnn")
    model = trained.model.eval()
    opt = fxopt.optimize(model, digits.example_batch(), quantize="int8",
                         calibration_data=digits.calibration_batches())
    rec = opt.report.record("quantize_int8")
    assert rec.status == "ok" and rec.stats["conv2d"] == 3 and rec.stats["linear"] == 2
    assert rec.stats["quantize"] == 1 and rec.stats["dequantize"] == 1  # one int8 region
    assert opt.report.record("lower_int8_cpu").status == "ok"
    float_acc, int8_acc = digits.evaluate(model), digits.evaluate(opt)
    assert float_acc > 0.9
    assert abs(float_acc - int8_acc) <= 0.005 + 1e-9, (float_acc, int8_acc)


@pytest.mark.parametrize("k", [16, 3000])  # float32 accumulation below 2**24, float64 above
def test_reference_accumulation_is_exact(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=g)
    w = torch.randint(-127, 128, (5, k), dtype=torch.int8, generator=g)
    ws, xs, xz = torch.full((5,), 1e-3), torch.tensor(0.02), torch.tensor(60)
    codes = (torch.round(x * torch.reciprocal(xs)) + xz).clamp(0, 127).long() - 60
    acc = codes @ w.long().t()  # exact int64
    want = (acc.double() * (1e-3 * 0.02)).float()
    # a fine output grid (step 1e-7), so the result shows the accumulator
    got = linear_int8_reference(x, w, ws, None, xs, xz, torch.tensor(1e-7), torch.tensor(0),
                                y_qmin=-2**31, y_qmax=2**31 - 1, x_qmax=127)
    assert torch.allclose(got.double(), want.double(), rtol=1e-6, atol=2e-7)


class EmptyCache(nn.Module):
    """A key/value cache that starts empty (Hugging Face's ``DynamicCache``): the new keys are
    concatenated onto a tensor with no elements, and a layer reads only that empty tensor."""

    def __init__(self):
        super().__init__()
        self.k, self.o, self.stale = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("cache", torch.zeros(2, 0, 8))

    def forward(self, x):
        k = torch.cat([self.cache, self.k(x)], 1)
        return self.o(k) + self.stale(self.cache).sum()


def test_empty_values_stay_float_and_are_reported():
    """An empty value holds no range: no grid, not an InputError. A layer only it reaches stays
    float and the report names it; the others are int8 and within one step of the simulated
    reference (the pass manager's check)."""
    torch.manual_seed(0)
    m, x = EmptyCache().eval(), torch.randn(2, 5, 8)
    before = snapshot(m)
    gm, report = run(m, x, cal=[x] + _cal(shape=(2, 5, 8)))
    rec = report.record("quantize_int8")
    assert rec.status == "ok" and rec.stats["linear"] == 2
    assert rec.stats["uncalibrated"] == ["stale"]
    assert any("no calibration data reached" in s and "stale" in s for s in rec.notes)
    assert _targets(gm).count(LIN8) == 2
    with torch.no_grad():
        assert sqnr_db(m(x), gm(x)) > 25
    assert_same(m, before)
    with pytest.raises(InputError, match="batch 0 is empty"):  # empty data is still an error
        run(m, x, cal=[torch.randn(2, 0, 8)])


class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear layer with its weight stored ``[in, out]``."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        y = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return y.view(x.shape[:-1] + (self.weight.shape[1],))


class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(8, 16), Conv1D(16, 8)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x))) + torch.addmm(x[0], x[0], x[0].t())


def test_addmm_of_a_transposed_weight_is_an_int8_linear():
    """``addmm(bias, x, W)`` of constant parameters is a Linear layer (weight ``W.T``): int8,
    named by its module; the product of two activations stays float; the model untouched."""
    torch.manual_seed(0)
    m, x = Conv1DNet().eval(), torch.randn(2, 8, 8)
    before = snapshot(m)
    gm, report = run(m, x, steps=("fuse_act", "quantize_int8"), cal=[x] + _cal(shape=(2, 8, 8)))
    rec = report.record("quantize_int8")
    assert rec.status == "ok" and rec.stats["addmm_as_linear"] == 2 and rec.stats["linear"] == 2
    layers = sorted(n.meta.get("fxopt_path") for n in gm.graph.nodes if n.target is LIN8)
    assert layers == ["c_fc", "c_proj"]
    assert [n.target for n in gm.graph.nodes].count(torch.addmm) == 1  # x @ x.T + x: float
    with torch.no_grad():
        assert sqnr_db(m(x), gm(x)) > 25
    assert_same(m, before)
    for mode in ("static", "dynamic"):  # both kept float: the float rewrite alone, checked
        cfg = QuantConfig(mode=mode, keep_float=["c_fc", "c_proj"])
        gm, report = run(m, x, steps=("quantize_int8",), cal=[x], quantize=cfg)
        assert report.record("quantize_int8").status == "ok" and LIN8 not in _targets(gm)
        with torch.no_grad():
            assert torch.allclose(gm(x), m(x), rtol=1e-5, atol=1e-5)
    gm, _ = run(m, x, quantize="int8_dynamic")  # dynamic int8 takes the same Linear layers
    assert _targets(gm).count(torch.ops.fxopt.linear_int8_dynamic.default) == 2
    with torch.no_grad():
        assert sqnr_db(m(x), gm(x)) > 25
