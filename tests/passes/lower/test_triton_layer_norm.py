"""lower_to_triton's ``add_layer_norm`` row: the fused residual add + LayerNorm onto
``triton_add_layer_norm`` (one Triton program per row), through ``optimize`` on a tiny
torchvision ViT and a pre-norm stack, fp32 and fp16; what stays on PyTorch; the op's fallback.

Without a GPU the kernels run in Triton's interpreter (``FXOPT_TRITON_ON_CPU=1``, the ``on_cpu``
fixture of this folder's conftest); the same tests run compiled on a GPU.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.tolerances import compare_outputs
from fxopt.ops.triton import TRITON_ADD_LAYER_NORM

pytest.importorskip("triton")
from fxopt.passes.lower import triton as lowering  # noqa: E402
from fxopt.triton_kernels import norm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "fusion"))
from test_fuse_layer_norm import PreNorm, _images, _tiny_vit, _x, counts  # noqa: E402

PASSES = ["fuse_add_layer_norm", "lower_to_triton"]


def test_vit_add_layer_norms_run_on_triton(on_cpu):
    model, x = _tiny_vit(), _images()
    opt = fxopt.optimize(model, x, target="cpu", passes=PASSES)
    rec = opt.report.record("lower_to_triton")
    assert rec.status == "ok" and rec.stats["add_layer_norm"] == 3
    c = counts(opt.graph_module)
    assert c["triton_add_layer_norm"] == 3 and c["add_layer_norm"] == 0
    with torch.no_grad():
        st = compare_outputs(opt(x), model(x))
    assert st.ok, st


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_pre_norm_stack_through_optimize(on_cpu, precision):
    model, x = PreNorm().eval(), _x()
    opt = fxopt.optimize(model, x, target="cpu", precision=precision, passes=PASSES)
    assert opt.report.record("lower_to_triton").stats["add_layer_norm"] == 3
    dtype = torch.float16 if precision else torch.float32
    with torch.no_grad():
        for batch in (2, 3):  # the position embedding [1, 5, D] broadcasts in the launcher
            xb = _x(batch).to(dtype)
            out, ref = opt(xb), model.to(dtype)(xb)
            model.float()
            assert out.dtype == dtype and compare_outputs(out, ref).ok


class Wide(nn.Module):
    def forward(self, x, r):
        return F.layer_norm(x + r, (norm.MAX_N + 1,))


def test_rows_wider_than_the_kernel_stay_on_pytorch(on_cpu):
    assert lowering._MAX_ROW == norm.MAX_N
    n = norm.MAX_N + 1
    x, r = torch.randn(1, n), torch.randn(1, n)
    opt = fxopt.optimize(Wide().eval(), (x, r), target="cpu", passes=PASSES)
    assert opt.report.record("fuse_add_layer_norm").stats == {"add_layer_norm": 1}
    rec = opt.report.record("lower_to_triton")
    assert rec.modified is False and "rows of 16385 elements" in " ".join(rec.notes)
    assert counts(opt.graph_module)["add_layer_norm"] == 1


class AddNorm64(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8).double()

    def forward(self, x, r):
        return self.ln(x + r)


def test_float64_stays_on_pytorch(on_cpu):
    model = AddNorm64().eval()
    x, r = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    opt = fxopt.optimize(model, (x, r), target="cpu", passes=PASSES)
    assert opt.report.record("fuse_add_layer_norm").stats == {"add_layer_norm": 1}
    notes = " ".join(opt.report.record("lower_to_triton").notes)
    assert "dtypes torch.float64, torch.float64" in notes
    with torch.no_grad():
        assert torch.equal(opt(x, r), model(x, r))


def test_op_fallback_is_the_reference(monkeypatch):
    monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "0")
    x, r = torch.randn(2, 3, 8).transpose(1, 2), torch.randn(2, 8, 3)
    w, b = torch.randn(3), torch.randn(3)
    s, y = TRITON_ADD_LAYER_NORM(x, r, [3], w, b, 1e-6)
    assert s.is_contiguous() and y.is_contiguous()  # as the kernel writes them
    assert torch.equal(s, x + r) and torch.equal(y, F.layer_norm(x + r, [3], w, b, 1e-6))
    torch.library.opcheck(TRITON_ADD_LAYER_NORM.overload, (x, r, [3], w, b, 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [None, "bf16"])
def test_vit_default_cuda_pipeline(precision):
    """target='cuda': the fusion runs by default, the kernels compiled; equal to eager."""
    model, x = _tiny_vit().cuda(), _images().cuda()
    opt = fxopt.optimize(model, x, target="cuda", precision=precision)
    assert opt.report.record("fuse_add_layer_norm").stats == {"add_layer_norm": 3}
    assert counts(opt.graph_module)["triton_add_layer_norm"] == 3
    dtype = torch.bfloat16 if precision else torch.float32
    with torch.no_grad():
        out = opt(x.to(dtype))
        ref = model.to(dtype)(x.to(dtype))
    assert compare_outputs(out, ref).ok
