"""``QuantConfig(activation_symmetric="auto")``: zero point 0 on every activation grid (uint8
where the data is non-negative, int8 [-128, 127] elsewhere), the default on OpenVINO."""
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.errors import InputError
from fxopt.export.onnx import export_onnx
from fxopt.ops.int8 import INT8_IR_OPS
from fxopt.ops.schema import view_of
from fxopt.quant.config import QuantConfig
from fxopt.quant.zero_point import ZeroPointZeroObserver, signed_zero_point_zero


def test_observer_picks_the_kind_by_the_sign_of_the_data():
    pos = ZeroPointZeroObserver("minmax")
    pos.observe(torch.tensor([0.0, 1.0, 2.55]))
    qp = pos.qparams()
    assert qp.dtype == torch.uint8 and int(qp.zero_point) == 0 and (qp.qmin, qp.qmax) == (0, 255)
    assert float(qp.scale) == pytest.approx(0.01)
    neg = ZeroPointZeroObserver("minmax")
    neg.observe(torch.tensor([-0.3, 1.0, 2.54]))
    qp = neg.qparams()
    assert qp.dtype == torch.int8 and int(qp.zero_point) == 0 and (qp.qmin, qp.qmax) == (-128, 127)
    assert float(qp.scale) == pytest.approx(0.02)
    with pytest.raises(InputError, match="no calibration data"):
        ZeroPointZeroObserver("mse").qparams()
    assert signed_zero_point_zero(0.0).scale > 0


def test_resolved_by_target_and_checked():
    assert QuantConfig().resolved("openvino").activation_symmetric == "auto"
    assert QuantConfig().resolved("cpu").activation_symmetric is False
    assert QuantConfig(activation_symmetric=True).resolved("openvino").activation_symmetric is True
    for bad in ("yes", 1, 0.5):
        with pytest.raises(InputError, match="activation_symmetric"):
            QuantConfig(activation_symmetric=bad)


class _Net(nn.Module):
    """Signed values (a conv without activation, SiLU, a residual add, a gate product) and
    non-negative ones (ReLU), an average pool of signed codes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = nn.functional.silu(self.b(y))
        z = z * torch.sigmoid(self.c(z.mean((2, 3), keepdim=True)))
        w = self.c(z) + z
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(w, 1), 1))


def test_every_grid_has_zero_point_zero_and_the_export_matches(tmp_path):
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(2, 3, 16, 16)
    calib = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    cfg = QuantConfig(activation_symmetric="auto", holdout_fraction=0.0)
    opt = fxopt.optimize(model, x, quantize=cfg, calibration_data=calib)
    kinds, zps = set(), []
    for n in opt.graph_module.graph.nodes:
        if n.op == "call_function" and n.target in INT8_IR_OPS:
            v = view_of(n)
            for zp, lo in (("zp", "qmin"), ("y_zp", "y_qmin"), ("x_zp", "x_qmin")):
                if zp in v.values and v.get(zp) is not None:
                    zps.append(int(getattr(opt.graph_module, v.get(zp).target)))
                    if lo in v.values:
                        kinds.add(v.get(lo))
    assert zps and set(zps) == {0}
    assert kinds == {0, -128}  # both kinds of grid occur
    ref = model(x)
    assert (opt(x) - ref).abs().max() < 0.1 * ref.abs().max()
    path = tmp_path / "m.onnx"
    export_onnx(opt, x, path)  # ONNX Runtime within one output step of the module, or raises
    onnx = pytest.importorskip("onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Clip" not in ops  # full-range grids: no saturation before each QuantizeLinear
