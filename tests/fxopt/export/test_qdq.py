"""Int8 ONNX export as QDQ: both int8 forms (the IR, the CPU-lowered graph), run in ONNX Runtime.

Each round trip runs the file in an ONNX Runtime session (CPUExecutionProvider, default graph
optimizations: ORT fuses the QDQ groups into its own int8 kernels) and compares with the fxopt
module within one quantization step of the output. The golden tests pin the QDQ structure:
QuantizeLinear / DequantizeLinear counts, int8 weight initializers with per-channel scales.
"""
import warnings
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.quant.config import QuantConfig
from fxopt.export.onnx import export_onnx
from fxopt.export.qdq import compare_within_step, has_rule, qdq_rewrite, untranslated
from fxopt.export.qdq_cpu import CPU_RULES
from fxopt.export.qdq_ir import IR_RULES
from fxopt.export.onnx_ops import aten_dynamic_grid
from fxopt.ops.int8 import DEQUANTIZE, QUANTIZE
from fxopt.ops.int8_dynamic import dynamic_qparams
from fxopt.ops.schema import OPS, schema_of
from fxopt.tools import digits

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
numpy_helper = pytest.importorskip("onnx.numpy_helper")

FORMS = {"ir": ["lower_int8_cpu"], "cpu": []}  # disable=...


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def _ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _weights(model):
    """(int8 weight initializer, its per-channel scale) for each per-axis DequantizeLinear."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute):
            out.append((inits[n.input[0]], inits[n.input[1]], inits[n.input[2]],
                        next(a.i for a in n.attribute if a.name == "axis")))
    return out


def _check_qdq(model, n_weights):
    onnx.checker.check_model(model, full_check=True)
    weights = _weights(model)
    assert len(weights) == n_weights
    for w, scale, zp, axis in weights:
        assert str(w.dtype) == "int8" and axis == 0
        assert scale.shape == (w.shape[0],) and str(scale.dtype) == "float32"
        assert str(zp.dtype) == "int8" and not zp.any()
    float_weights = [i for i in model.graph.initializer
                     if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2]
    assert not float_weights  # no weight left in float
    assert not any(n.domain not in ("", "ai.onnx") for n in model.graph.node)
    assert "Identity" not in _ops(model)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    cache = tmp_path_factory.mktemp("digits")
    return digits.load_or_train_default(cache_dir=cache, progress=False, epochs=3).model.eval()


@pytest.mark.parametrize("form", list(FORMS))
def test_digits_int8_round_trip(tmp_path, digits_model, form):
    x = digits.example_batch(16)
    opt = fxopt.optimize(digits_model, x, quantize="int8",
                         calibration_data=digits.calibration_batches(2), disable=FORMS[form])
    lowered = any(getattr(schema_of(n.target), "family", None) == "cpu"
                  for n in opt.graph_module.graph.nodes)
    assert lowered == (form == "cpu")
    path = tmp_path / f"digits_{form}.onnx"
    result = export_onnx(opt, x, path)
    assert result.kept == [] and result.output_step > 0
    assert result.check.ok and result.check.max_abs <= result.output_step * (1 + 1e-4) + 1e-6
    model = onnx.load(str(path))
    _check_qdq(model, n_weights=9)  # 8 convs + fc
    ops = _ops(model)
    # input, 8 convs, 3 residual adds, the pooling, fc -> 14 grids written; 9 weights + 17
    # activation reads (8 convs, 2 per add, the pooling, fc, the output); the CPU form's
    # adds fused into their convs are written back as the IR had them
    assert ops["QuantizeLinear"] == 14 and ops["DequantizeLinear"] == 26, ops
    assert {"Conv", "Add", "Relu", "GlobalAveragePool", "Gemm"} <= set(ops)
    # an independent run on fresh inputs, optimizations off and on
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for batch in digits.calibration_batches(4)[2:]:
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name:
                                                      batch[:16].numpy()})[0])
            with torch.no_grad():
                stats = compare_within_step([got], [opt(batch[:16])], result.output_step)
            assert stats.ok, (form, level, stats.max_abs, result.output_step)


class SmallCNN(nn.Module):
    """relu6, a residual add, max pooling, cat of two branches, average pooling, a linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)  # F.max_pool2d(y, 2) trips quantize_int8 (positional args)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = F.relu6(self.bn1(self.c1(x)))
        y = F.relu(self.c2(y) + y)
        y = self.pool(y)
        y = torch.cat([F.relu(self.c3(y)), F.relu6(self.c4(y))], 1)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _cal(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


# QuantizeLinear / DequantizeLinear: the lowered graph runs relu6 as oneDNN's hardtanh post-op
# and writes the residual add fused into its conv back as the IR had it: the same as the IR's
GOLDEN = {"ir": (10, 17), "cpu": (10, 17)}


@pytest.mark.parametrize("form", list(FORMS))
def test_small_cnn_qdq_golden(tmp_path, form):
    torch.manual_seed(0)
    cal = _cal()
    opt = fxopt.optimize(SmallCNN().eval(), cal[0], quantize="int8", calibration_data=cal,
                         disable=FORMS[form])
    result = export_onnx(opt, cal[0], tmp_path / "small.onnx")
    assert result.kept == [] and result.check.ok
    assert result.check.max_abs <= result.output_step * (1 + 1e-4) + 1e-6
    model = onnx.load(str(result.path))
    _check_qdq(model, n_weights=5)
    ops = _ops(model)
    assert (ops["QuantizeLinear"], ops["DequantizeLinear"]) == GOLDEN[form], ops
    assert ops["Clip"] == 2 and ops["MaxPool"] == 1 and ops["Concat"] == 1 and ops["Add"] == 1
    assert ops["GlobalAveragePool"] == 1 and ops["Conv"] == 4 and ops["Gemm"] == 1
    if form == "ir":
        assert result.translated == {"quantize": 1, "conv2d_int8": 4, "add_int8": 1,
                                     "max_pool2d_int8": 1, "cat_int8": 1,
                                     "adaptive_avg_pool2d_int8": 1, "linear_int8": 1,
                                     "dequantize": 1}
    else:  # oneDNN's layers and the IR ops' CPU twins (the add apart: FUSE_RESIDUAL_ADD)
        assert result.translated == {"cpu_quantize": 1, "onednn_conv2d_int8": 4,
                                     "cpu_add_int8": 1,
                                     "cpu_max_pool2d_int8": 1, "cpu_cat_int8": 1,
                                     "cpu_adaptive_avg_pool2d_int8": 1,
                                     "onednn_linear_int8": 1, "cpu_dequantize": 1}
    # MaxPool reads and writes one grid: the same scale and zero point on both sides
    producers = {o: n for n in model.graph.node for o in n.output}
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    dq = producers[pool.input[0]]
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
             and n.input[0] == pool.output[0])
    assert dq.op_type == "DequantizeLinear" and list(dq.input[1:]) == list(q.input[1:])
    # the module was not touched: it still runs its int8 ops
    assert any("int8" in str(n.target) or "quantized" in str(n.target)
               for n in opt.graph_module.graph.nodes)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h) + h))


