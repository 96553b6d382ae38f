"""target="openvino" / "onnxruntime" / "best": the checked graph run by an inference engine.

Real torchvision ResNet-18 (at 32x32, so the default run stays short), float and int8, on each
installed engine: the module's outputs equal the graph's at two batch sizes (float: the float32
tolerance; int8: one output step, or OpenVINO's allowance: no less accurate than fxopt's int8
against the float model), in the input's dtype; the user's model is unchanged; a missing engine
is a NotAvailableError with a pip hint; a check that fails names the engine.
"""
import copy
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt.errors import NotAvailableError, NumericMismatchError
from fxopt.export.engines import (INT8_ACCURACY_SLACK, check_engine, deploy, installed_engines,
                                  measure)
from fxopt.export.qdq import compare_within_step
from fxopt.ir.tolerances import compare_outputs, rel_err
from fxopt.ops.isa import int8_pairs_saturate

ENGINES = [pytest.param("onnxruntime"),
           pytest.param("openvino", marks=pytest.mark.skipif(
               "openvino" not in installed_engines(), reason="openvino is not installed"))]


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]


_CACHE = {}


def _optimized(engine, quant):
    key = (engine, quant)
    if key not in _CACHE:
        model = _resnet18()
        cal = _batches()
        # every layer int8 (min_sqnr_db=None): the engine's rounding is judged against the
        # all-int8 graph's error (with the default's float layers the graph is closer to eager
        # and OpenVINO's own rounding, unchanged, passed 1.5x of it)
        kw = dict(quantize=fxopt.QuantConfig(min_sqnr_db=None), calibration_data=cal) \
            if quant else {}
        _CACHE[key] = model, fxopt.optimize(model, cal[0][:2], target=engine, **kw)
    return _CACHE[key]


