"""Real architectures through int8 (issue 5 acceptance): quantize, lower to the x86 kernels,
run, and pass the simulated-reference check, at 64x64 to keep the time down.

BatchNorm running statistics and affine parameters are randomised: the defaults make many
outputs degenerate. efficientnet_b0 (SiLU, squeeze-excitation multiply) and regnet_x_400mf
(grouped convolutions) are the hard cases: SiLU and the sigmoid gates run on oneDNN's int8
kernels (the sigmoid on the kernel's float output).
"""
import math

import pytest
import torch

import fxopt
from torchvision_models import randomized_bn_model  # tests/support (tests/conftest.py)

torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.slow

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf"]
SIZE = 64


@pytest.mark.parametrize("name", MODELS)
def test_int8_simulated_reference(name):
    m = randomized_bn_model(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, SIZE, SIZE, generator=g)
    cal = [torch.randn(2, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    opt = fxopt.optimize(m, x, quantize="int8", calibration_data=cal, target="cpu")
    q = opt.report.record("quantize_int8")
    low = opt.report.record("lower_int8_cpu")
    assert q.status == "ok" and low.status == "ok", (q.notes, low.notes)
    assert q.stats["conv2d"] >= 15 and q.stats["linear"] == 1
    # on the CPU every layer is int8 (SiLU on oneDNN's post-op, the sigmoid gates on its
    # float output): none kept float for want of a kernel
    assert q.stats["kept_float"] == 0 and "no_cpu_kernel" not in q.stats, q.notes
    assert math.isfinite(q.stats["sqnr_db"]) and 15 < q.stats["sqnr_db"] < 60, q.stats
    assert low.stats["conv2d"] > 0 and low.stats.get("tie_flips", 0) >= 0
    assert low.stats["fallback"] == 0, low.notes
    x2 = torch.randn(2, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        out, ref = opt(x2), m(x2)
    assert out.shape == ref.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name,bn,exits", [("densenet121", 62, 1),
                                           ("shufflenet_v2_x1_0", 0, 2)])
def test_densenet_and_shufflenet_stay_int8_between_layers(name, bn, exits):
    """DenseNet's BatchNorm-ReLU after each concat runs as ``batch_norm2d_int8`` and
    ShuffleNet's channel shuffles and chunks move codes: one quantize at the input, a dequantize
    at the output (and, in ShuffleNet, before its ``x.mean([2, 3])``), nothing float between."""
    m = randomized_bn_model(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, SIZE, SIZE, generator=g)
    cal = [torch.randn(2, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    opt = fxopt.optimize(m, x, quantize="int8", calibration_data=cal, target="cpu")
    q, low = opt.report.record("quantize_int8"), opt.report.record("lower_int8_cpu")
    assert q.stats.get("batch_norm", 0) == bn and q.stats["dequantize"] == exits, q.stats
    assert q.stats["quantize"] == exits and low.stats["fallback"] == 0, low.notes
    assert low.stats.get("batch_norm", 0) == bn
    assert not any(n.op == "call_module" for n in opt.graph_module.graph.nodes)
    assert 25 < q.stats["sqnr_db"] < 60, q.stats