@pytest.mark.parametrize("reduce_range", [True, False])
def test_dynamic_int8_linear(tmp_path, reduce_range):
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    opt = fxopt.optimize(_MLP().eval(), x,
                         quantize=QuantConfig(mode="dynamic", reduce_range=reduce_range))
    result = export_onnx(opt, x, tmp_path / "dyn.onnx")
    assert result.translated == {"linear_int8_dynamic": 3} and result.kept == []
    assert result.check.ok and result.check.max_abs < 1e-5
    model = onnx.load(str(result.path))
    ops = _ops(model)
    if reduce_range:  # 7-bit: ATen's grid in standard ops, then QuantizeLinear
        _check_qdq(model, n_weights=3)
        assert ops["QuantizeLinear"] == 3 and ops["ReduceMin"] == 3 and ops["Gemm"] == 3
    else:  # 8-bit (the default on a VNNI CPU): ONNX's own dynamic grid
        assert ops["DynamicQuantizeLinear"] == 3 and ops["Gemm"] == 3
    x2 = 3 * torch.randn(8, 16)  # another range: another run-time grid, computed in the file
    with torch.no_grad():
        assert (_ort(result.path, x2) - opt(x2)).abs().max() < 1e-5


@pytest.mark.parametrize("reduce_range", [True, False])
def test_dynamic_grid_is_atens(reduce_range):
    g = torch.Generator().manual_seed(3)
    for lo, hi in [(-1.0, 2.0), (0.5, 3.0), (-4.0, -0.25), (-0.3, 0.3), (0.0, 0.0)]:
        x = lo + (hi - lo) * torch.rand(64, generator=g)
        want = dynamic_qparams(x, reduce_range)
        scale, zp = aten_dynamic_grid(x, reduce_range)
        assert (float(scale), int(zp)) == pytest.approx(want, rel=1e-6), (lo, hi)


