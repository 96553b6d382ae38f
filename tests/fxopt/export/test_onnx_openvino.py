"""fxopt's QDQ .onnx in OpenVINO: ``openvino.Core().read_model`` on the file ``export_onnx``
wrote for an int8 module, compiled for the CPU (float32 inference precision), run at batch 1
and 8 from the one file (its batch is dynamic), within one output int8 step of fxopt's module.

The digits ResNet fxopt ships trained is within one step on every held-out batch. An untrained
ResNet-18 is not: OpenVINO rounds codes near a rounding tie its own way
(its FakeQuantize arithmetic: the first code it differs on, with that layer's input codes
equal to fxopt's, is an exact 117.4999974 that fxopt and ONNX Runtime round to 117 and
OpenVINO to 118), and the untrained ResNet-18 amplifies each flip: 4-8 output steps at the end
(8 batches, 2026-12-06), with the same error against the float model as fxopt's own int8
(0.82-1.01 times it). Its test asserts that allowance
(``fxopt.export.engines.INT8_ACCURACY_SLACK``) and the one step on the small CNN.

ONNX Runtime (the export's own check) ran this ResNet-18 4-7 output steps off fxopt's graph
until the int8 layers added their bias on the int32 accumulator grid as its QLinearConv does
(``test_qdq_bias.py``); now it runs it code for code on 6 of 8 batches, and 2-3 steps off
on the other two, from the same kind of near-tie flip (a value within 2e-6 of a tie,
fxopt's float32 epilogue against ORT's requantization), amplified.
"""
import pytest
import torch
import torch.nn as nn
import torchvision

import fxopt
from fxopt.export.engines import INT8_ACCURACY_SLACK
from fxopt.export.onnx import export_onnx
from fxopt.export.qdq import compare_within_step
from fxopt.ir.tolerances import rel_err

ov = pytest.importorskip("openvino")


