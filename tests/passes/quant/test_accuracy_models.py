"""Real models through int8 with the issue-13 defaults (8-bit grids where the CPU has VNNI/AMX,
bias correction, a Linear's residual add in float): the lowering stays within one code of the
int8 IR at every op with full-range activations, and the SQNR holds (slow: 112-224 px)."""
import warnings

import pytest
import torch

import fxopt
from fxopt.quant.isa import int8_dot_product_isa
from torchvision_models import randomized_bn_model  # tests/support (tests/conftest.py)

torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.slow


def _optimize(m, size, n=8):
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(2, 3, size, size, generator=g) for _ in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.optimize(m, cal[0][:1], quantize="int8", calibration_data=cal,
                              target="cpu", check="each")


@pytest.mark.parametrize("name,floor", [("resnet18", 33), ("mobilenet_v2", 33),
                                        ("mobilenet_v3_large", 30), ("efficientnet_b0", 30)])
def test_cnn_full_range_lowering_and_sqnr(name, floor):
    opt = _optimize(randomized_bn_model(name), 112)
    q, low = opt.report.record("quantize_int8"), opt.report.record("lower_int8_cpu")
    # 8-bit grids with VNNI/AMX, 7-bit weight grids without (fxopt.quant.isa)
    assert q.stats["reduce_range"] == (False if int8_dot_product_isa() else "weights")
    assert q.stats["bias_corrected"] == q.stats["conv2d"] + q.stats["linear"]
    assert low.status == "ok" and not [n for n in low.notes if "more than one code" in n], \
        low.notes
    assert q.stats["sqnr_db"] >= floor, q.stats


def test_vit_tiny_sqnr():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    opt = _optimize(m, 224, n=10)
    q = opt.report.record("quantize_int8")
    assert q.stats["float_residual_adds"] == 24
    assert q.stats["sqnr_db"] >= 25, q.stats  # 28.2 measured; 8.4 with the stream in int8