def test_codes_op_without_translation_is_reported(tmp_path):
    """An op on codes that QDQ has no word for is exported as it is, named in a warning and in
    ``kept``."""
    g = fx.Graph()
    x = g.placeholder("x")
    s, z = g.get_attr("s"), g.get_attr("z")
    q = QUANTIZE.emit(g, x=x, scale=s, zp=z, qmin=0, qmax=255)
    q = g.call_function(torch.abs, (q,))  # on the codes: no QDQ translation known
    g.output(DEQUANTIZE.emit(g, q=q, scale=s, zp=z))
    root = nn.Module()
    root.register_buffer("s", torch.tensor(0.05))
    root.register_buffer("z", torch.tensor(128))
    gm = fx.GraphModule(root, g)
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="no ONNX translation for abs"):
        result = export_onnx(gm, x, tmp_path / "k.onnx", check=False)
    assert len(result.kept) == 1 and "abs" in result.kept[0]
    onnx.checker.check_model(str(result.path))


def test_int8_needs_opset_13(tmp_path):
    cal = _cal(2)
    opt = fxopt.optimize(SmallCNN().eval(), cal[0], quantize="int8", calibration_data=cal)
    with pytest.raises(fxopt.InputError, match="opset >= 13"):
        export_onnx(opt, cal[0], tmp_path / "old.onnx", opset=11)
    assert list(tmp_path.iterdir()) == []


def test_cli_int8_onnx(tmp_path, capsys, monkeypatch):
    from fxopt.tools import cli

    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "LATENCY_BUDGET_S", 0.0)
    path = tmp_path / "digits_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(["optimize", "--epochs", "3", "--no-prune", "--quantize", "int8",
                       "--no-progress", "--onnx", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"wrote {path}" in out and "QDQ" in out
    model = onnx.load(str(path))
    _check_qdq(model, n_weights=9)


# -- the QDQ table: every row fires, an op without a row is kept --------------------------------
class RowNet(nn.Module):
    """The int8 ops the quantization writes, each at least once: a conv with relu, a plain conv
    into an add, an add with relu, max pooling, a product with a pooled gate (broadcast), cat,
    average pooling, linear with relu, linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        y = F.relu(self.c1(x))
        z = F.relu(self.c3(self.c2(y) + y) + y)
        z = self.pool(z)
        z = torch.cat([z, self.c4(z) * F.adaptive_avg_pool2d(z, 1)], 1)
        return self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(z, 1).flatten(1))))


class OneDNNNet(nn.Module):
    """Layers whose activation only oneDNN's int8 kernels fuse on the CPU (hardswish, SiLU,
    GELU), and a squeeze-excitation gate whose conv + hardsigmoid runs on oneDNN's float output
    (the activation after it): the CPU lowering writes fxopt.onednn_*_int8 between int_repr and
    a re-wrap."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.silu(self.c2(F.hardswish(self.c1(x))))
        y = y * F.hardsigmoid(self.gate(F.adaptive_avg_pool2d(y, 1)))
        return F.gelu(self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1)))


def _mul_relu_graph() -> fx.GraphModule:
    """quantized.mul_relu of a quantized input and its pooled gate (lower_int8_cpu writes it for
    a mul_int8 with act="relu", which quantize_int8 does not write)."""
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.quantize_per_tensor, (x, 0.05, 128, torch.quint8))
    p = g.call_function(F.adaptive_avg_pool2d, (x, 1))
    b = g.call_function(torch.quantize_per_tensor, (p, 0.01, 100, torch.quint8))
    m = g.call_function(torch.ops.quantized.mul_relu, (a, b, 0.002, 0))
    g.output(g.call_method("dequantize", (m,)))
    return fx.GraphModule(nn.Module(), g)


def _same_grid_graph() -> fx.GraphModule:
    """The float ops PyTorch runs on quantized tensors (each keeps its input's grid), in a
    hand-built lowered graph: quantize_per_tensor, relu (both spellings), relu6, hardtanh,
    clamp, avg/max/adaptive pooling, then ``.dequantize()``."""
    g = fx.Graph()
    q = g.call_function(torch.quantize_per_tensor, (g.placeholder("x"), 0.05, 128, torch.quint8))
    for fn, args in [(F.relu, ()), (torch.relu, ()), (F.relu6, ()), (F.hardtanh, (-1.0, 2.0)),
                     (torch.clamp, (-0.5, 1.5)), (F.avg_pool2d, (2,)), (F.max_pool2d, (2,)),
                     (F.adaptive_avg_pool2d, (1,))]:
        q = g.call_function(fn, (q, *args))
    g.output(g.call_method("dequantize", (q,)))
    return fx.GraphModule(nn.Module(), g)