@pytest.mark.parametrize("quant", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["float", "int8"])
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_module_equals_its_graph_at_two_batches(engine, quant):
    model, opt = _optimized(engine, quant)
    assert opt.target == engine and opt.engine is not None
    info = opt.report.engine
    assert info["engine"] == engine and info["version"] and info["int8"] == quant
    assert info["check"]["batches"] == [2, 3]
    assert engine in str(opt.report)
    if quant:
        assert "lower_int8_cpu" not in opt.report.pipeline  # the engine runs the int8 IR
    g = torch.Generator().manual_seed(5)
    for batch in (2, 1, 8, 2):  # the example batch (OpenVINO's static model) and others
        x = torch.randn(batch, 3, 32, 32, generator=g)
        with torch.no_grad():
            got = opt(x.clone())
            ref = opt.graph_module(x.clone())
            exact = model(x.clone())
        assert got.shape == (batch, 10) and got.dtype == torch.float32
        if not quant:
            assert compare_outputs(got, ref).ok
        elif engine == "onnxruntime" and not int8_pairs_saturate():
            # ORT's VNNI int8 kernels reproduce fxopt's grids
            assert compare_within_step([got], [ref], info["output_step"]).ok
        else:
            # OpenVINO rounds some codes its own way (fxopt.export.engines docstring); so does
            # ORT's AVX2 kernels: a code off here and there against ORT's own unfused graph,
            # up to 4-5 output steps off fxopt's graph by resnet18's end (2026-12-07)
            assert rel_err(got, exact) <= INT8_ACCURACY_SLACK * rel_err(ref, exact) + 1e-6
    # float64 in, float64 out; no torch.no_grad needed
    y = opt(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert y.dtype == torch.float64 and not y.requires_grad


@pytest.mark.parametrize("engine", ENGINES)
def test_the_users_model_is_unchanged(engine):
    model = _resnet18().train()
    before = copy.deepcopy(model.state_dict())
    x = _batches()[0][:2]
    model.eval()
    fxopt.optimize(model, x, target=engine)
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_and_changed_weights_run_the_graph():
    model, opt = _optimized("onnxruntime", False)
    opt = copy.deepcopy(opt)  # the shared module of the other tests is left as it was
    x = torch.randn(2, 3, 32, 32)
    opt.train()
    assert opt(x).requires_grad  # the graph, with gradients
    opt.eval()
    with torch.no_grad():
        next(opt.graph_module.parameters()).mul_(2)
        with pytest.warns(UserWarning, match="weights changed"):
            got = opt(x)
        assert torch.equal(got, opt.graph_module(x))
    assert any("weights changed" in n for n in opt.report.notes)


def test_a_deep_copy_runs_on_the_shared_engine_and_watches_its_own_weights():
    _, opt = _optimized("onnxruntime", False)
    twin = copy.deepcopy(opt)
    assert twin.engine is not opt.engine and twin.engine.serves(twin.graph_module, (torch.randn(
        1, 3, 32, 32),), {})
    with torch.no_grad():
        next(twin.graph_module.parameters()).mul_(2)
    assert opt.engine.serves(opt.graph_module, (torch.randn(1, 3, 32, 32),), {})
    with pytest.warns(UserWarning, match="weights changed"):
        assert not twin.engine.serves(twin.graph_module, (torch.randn(1, 3, 32, 32),), {})


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_check_names_the_engine(engine):
    _, opt = _optimized(engine, False)
    x = torch.randn(2, 3, 32, 32)
    other = copy.deepcopy(opt.graph_module)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    with pytest.raises(NumericMismatchError) as e:
        check_engine(opt.engine, other, (x,))
    assert e.value.pass_name == f"deploy:{engine}"
    assert ("OpenVINO" if engine == "openvino" else "ONNX Runtime") in str(e.value)
    assert e.value.hint


@pytest.mark.parametrize("engine, module", [("openvino", "openvino"),
                                            ("onnxruntime", "onnxruntime")])
def test_a_missing_engine_is_not_available_with_a_pip_hint(monkeypatch, engine, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(NotAvailableError) as e:
        fxopt.optimize(_resnet18(), torch.randn(1, 3, 32, 32), target=engine)
    assert "pip install" in e.value.hint and engine in str(e.value)
    assert engine not in installed_engines()


def _openvino_bf16() -> str:
    """What OpenVINO's CPU plugin runs a bf16 hint in here: "bf16" where the CPU has bf16
    instructions (AVX-512 BF16, AMX), else "f32"."""
    if "openvino" not in installed_engines():
        return "f32"
    import openvino as ov
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in caps else "f32"


OV_BF16 = _openvino_bf16()


def test_precision_options_on_engines():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(NotAvailableError, match="precision='bf16'"):
        fxopt.optimize(_resnet18(), x, target="onnxruntime", precision="bf16")
    with pytest.raises(NotAvailableError, match="precision='fp16'"):
        fxopt.optimize(_resnet18(), x, target="openvino", precision="fp16", quantize="int8",
                       calibration_data=_batches())


@pytest.mark.skipif("openvino" not in installed_engines(), reason="openvino is not installed")
def test_openvino_int8_with_bf16_float_layers_is_held_to_the_int8_accuracy_bound():
    """``quantize="int8", precision="bf16"`` on OpenVINO: the engine compiles with bf16 for the
    layers left in float and is checked like an int8 engine (one output step, or no farther
    from the float model than 1.5x fxopt's own int8 graph); the graph itself is float32 +
    int8, the same as without ``precision``."""
    model, cal = _resnet18(), _batches()
    x = cal[0][:2]
    both = fxopt.optimize(model, x, target="openvino", precision="bf16", quantize="int8",
                          calibration_data=cal)
    int8 = fxopt.optimize(model, x, target="openvino", quantize="int8", calibration_data=cal)
    assert both.report.engine["precision"] == OV_BF16 and both.report.engine["int8"]
    assert int8.report.engine["precision"] == "f32"
    assert all(p.dtype == torch.float32 for p in both.graph_module.parameters()
               if p.is_floating_point())
    with torch.no_grad():
        ref = model(x)
        graph_err = rel_err(both.graph_module(x), ref)
        assert rel_err(both(x), ref) <= INT8_ACCURACY_SLACK * graph_err + 1e-6


@pytest.mark.skipif("openvino" not in installed_engines(), reason="openvino is not installed")
def test_openvino_bf16_is_checked_with_the_bf16_tolerance():
    model = _resnet18()
    x = _batches()[0][:2]
    opt = fxopt.optimize(model, x, target="openvino", precision="bf16")
    assert opt.report.engine["precision"] == OV_BF16  # f32 on a CPU without bf16
    assert opt.report.engine["check"]["tolerance"] == pytest.approx(1e-2)
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < 1e-2


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_best_times_cpu_and_every_engine_and_keeps_the_fastest():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(model, x, target="best")
    timings = opt.report.engine["timings_ms"]
    assert set(timings) == {"cpu", *installed_engines()}
    assert opt.target == min(timings, key=timings.get)
    assert any("target='best'" in n for n in opt.report.notes)
    with torch.no_grad():
        assert compare_outputs(opt(x), model(x)).ok


def test_measure_calls_each_candidate_back_to_back_in_its_turn(monkeypatch):
    """``target="best"``'s timing: in each turn a candidate waits, is called untimed, then
    timed, so no timed call is the first after another runtime's (PyTorch's spinning OpenMP
    threads slowed OpenVINO's next call 1.5x). The order of calls and pauses, not the time."""
    events = []
    monkeypatch.setattr("fxopt.infra.timing.time.sleep", lambda s: events.append("pause"))
    fns = {k: (lambda *a, k=k: events.append(k)) for k in ("cpu", "openvino")}
    timings = measure(fns, (torch.zeros(1),), repeats=3, warmup=1)
    assert set(timings) == {"cpu", "openvino"}
    assert events == ["pause", "cpu", "cpu", "pause", "openvino", "openvino"] * 4


def test_auto_does_not_time_or_pick_an_engine():
    opt = fxopt.optimize(SmallCNN().eval(), torch.randn(2, 3, 8, 8))
    assert opt.target == "cpu" and opt.engine is None and not opt.report.engine


@pytest.mark.parametrize("engine", ENGINES)
def test_small_int8_cnn_on_the_engine_is_within_one_output_step(engine):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(2)
    cal = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]
    opt = fxopt.optimize(model, cal[0][:2], target=engine, quantize="int8",
                         calibration_data=cal)
    step = opt.report.engine["output_step"]
    assert opt.report.engine["int8"] and step > 0
    for batch in (1, 8):
        x = torch.randn(batch, 3, 8, 8, generator=g)
        with torch.no_grad():
            assert compare_within_step([opt(x)], [opt.graph_module(x)], step).ok
            nhwc = x.to(memory_format=torch.channels_last)  # the engine takes any layout
            assert torch.equal(opt(nhwc), opt(x))


def test_deploy_refuses_non_tensor_inputs():
    gm = fxopt.optimize(SmallCNN().eval(), torch.randn(2, 3, 8, 8)).graph_module
    with pytest.raises(NotAvailableError, match="tensor inputs"):
        deploy(gm, (torch.randn(2, 3, 8, 8), 3), "onnxruntime")


def test_save_and_load_keep_the_graph(tmp_path):
    _, opt = _optimized("onnxruntime", False)
    x = torch.randn(2, 3, 32, 32)
    loaded = fxopt.load(opt.save(tmp_path / "m.fxopt"))
    assert loaded.engine is None  # the graph; optimize again to run on the engine
    with torch.no_grad():
        assert torch.equal(loaded(x), opt.graph_module(x))


@pytest.mark.parametrize("engine", ENGINES)
def test_torch_save_leaves_the_engine_behind_with_a_warning(engine):
    """torch.save of the whole module (pickle): the engine does not pickle; the module is
    saved without it, as fxopt.save writes it, with a warning (was: a raw pickling error)."""
    import io
    _, opt = _optimized(engine, False)
    x = torch.randn(2, 3, 32, 32)
    buf = io.BytesIO()
    with pytest.warns(UserWarning, match=f"leaves its {engine} engine behind"):
        torch.save(opt, buf)
    assert opt.engine is not None  # the module pickled keeps its engine
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.engine is None and loaded.target == engine
    with torch.no_grad():
        assert torch.equal(loaded(x), opt.graph_module(x))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # copies are not pickles: they keep the engine, silently
        assert copy.copy(opt).engine is opt.engine
        assert copy.deepcopy(opt).engine is not None


@pytest.mark.skipif("openvino" not in installed_engines(), reason="openvino is not installed")
def test_openvino_int8_grids_and_bias_correction_suit_openvino():
    """On OpenVINO: zero point 0 on every activation grid (its kernels then need no
    compensation step), and no new bias on a Linear that had none (a separate add there);
    the conv's and the biased Linear's biases are corrected."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.a, self.b = nn.Linear(8, 16, bias=False), nn.Linear(16, 4)

        def forward(self, x):
            y = nn.functional.silu(self.conv(x)).permute(0, 2, 3, 1)
            return self.b(nn.functional.gelu(self.a(y)))

    model = Net().eval()
    cal = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    opt = fxopt.optimize(model, cal[0], target="openvino", quantize="int8", calibration_data=cal)
    rec = opt.report.record("quantize_int8")
    assert rec.stats["bias_corrected"] == 2  # conv and b, not a (on a 4-D input)
    assert any("not bias-corrected" in n for n in rec.notes)
    gm = opt.graph_module
    zps = [getattr(gm, n.target) for n in gm.graph.nodes
           if n.op == "get_attr" and ("zp" in n.target or "zero_point" in n.target)]
    assert zps and all(int(z.abs().max()) == 0 for z in zps)
    cpu = fxopt.optimize(model, cal[0], quantize="int8", calibration_data=cal)
    assert cpu.report.record("quantize_int8").stats["bias_corrected"] == 3


class _Cancel(nn.Module):
    """``a(x) - b(x)`` with b's weights 1% off a's: bfloat16's own rounding of the weights is
    ~20-40% of the (small) result, whoever computes it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight * 1.01)

    def forward(self, x):
        return self.a(x) - self.b(x)