class CNN(nn.Module):
    """conv + BatchNorm + relu, max pooling, a residual conv, global pooling, a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = nn.functional.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _openvino_within_one_step(model, shape, tmp_path, *, one_step=True):
    g = torch.Generator().manual_seed(3)
    cal = [torch.randn(4, *shape, generator=g) for _ in range(3)]
    # 7-bit grids: the export's own check runs ONNX Runtime, whose U8S8 kernels were 3-4 output
    # steps off resnet18 on full 8-bit grids (fxopt.quant.isa.resolve_reduce_range)
    opt = fxopt.optimize(model, cal[0][:2], quantize=fxopt.QuantConfig(reduce_range=True),
                         calibration_data=cal)
    path = tmp_path / "model_int8.onnx"
    result = export_onnx(opt, cal[0][:2], path)
    assert result.output_step and result.dynamic_batch
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    for batch in (1, 8):
        x = torch.randn(batch, *shape, generator=g)
        got = torch.from_numpy(compiled(x.numpy())[compiled.outputs[0]])
        with torch.no_grad():
            ref, exact = opt(x.clone()), model(x.clone())
        assert got.shape == ref.shape == (batch, 10)
        stats = compare_within_step([got], [ref], result.output_step)
        if one_step:
            assert stats.ok, (batch, stats.max_abs, result.output_step)
        else:
            assert rel_err(got, exact) <= INT8_ACCURACY_SLACK * rel_err(ref, exact), batch


def test_small_int8_cnn_qdq_file_runs_in_openvino(tmp_path):
    torch.manual_seed(0)
    _openvino_within_one_step(CNN().eval(), (3, 16, 16), tmp_path)


@pytest.mark.parametrize("reduce_range", ["auto", True])
def test_trained_digits_int8_qdq_file_within_one_step_in_openvino(tmp_path, reduce_range):
    """The model fxopt ships trained (the digits ResNet), on the held-out digits: OpenVINO runs
    fxopt's QDQ file within one output int8 step of fxopt's module at batch 1 and 8 from the one
    file, on this CPU's default grids (8-bit with VNNI/AMX, 7-bit weights without) and on 7-bit
    activation grids (issue 13's aim; measured 2026-12-06 on an AVX-512 VNNI CPU: at most 1.0
    step over the 45 test batches of 8 and their first images). 8-bit weights times 8-bit
    activations are not exact in any engine on a CPU without VNNI (fxopt.ops.isa): the export's
    check refuses them there (test_isa.py)."""
    from fxopt.tools import digits
    model = digits.load_or_train_default(cache_dir=tmp_path / "cache", progress=False,
                                         epochs=3).model.eval()
    x = digits.example_batch(16)
    opt = fxopt.optimize(model, x, quantize=fxopt.QuantConfig(reduce_range=reduce_range),
                         calibration_data=digits.calibration_batches(4))
    path = tmp_path / "digits_int8.onnx"
    result = export_onnx(opt, x, path)
    assert result.output_step and result.dynamic_batch
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    batches = 0
    for xb, _ in digits.test_loader(batch_size=8):
        for b in (xb[:1], xb):
            got = torch.from_numpy(compiled(b.numpy())[compiled.outputs[0]])
            with torch.no_grad():
                ref = opt(b.clone())
            assert got.shape == ref.shape
            stats = compare_within_step([got], [ref], result.output_step)
            assert stats.ok, (b.shape[0], stats.max_abs / result.output_step)
            batches += 1
    assert batches >= 80


@pytest.mark.slow
def test_resnet18_int8_qdq_file_runs_in_openvino(tmp_path):
    torch.manual_seed(0)
    _openvino_within_one_step(torchvision.models.resnet18(num_classes=10).eval(), (3, 32, 32),
                              tmp_path, one_step=False)


class ChannelsLastMLP(nn.Module):
    """A ConvNeXt block's shape: conv, permute to channels-last, Linear-GELU-Linear on a 4-D
    input, permute back, residual."""

    def __init__(self, c=16):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(nn.functional.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + y


def _runtime_ops(compiled):
    from collections import Counter
    return Counter(n.get_rt_info()["layerType"].astype(str)
                   for n in compiled.get_runtime_model().get_ops())


def test_linear_weights_in_openvinos_layout(tmp_path):
    """F.linear on a 4-D input exports as MatMul with the weight folded to [in, out]; from that
    OpenVINO compiled two more runtime Transposes and Reorders per Linear than from its own
    conversion. The OpenVINO form stores [out, in] and a Transpose: the same runtime graph as
    OpenVINO's own, the same outputs; ONNX Runtime's form is left as the exporter wrote it."""
    import onnx
    torch.manual_seed(0)
    m, x = ChannelsLastMLP().eval(), torch.randn(1, 16, 8, 8)
    opt = fxopt.optimize(m, x)
    paths = {e: tmp_path / f"mlp_{e}.onnx" for e in ("openvino", "onnxruntime")}
    for engine, path in paths.items():
        export_onnx(opt, x, path, engine=engine, dynamic_batch=False)
    for engine, path in paths.items():
        model = onnx.load(str(path))
        inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"]
        assert len(weights) == 2
        if engine == "openvino":
            assert all(producer[w].op_type == "Transpose" for w in weights)
            assert sorted(inits[producer[w].input[0]] for w in weights) == [(16, 64), (64, 16)]
            assert not any(dims in ((16, 64), (64, 16)) and name in weights
                           for name, dims in inits.items())
        else:
            assert all(w in inits for w in weights)
    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": "f32"}
    own = ov.convert_model(m, example_input=x)
    compiled = {e: core.compile_model(core.read_model(str(p)), "CPU", cfg)
                for e, p in paths.items()}
    compiled["own"] = core.compile_model(own, "CPU", cfg)
    ops = {k: _runtime_ops(c) for k, c in compiled.items()}
    assert ops["openvino"]["Transpose"] == ops["own"]["Transpose"], ops
    with torch.no_grad():
        ref = m(x)
    for c in compiled.values():
        got = torch.from_numpy(c(x.numpy())[c.outputs[0]])
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
