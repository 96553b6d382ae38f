"""What every int8 op's test module needs (``tests/passes/quant/test_<op>.py``): codes and
quantized tensors to feed the op and PyTorch's kernel, calibration batches, the int8 IR of a
small network (the manager checks it against the simulation), node counts, and the check that
the Triton lowering leaves an op it has no kernel for on PyTorch and names it."""
import copy
import warnings

import pytest
import torch

import fxopt
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.pipelines import expand_pipeline
from fxopt.quant.config import QuantConfig

G = torch.Generator().manual_seed(0)
FLOAT_PHASES = ["fold_bn", "fuse_act", "lower_convs", "to_channels_last"]


def t(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def codes(shape, lo=0, hi=255, dtype=torch.uint8, channels_last=False, generator=G):
    """Random codes in [lo, hi] (channels-last when asked and 4-D)."""
    q = torch.randint(lo, hi + 1, shape, generator=generator).to(dtype)
    return q.contiguous(memory_format=torch.channels_last) if channels_last and q.dim() == 4 \
        else q


def quantized(q, s, z):
    """``q`` as a PyTorch quantized tensor of scale ``s`` and zero point ``z``."""
    with warnings.catch_warnings():  # PyTorch deprecates the creation, not the kernels
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        return torch._make_per_tensor_quantized_tensor(q, s, z)


def calibration(n=3, seed=1, shape=(4, 3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def quantize_ir(model, x, cfg=None, cal=None, target="cpu"):
    """The int8 graph of ``model`` (the manager checks it against the simulation on ``x``), its
    record, the context and the float graph it was made from (planned for ``target``).
    ``cfg`` None: every layer int8 (``min_sqnr_db=None``): these tests check an op's int8 form;
    their unseeded models measure near the default's accuracy target, which would keep a layer
    float on some draws."""
    torch.manual_seed(0)
    gm = fxopt.capture(model.eval(), x)
    ctx = PassContext(example_inputs=(x,), configs=[cfg or QuantConfig(min_sqnr_db=None)],
                      calibration_data=calibration() if cal is None else cal, target=target)
    before, _ = PassManager(expand_pipeline(FLOAT_PHASES), check="each").run(gm, ctx)
    out, report = PassManager(expand_pipeline(["quantize_int8"]), check="each").run(
        copy.deepcopy(before), ctx)
    rec = report.record("quantize_int8")
    assert rec.status == "ok", rec.notes
    return out, rec, ctx, before


def lower_cpu(ir, ctx):
    """``lower_int8_cpu`` run by the manager (checked against the int8 IR) on a copy of ``ir``:
    the lowered graph and its record, which must be ok."""
    low, report = PassManager(expand_pipeline(["lower_int8_cpu"]), check="each").run(
        copy.deepcopy(ir), ctx)
    rec = report.record("lower_int8_cpu")
    assert rec.status == "ok", rec.notes
    return low, rec


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


def check_triton_leaves_on_pytorch(monkeypatch, ir, x, op, name):
    """The Triton lowering (under the interpreter) leaves ``op`` (no kernel) on PyTorch, names it
    (``"<name> x1"``) and stays within its tolerance of the int8 IR."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FXOPT_TRITON_ON_CPU", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fxopt.passes.lower.triton import lower_to_triton

    gm = copy.deepcopy(ir)
    result = lower_to_triton(gm, PassContext(example_inputs=(x,), target="cpu"))
    assert result.modified and count(gm, op) == 1
    assert f"{name} x1" in " ".join(result.notes)
    with torch.no_grad():
        assert (gm(x) - ir(x)).abs().max().item() <= result.max_abs_tolerance
