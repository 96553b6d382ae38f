"""ONNX export: optimized float models, checked by onnx.checker and run in ONNX Runtime."""
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.errors import InputError
from fxopt.export.onnx import decompose_fused_ops, export_onnx
from fxopt.ir.tolerances import compare_outputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torchvision = pytest.importorskip("torchvision")


def _resnet18():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    for mod in m.modules():  # non-default statistics: the defaults hide folding mistakes
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def _run_ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def _node_ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("kind", ["float", "fused", "pruned"])
def test_resnet18_round_trip(tmp_path, kind):
    x = torch.randn(1, 3, 64, 64)
    kwargs = {"float": {"pipeline": ["cleanup"]}, "fused": {}, "pruned": {"prune": 0.5}}[kind]
    opt = fxopt.optimize(_resnet18(), x, **kwargs)
    fused = sum(1 for n in opt.graph_module.graph.nodes
                if n.op == "call_function" and "fxopt" in str(n.target))
    assert (fused > 0) == (kind != "float")
    path = tmp_path / f"resnet18_{kind}.onnx"
    result = export_onnx(opt, x, path)
    assert result.path == path and path.exists()
    assert result.kept == []
    assert sum(result.translated.values()) == fused
    assert result.check is not None and result.check.ok
    onnx.checker.check_model(str(path), full_check=True)
    ops = _node_ops(path)
    assert "Conv" in ops and not any("fxopt" in op for op in ops)
    with torch.no_grad():
        ref = opt(x)
    stats = compare_outputs(_run_ort(path, x), ref)
    assert stats.ok, f"{kind}: rel err {stats.rel_err:.2e}"
    if kind == "pruned":  # the file carries the pruned weights
        conv_weights = [i for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 4]
        full = sum(p.numel() for p in _resnet18().parameters() if p.dim() == 4)
        assert sum(int(torch.tensor(w.dims).prod()) for w in conv_weights) < 0.5 * full
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 16)
        self.c = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x, s):
        h = torch.relu(self.a(x))
        h = torch.nn.functional.gelu(self.b(h) + h)
        return h, torch.nn.functional.silu(self.c(s))


def test_linear_and_conv1d_decomposed(tmp_path):
    x, s = torch.randn(2, 8), torch.randn(2, 4, 10)
    opt = fxopt.optimize(_MLP().eval(), (x, s))
    result = export_onnx(opt, (x, s), tmp_path / "mlp.onnx")
    assert result.translated.get("linear_act", 0) == 2
    assert result.translated.get("conv1d_act", 0) == 1
    assert result.check.ok
    # the decomposition works on a copy: the module still calls the fused ops
    assert any("fxopt" in str(n.target) for n in opt.graph_module.graph.nodes)


def test_decompose_matches_module():
    x = torch.randn(1, 3, 32, 32)
    opt = fxopt.optimize(_resnet18(), x)
    plain, translated, kept = decompose_fused_ops(opt.graph_module)
    assert translated and not kept
    assert not any("fxopt" in str(n.target) for n in plain.graph.nodes)
    with torch.no_grad():
        assert compare_outputs(plain(x), opt(x)).ok