@pytest.fixture(scope="module")
def fired(tmp_path_factory):
    """({form: translated counts}, {form: the graphs' call targets}) over small graphs exported
    in ONNX Runtime (each checked)."""
    tmp = tmp_path_factory.mktemp("rows")
    torch.manual_seed(0)
    cal = _cal(3)
    out = {"ir": Counter(), "cpu": Counter()}
    present: dict[str, set] = {"ir": set(), "cpu": set()}

    def export(module, x, path):  # export_onnx, noting which calls the graph holds
        gm = getattr(module, "graph_module", module)
        present[form].update(n.target for n in gm.graph.nodes
                             if n.op in ("call_function", "call_method"))
        return export_onnx(module, x, path)

    for form in FORMS:
        opt = fxopt.optimize(RowNet().eval(), cal[0], quantize="int8", calibration_data=cal,
                             disable=FORMS[form])
        result = export(opt, cal[0], tmp / f"rows_{form}.onnx")
        assert result.kept == [] and result.check.ok, (form, result.kept)
        out[form].update(result.translated)
    form = "cpu"
    opt = fxopt.optimize(OneDNNNet().eval(), cal[0], quantize="int8", calibration_data=cal)
    result = export(opt, cal[0], tmp / "rows_onednn.onnx")
    assert result.kept == [] and result.check.ok, result.kept
    out["cpu"].update(result.translated)
    x, form = torch.randn(4, 16), "ir"
    opt = fxopt.optimize(_MLP().eval(), x, quantize="int8_dynamic")
    result = export(opt, x, tmp / "rows_dyn.onnx")
    assert result.check.ok
    out["ir"].update(result.translated)
    x, form = 2 * torch.randn(2, 3, 16, 16), "cpu"
    result = export(_same_grid_graph(), x, tmp / "rows_same_grid.onnx")
    assert result.kept == [] and result.check.ok
    out["cpu"].update(result.translated)
    result = export(_mul_relu_graph(), x, tmp / "rows_mul_relu.onnx")
    assert result.kept == [] and result.check.ok
    out["cpu"].update(result.translated)
    return out, present


def _calls(rule, targets: set) -> bool:
    """Whether the graphs hold a call the row is for (an op, function or method name)."""
    return any(t in targets for t in rule.root.targets)


@pytest.mark.parametrize("form,row", [("ir", r) for r in IR_RULES]
                         + [("cpu", r) for r in CPU_RULES], ids=lambda r: getattr(r, "name", r))
def test_every_row_fires_where_its_op_occurs(fired, form, row):
    """Each row fires on the shared graphs wherever they hold its op. (A row for a new op is
    tested in that op's own test module; these graphs need not grow with the table.)"""
    counts, present = fired
    if _calls(row, present[form]):
        assert counts[form][row.name] > 0, (form, row.name, dict(counts[form]))


def test_the_shared_graphs_reach_most_rows(fired):
    """The shared graphs hold an op for every row they were written for (the table's rows on
    2026-12-06): a row that stops firing there is a regression, not a new op."""
    counts, _ = fired
    assert sum(1 for r in IR_RULES if counts["ir"][r.name]) >= 10
    fired_cpu = sorted(r.name for r in CPU_RULES if counts["cpu"][r.name])
    assert len(fired_cpu) >= 18, fired_cpu


def test_one_cpu_row_per_op_the_cpu_lowering_writes():
    """Every op of the schema's cpu family (what ``lower_int8_cpu`` writes) has its row."""
    names = {r.name for r in CPU_RULES}
    assert all(op.name in names for op in OPS.values() if op.family == "cpu")
    assert all(has_rule(t) for op in OPS.values() if op.family == "cpu"
               for t in op.view.targets())


def test_one_ir_row_per_int8_op():
    """A new op of the schema's int8 family needs its row (named as the op)."""
    assert sorted(r.name for r in IR_RULES) == sorted(op.name for op in OPS.values()
                                                     if op.family == "int8")
    assert all(has_rule(t) for op in OPS.values() if op.family == "int8"
               for t in op.view.targets())


def test_quantized_op_without_row_is_kept():
    """A PyTorch quantized op the table has no row for (quantized::hardswish) stays as it is:
    named in ``kept`` (it reads codes) and among the int8 ops left (``untranslated``)."""
    g = fx.Graph()
    q = g.call_function(torch.quantize_per_tensor, (g.placeholder("x"), 0.05, 128, torch.quint8))
    m = g.call_function(torch.ops.quantized.hardswish, (q, 0.1, 128))
    g.output(g.call_method("dequantize", (g.call_function(F.relu, (m,)),)))
    rw = qdq_rewrite(fx.GraphModule(nn.Module(), g))
    assert rw.translated == {"quantize_per_tensor": 1}
    assert len(rw.kept) == 1 and "quantized.hardswish" in rw.kept[0]
    assert untranslated(rw.gm) == rw.kept
    # its output is not known to hold codes: the relu and dequantize after it are left alone
    assert sum(n.target in (F.relu, "dequantize") for n in rw.gm.graph.nodes) == 2
