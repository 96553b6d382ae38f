"""The CPU lowering's test cases (``lower_int8_cpu``): a small residual network, its
calibration batches, the pass run with the manager's checks, and what its tests read from the
lowered graph. Shared by tests/passes/lower/test_cpu.py (the lowering's rows and results) and
test_cpu_engines.py (which kernel engine each layer runs)."""
import copy

import torch
import torch.nn as nn

import fxopt
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.ops.cpu import ONEDNN_CONV2D_INT8
from fxopt.pipelines import expand_pipeline
from fxopt.quant.config import QuantConfig

CONV = ONEDNN_CONV2D_INT8.overload


class Net(nn.Module):
    def __init__(self, act=nn.ReLU, res_act=nn.ReLU):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = act()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.res_act = res_act()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.act(self.c1(x))
        y = self.res_act(self.c2(y) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def calibration(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def run(model, quantize="int8", steps=("fold_bn", "fuse_act", "quantize_int8"), target="cpu"):
    """The int8 graph (before lowering), and a copy lowered with the manager's checks."""
    x = torch.randn(2, 3, 8, 8)
    gm = fxopt.capture(model.eval(), x)
    ctx = PassContext(example_inputs=(x,), configs=[QuantConfig.coerce(quantize)],
                      calibration_data=calibration(), target=target)
    ir, _ = PassManager(expand_pipeline(list(steps)), check="each").run(gm, ctx)
    low, report = PassManager(expand_pipeline(["lower_int8_cpu"]), check="each").run(
        copy.deepcopy(ir), ctx)
    return ir, low, report.record("lower_int8_cpu")


def close(a, b, step):
    with torch.no_grad():
        return (a - b).abs().max().item() <= step * (1 + 1e-4)


def plain(gm) -> bool:
    """No quantized tensor and no packed ScriptObject anywhere in ``gm``."""
    values = [v for n in gm.graph.nodes for v in [n.meta.get("tensor_meta")] if v is not None]
    return not any(getattr(v, "dtype", None) in (torch.quint8, torch.qint8) for v in values) \
        and not any(isinstance(v, torch.ScriptObject) for v in gm.__dict__.values()) \
        and all(not t.is_quantized for t in gm.state_dict().values())


def convs(gm):
    return [ONEDNN_CONV2D_INT8.view.of(n) for n in gm.graph.nodes if n.target is CONV]