def test_bad_path_and_inputs(tmp_path):
    m = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(1, 4)
    with pytest.raises(fxopt.InputError, match="directory"):
        export_onnx(m, x, tmp_path)
    with pytest.raises(fxopt.InputError):
        export_onnx(m, None, tmp_path / "m.onnx")
    with pytest.raises(fxopt.InputError):
        export_onnx(m, x, 42)
    with pytest.raises(fxopt.InputError):
        export_onnx("not a module", x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    # a plain module exports too, into a folder that is created
    result = export_onnx(m, x, tmp_path / "sub" / "m.onnx")
    assert result.path.exists() and result.check.ok


def test_failed_export_leaves_no_file(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x).real  # no ONNX translation

    with pytest.raises(fxopt.UnsupportedOpError):
        export_onnx(Bad(), torch.randn(1, 3, 3), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_onnx_and_pictures(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from fxopt.tools import cli

    monkeypatch.setattr(cli, "LATENCY_BUDGET_S", 0.0)
    onnx_path, out_dir = tmp_path / "r18.onnx", tmp_path / "build"
    rc = cli.main(["optimize", "--model", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                   "--no-progress", "--onnx", str(onnx_path), "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    onnx.checker.check_model(str(onnx_path))
    assert f"wrote {onnx_path}" in out
    for name in ("graph_before.png", "graph_after.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 20_000


def test_decompose_keeps_ops_without_translation():
    """An fxopt op is decomposed when its schema says how (``decompose``), left for the QDQ
    table when that has a row for it, and otherwise kept as it is and reported."""
    import torch.fx as fx

    from fxopt.ops.fused import LINEAR_ACT
    from fxopt.ops.int8 import QUANTIZE
    from fxopt.ops.triton_int8 import TRITON_DEQUANTIZE

    g = fx.Graph()
    y = LINEAR_ACT.emit(g, x=g.placeholder("x"), weight=g.get_attr("w"), bias=None, act="relu")
    q = QUANTIZE.emit(g, x=y, scale=g.get_attr("s"), zp=g.get_attr("z"), qmin=0, qmax=255)
    g.output(TRITON_DEQUANTIZE.emit(g, q=q, scale=0.05, zp=128))
    root = nn.Module()
    root.register_buffer("w", torch.randn(4, 4))
    root.register_buffer("s", torch.tensor(0.05))
    root.register_buffer("z", torch.tensor(128))
    plain, translated, kept = decompose_fused_ops(fx.GraphModule(root, g))
    assert translated == {"linear_act": 1}
    assert len(kept) == 1 and "triton_dequantize" in kept[0]  # quantize: the QDQ table's
    assert sum(QUANTIZE.view.matches(n) for n in plain.graph.nodes) == 1


class _Gate(nn.Module):
    """A squeeze-excitation block with hardsigmoid gates (MobileNetV3's), and a bare one."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        s = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), True)))))
        return nn.functional.hardsigmoid(y * s)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_hardsigmoid_is_written_in_atens_clip_form(tmp_path, quantize):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, x = _Gate().eval(), torch.randn(2, 3, 12, 12)
    opt = fxopt.optimize(model, x, quantize=quantize, calibration_data=[x] if quantize else None)
    path = tmp_path / "gate.onnx"
    export_onnx(opt, x, path)  # checked against opt by ONNX Runtime inside
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "HardSigmoid" not in ops and ops.count("Clip") == 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if quantize is None:
        assert compare_outputs(got, model(x)).ok
    # the exporter's own table is untouched afterwards: a plain export still writes HardSigmoid
    plain = tmp_path / "plain.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Hardsigmoid(), (x,), str(plain), dynamo=False, opset_version=17)
    assert [n.op_type for n in onnx.load(str(plain)).graph.node] == ["HardSigmoid"]


def test_engine_onnxruntime_writes_hardsigmoid_as_one_op(tmp_path):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model, x = _Gate().eval(), torch.randn(2, 3, 12, 12)
    opt = fxopt.optimize(model, x)
    path = tmp_path / "gate.onnx"
    export_onnx(opt, x, path, engine="onnxruntime")  # checked by ONNX Runtime inside
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("HardSigmoid") == 2 and "Clip" not in ops
    export_onnx(opt, x, path, engine="openvino")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "HardSigmoid" not in ops and ops.count("Clip") == 2
    with pytest.raises(InputError, match="engine must be"):
        export_onnx(opt, x, tmp_path / "bad.onnx", engine="tensorrt")
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.skipif(not __import__("fxopt.ir.precision", fromlist=["x"]).cpu_native_bf16(),
                    reason="needs a CPU with native bf16")
def test_bf16_module_export_names_the_dtype_when_onnx_runtime_refuses(tmp_path):
    """A ``precision="bf16"`` module exports bf16 matmuls, which ONNX Runtime's CPU provider
    cannot run: the typed error says the module is bf16 and how to export it instead; no file
    is left behind. With ``check=False`` the file is written."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 16)
    opt = fxopt.optimize(model, x, precision="bf16")
    with pytest.raises(fxopt.errors.UnsupportedOpError, match="bfloat16") as e:
        export_onnx(opt, x, tmp_path / "m.onnx")
    assert "precision='bf16'" in e.value.hint and not (tmp_path / "m.onnx").exists()
    export_onnx(opt, x, tmp_path / "m.onnx", check=False)
    assert (tmp_path / "m.onnx").exists()
