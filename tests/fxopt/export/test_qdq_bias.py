"""A QDQ file runs in ONNX Runtime as fxopt's int8 graph does, biases included.

ONNX Runtime fuses ``DequantizeLinear -> Conv(float bias) -> QuantizeLinear`` into QLinearConv
and rounds the float bias onto the int32 grid ``x_scale * w_scale``; fxopt's int8 layers add
their bias on that grid (``make_plan``, ``fxopt.quant.qparams.on_accumulator_grid``), so the
rounding changes nothing. Before, a bias-corrected ResNet-18 ran 3-6 output steps off fxopt's
graph. The network here shows the same fault in a second: a conv with BatchNorm randomized
(its folded bias off the grid), bias correction on, and one large weight column on an input
channel the data leaves at zero (a coarse weight grid, so a coarse accumulator grid against a
fine output grid): 7 output steps before the fix (3-7 over seeds 0-7), 0 after.
"""
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.export.onnx import export_onnx
from fxopt.export.qdq import compare_within_step
from fxopt.ir.graph import get_attr_value
from fxopt.ops.int8 import Int8Layer
from fxopt.quant.qparams import on_accumulator_grid

ort = pytest.importorskip("onnxruntime")


class Outlier(nn.Module):
    """conv + BatchNorm, its feature map out (no later layer to average the codes' errors
    away): one large weight column on an input channel the data leaves at zero."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        with torch.no_grad():
            self.conv.weight.mul_(0.02)[:, 0] = 100.0
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.bn(self.conv(x))


def _data(n, g):
    x = torch.randn(n, 3, 8, 8, generator=g)
    x[:, 0] = 0
    return x


def _optimized(target="cpu"):
    torch.manual_seed(3)
    model = Outlier().eval()
    g = torch.Generator().manual_seed(1)
    cal = [_data(4, g) for _ in range(3)]
    # 7-bit grids: ONNX Runtime's U8S8 kernels saturate full 8-bit codes on CPUs without VNNI
    opt = fxopt.optimize(model, cal[0][:2], quantize=fxopt.QuantConfig(reduce_range=True),
                         calibration_data=cal, target=target)
    return opt, cal, _data(16, g)


def test_onnx_runtime_runs_a_bias_corrected_int8_net_within_one_step(tmp_path):
    opt, cal, x = _optimized()
    assert opt.report.record("quantize_int8").stats["bias_corrected"] == 1
    path = tmp_path / "outlier_int8.onnx"
    result = export_onnx(opt, cal[0][:2], path, check=False)  # the comparison is below
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = opt(x.clone())
    stats = compare_within_step([got], [ref], result.output_step)
    assert stats.ok, (stats.max_abs / result.output_step, "output steps")


def test_int8_layers_add_their_bias_on_the_accumulator_grid():
    opt, _, _ = _optimized("onnxruntime")  # the engine target keeps the int8 IR
    gm, seen = opt.graph_module, 0
    for n in gm.graph.nodes:
        v = Int8Layer.match(n)
        if v is None:
            continue
        bias = get_attr_value(gm, v.bias.target)
        xs, ws = get_attr_value(gm, v.x_scale.target), get_attr_value(gm, v.w_scale.target)
        assert torch.equal(bias, on_accumulator_grid(bias, xs, ws))
        seen += 1
    assert seen == 1
