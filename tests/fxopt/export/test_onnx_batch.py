"""ONNX export with a dynamic batch: one file, run in ONNX Runtime at batch 1 and 8.

Float files are compared with the fxopt module by the float tolerance table, QDQ files within
one output step. A graph that holds the batch size as a constant is refused with a typed error
(its hint: ``dynamic_batch=False``), and ``dynamic_batch=False`` writes the example batch.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.export.onnx import export_onnx
from fxopt.export.qdq import compare_within_step
from fxopt.ir.tolerances import compare_outputs
from seeded_models import with_bn_stats  # tests/support, on the path from tests/conftest.py

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class FlattenCNN(nn.Module):
    """conv + BatchNorm + relu, max pooling, a flatten by view(N, -1), two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 10)

    def forward(self, x):
        y = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc2(F.relu(self.fc1(y.view(y.size(0), -1))))


def _model():
    return with_bn_stats(FlattenCNN, 0, 0.2, (0.5, 1.5), lambda m: (m.bn,))


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _run_batches(path, opt, shape, step=None):
    """The one file at batch 1 and 8 against the module: the stats for each."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    g = torch.Generator().manual_seed(7)
    out = {}
    for batch in (1, 8):
        x = torch.randn(batch, *shape, generator=g)
        (got,) = session.run(None, {name: x.numpy()})
        got = torch.from_numpy(got)
        with torch.no_grad():
            ref = opt(x.clone())
        assert got.shape[0] == batch
        out[batch] = compare_outputs(got, ref) if step is None else \
            compare_within_step([got], [ref], step)
    return out


def test_float_cnn_runs_at_batch_1_and_8(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(_model(), x)
    path = tmp_path / "cnn.onnx"
    result = export_onnx(opt, x, path)
    assert result.dynamic_batch and result.batches == (2, 3) and result.check.ok
    model = onnx.load(str(path))
    assert [_dims(i) for i in model.graph.input] == [["batch", 3, 8, 8]]
    assert [_dims(o) for o in model.graph.output] == [["batch", 10]]
    for batch, stats in _run_batches(path, opt, (3, 8, 8)).items():
        assert stats.ok, (batch, stats.rel_err)


def test_int8_qdq_runs_at_batch_1_and_8(tmp_path):
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]
    x = cal[0][:2]
    opt = fxopt.optimize(_model(), x, quantize="int8", calibration_data=cal)
    path = tmp_path / "cnn_int8.onnx"
    result = export_onnx(opt, x, path)
    assert result.output_step > 0 and result.batches == (2, 3) and result.kept == []
    model = onnx.load(str(path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert _dims(model.graph.input[0])[0] == "batch"
    for batch, stats in _run_batches(path, opt, (3, 8, 8), result.output_step).items():
        assert stats.ok, (batch, stats.max_abs, result.output_step)


def test_resnet18_runs_at_batch_1_and_8(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    opt = fxopt.optimize(torchvision.models.resnet18(weights=None).eval(), x, prune=0.5)
    path = tmp_path / "r18.onnx"
    result = export_onnx(opt, x, path)
    assert result.batches == (1, 2) and result.translated
    for batch, stats in _run_batches(path, opt, (3, 32, 32)).items():
        assert stats.ok, (batch, stats.rel_err)


def test_fixed_batch_keeps_the_example_shape(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(_model(), x)
    path = tmp_path / "fixed.onnx"
    result = export_onnx(opt, x, path, dynamic_batch=False)
    assert not result.dynamic_batch and result.batches == (2,) and result.check.ok
    model = onnx.load(str(path))
    assert _dims(model.graph.input[0]) == [2, 3, 8, 8]
    assert _dims(model.graph.output[0]) == [2, 10]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # ORT refuses another batch
        session.run(None, {session.get_inputs()[0].name: torch.randn(3, 3, 8, 8).numpy()})


class MixesBatch(nn.Module):
    """Depends on the whole batch (centres on its mean): legitimately batch-dependent."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x - x.mean(0, keepdim=True))


def test_batch_dependent_model_is_exported_as_it_is(tmp_path):
    x = torch.randn(3, 6)
    opt = fxopt.optimize(MixesBatch().eval(), x)
    path = tmp_path / "mix.onnx"
    assert export_onnx(opt, x, path).batches == (3, 4)
    for batch, stats in _run_batches(path, opt, (6,)).items():
        assert stats.ok, (batch, stats.rel_err)


class BakedBatch(nn.Module):
    """Runs at any batch in PyTorch, but the traced file holds the batch as a constant."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(x.reshape(int(x.shape[0]), -1))


class SlicesBatch(nn.Module):
    """The traced file slices the batch to its example size: it runs at another batch but gives
    the wrong number of rows."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(x[:int(x.shape[0])].flatten(1))


class OnlyBatchTwo(nn.Module):
    """The module itself runs at batch 2 only."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(x.reshape(2, 12))


@pytest.mark.parametrize("model", [BakedBatch, SlicesBatch, OnlyBatchTwo])
def test_batch_held_as_a_constant_is_refused(tmp_path, model):
    m, x = model().eval(), torch.randn(2, 3, 4)
    with pytest.raises(fxopt.UnsupportedOpError, match="batch 3") as info:
        export_onnx(m, x, tmp_path / "baked.onnx")
    assert "dynamic_batch=False" in info.value.hint
    assert list(tmp_path.iterdir()) == []  # nothing written
    result = export_onnx(m, x, tmp_path / "baked.onnx", dynamic_batch=False)
    assert result.check.ok and result.batches == (2,)