@pytest.mark.skipif("openvino" not in installed_engines(), reason="openvino is not installed")
def test_openvino_bf16_far_from_float32_passes_only_as_accurate_as_the_graph_in_bf16():
    model, x = _Cancel().eval(), torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    opt = fxopt.optimize(model, x, target="openvino", precision="bf16")
    check = opt.report.engine["check"]
    with torch.no_grad():
        far = rel_err(opt(x), model(x))
    if opt.report.engine["precision"] == "f32":
        # a CPU without bf16 instructions: OpenVINO compiled f32, and the report says so
        assert "no bf16 instructions" in opt.report.engine["note"]
        assert far < 1e-5 and check["measure"] != "bf16"
        pytest.skip("this CPU has no bf16 instructions: OpenVINO ran f32 (checked above)")
        low = copy.deepcopy(opt.graph_module).to(torch.bfloat16)
        own = rel_err(low(x.bfloat16()).float(), model(x))
    assert far > 1e-2  # beyond the plain bf16 tolerance: the allowance decided
    assert "bf16: rel err vs the float32 graph" in check["measure"]
    assert far <= INT8_ACCURACY_SLACK * own + 1e-6
    # a real difference (weights 5% off) is still a mismatch that names the engine
    other = copy.deepcopy(_Cancel().eval())
    with torch.no_grad():
        other.b.weight.mul_(1.05)
    gm = fxopt.optimize(other, x).graph_module
    with pytest.raises(NumericMismatchError, match="graph's own in bfloat16"):
        check_engine(opt.engine, gm, (x,))


def test_best_times_the_cpu_lowerings_too_unless_an_engine_is_named():
    """target='best' runs the cpu path with cpu_engine='fastest' where the int8 config says
    'auto' (the engines are timed; so are the two CPU lowerings); a named engine, dynamic
    int8 and float runs are left as given."""
    from fxopt.api import _fastest_cpu
    from fxopt.quant.config import QuantConfig
    assert _fastest_cpu({"quantize": "int8"})["quantize"].cpu_engine == "fastest"
    assert _fastest_cpu({"quantize": QuantConfig(min_sqnr_db=25.0)})["quantize"] == \
        QuantConfig(min_sqnr_db=25.0, cpu_engine="fastest")
    for kept in (None, "int8_dynamic", QuantConfig(cpu_engine="onednn")):
        assert _fastest_cpu({"quantize": kept}) == {"quantize": kept}
