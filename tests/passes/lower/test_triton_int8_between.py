"""lower_to_triton's int8 rows between the layers: the residual adds and the pooling of an int8
CNN run on the codes (``triton_add_int8``, ``triton_max_pool2d_int8``,
``triton_global_avg_pool2d_int8``), what stays on PyTorch, and ``triton_add_int8``'s layouts.

Without a GPU the lowered graphs run with ``FXOPT_TRITON_ON_CPU=1`` (the kernels in Triton's
interpreter); the ``gpu`` test runs the same on CUDA. The fixtures ``on_cpu`` and
``resnet_int8`` are in this folder's conftest, the model in tests/support/triton_cases.py.
"""
import copy
from collections import Counter

import pytest
import torch

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.ops.triton_int8 import TRITON_ADD_INT8, TRITON_MAX_POOL2D_INT8

pytest.importorskip("triton")
from fxopt.passes.lower.triton import lower_to_triton  # noqa: E402
from triton_cases import mini, mini_int8, record  # noqa: E402  (tests/support)

OPS = torch.ops.fxopt


# -- int8 residual CNN: adds and pools on the codes ----------------------------------------------
def _fxopt_ops(gm) -> Counter:
    return Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("fxopt."))


def test_int8_resnet_adds_and_pools_lowered(resnet_int8):
    x, before, gm, result = resnet_int8
    old, new = _fxopt_ops(before), _fxopt_ops(gm)
    assert old["add_int8"] == 2 and old["max_pool2d_int8"] == 1
    assert old["adaptive_avg_pool2d_int8"] == 1
    # golden: every int8 op is a Triton op now, nothing left on PyTorch but the flatten view
    assert new == {"triton_quantize": 1, "triton_conv2d_int8": 6, "triton_max_pool2d_int8": 1,
                   "triton_add_int8": 2, "triton_global_avg_pool2d_int8": 1,
                   "triton_linear_int8": 1, "triton_dequantize": 1}
    st = result.stats
    assert (st["add_int8"], st["max_pool2d_int8"], st["global_avg_pool2d_int8"]) == (2, 1, 1)
    assert st["on_pytorch"] == 0 and st["layout_copies"] == 0
    assert not any("left on PyTorch" in n or "not lowered" in n for n in result.notes)
    adds = [TRITON_ADD_INT8.view.of(n) for n in gm.graph.nodes
            if TRITON_ADD_INT8.view.matches(n)]
    for v in adds:  # grids as numbers, the block's relu fused, codes out
        assert isinstance(v.a_scale, float) and isinstance(v.a_zp, int)
        assert v.act == "relu" and v.node.meta["tensor_meta"].dtype == torch.uint8
    pool = next(TRITON_MAX_POOL2D_INT8.view.of(n) for n in gm.graph.nodes
                if TRITON_MAX_POOL2D_INT8.view.matches(n))
    assert (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) == \
        ([3, 3], [2, 2], [1, 1], [1, 1], False)
    again = copy.deepcopy(gm)
    code = again.code
    assert not lower_to_triton(again, PassContext(example_inputs=(x,), target="cpu")).modified
    assert again.code == code


def test_int8_resnet_within_one_step(resnet_int8):
    x, before, gm, result = resnet_int8
    with torch.no_grad():
        ref, out = before(x), gm(x)
    assert (out - ref).abs().max().item() <= result.max_abs_tolerance


def test_int8_resnet_cpu_fallback_matches(resnet_int8, monkeypatch):
    # without the switch the new ops run the IR's references (a model saved on a GPU loads here)
    x, before, gm, result = resnet_int8
    monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "0")
    with torch.no_grad():
        ref, out = before(x), gm(x)
    assert (out - ref).abs().max().item() <= result.max_abs_tolerance


def test_int8_avg_pool_to_other_sizes_stays_and_is_named(on_cpu):
    x, before, gm, result = mini_int8(pool_size=2, size=32)
    new = _fxopt_ops(gm)
    assert new["adaptive_avg_pool2d_int8"] == 1 and new["triton_add_int8"] == 2
    assert "adaptive_avg_pool2d_int8" in " ".join(result.notes)
    assert "output size [2, 2]" in " ".join(result.notes)
    with torch.no_grad():
        assert (gm(x) - before(x)).abs().max().item() <= result.max_abs_tolerance


def test_triton_add_int8_op_layouts_and_broadcast(on_cpu):
    g = torch.Generator().manual_seed(6)
    a = torch.randint(0, 256, (2, 5, 3, 4), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 5, 3, 4), generator=g, dtype=torch.uint8)
    a_cl = a.contiguous(memory_format=torch.channels_last)
    args = (0.03, 120, 0.02, 131, 0.05, 0)

    def run(a_, b_):
        return OPS.triton_add_int8(a_, args[0], args[1], b_, *args[2:], act="relu")

    ref = OPS.add_int8(a, *(torch.tensor(v) for v in args[:2]), b,
                       *(torch.tensor(v) for v in args[2:]), act="relu")
    y = run(a_cl, b)   # b converted to a's layout, output channels-last
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, ref)
    assert torch.equal(run(a, b[:1]), OPS.add_int8(a, *(torch.tensor(v) for v in args[:2]),
                                                   b[:1].expand_as(a).contiguous(),
                                                   *(torch.tensor(v) for v in args[2:]),
                                                   act="relu"))


# -- on a GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_int8_resnet_adds_and_pools(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = mini().cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    cal = [torch.randn(8, 3, 64, 64, device="cuda") for _ in range(3)]
    opt = fxopt.optimize(m, x, target="cuda", quantize="int8", calibration_data=cal)
    rec = record(opt)
    assert rec.status == "ok" and rec.max_abs_err <= rec.tolerance
    st = rec.stats
    assert (st["add_int8"], st["max_pool2d_int8"], st["global_avg_pool2d_int8"]) == (2, 1, 1)
    assert st["on_pytorch"] == 0
