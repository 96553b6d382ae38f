"""A forward that writes into its input (an in-place squeeze-excitation gate ``x.mul_(gate)``,
found by ``fxopt.fuzz``, seed 1005): every run fxopt makes takes copies, so the int8 lowering's
lockstep reference and the ONNX export's reference, trace and ONNX Runtime run each see the
caller's values, and the caller's tensor is left as it was."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt


class _GateInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Conv2d(15, 3, 1)
        self.fc2 = nn.Conv2d(3, 15, 1)

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x.mul_(gate)


def _model_and_input():
    torch.manual_seed(0)
    return _GateInPlace().eval(), torch.randn(2, 15, 14, 16)


def test_int8_lowering_of_a_graph_that_writes_its_input():
    m, x = _model_and_input()
    before = x.clone()
    cal = [torch.randn_like(x) for _ in range(6)]
    with pytest.warns(fxopt.Int8AccuracyWarning):  # a 3-channel SE bottleneck: a low SQNR
        opt = fxopt.optimize(m, x, quantize="int8", calibration_data=cal, target="cpu")
    assert torch.equal(x, before)  # was: lower_int8_cpu blamed for 2 output steps
    assert opt.report.record("lower_int8_cpu").status == "ok"


def test_onnx_export_of_a_graph_that_writes_its_input(tmp_path):
    pytest.importorskip("onnxruntime")
    m, x = _model_and_input()
    opt = fxopt.optimize(m, x)
    before = x.clone()
    fxopt.export_onnx(opt, x, tmp_path / "m.onnx")  # was: ORT 3e-2 off (ran on a changed x)
    assert torch.equal(x, before)
