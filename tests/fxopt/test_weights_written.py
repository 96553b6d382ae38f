"""fxopt.weights_written(): a write PyTorch keeps no version of (through ``t.data``) is seen.

The packed weights of the CPU kernels, the direct twin's bound calls and an engine's compiled
copy are kept while the tensors' versions stand still; ``t.data.mul_()`` moves no version. Was:
``fxopt.ops.onednn.clear_weight_cache()``, the remedy its comment named, cleared only the float
packs, so an int8 module kept its old weights after the write and the call, with no error.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.quant.config import QuantConfig
from cpu_lowering import Net, calibration  # tests/support


def _write_every_tensor(gm) -> int:
    """Writes each float and int8 tensor of ``gm`` through ``.data``; how many."""
    written = 0
    for t in [*gm.parameters(), *gm.buffers()]:
        if t.dtype == torch.int8:
            t.data.copy_(t.data.flip(0))
        elif t.dtype == torch.float32 and t.numel() > 1:
            t.data.mul_(1.25).add_(0.125)
        else:
            continue
        written += 1
    return written


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


CASES = {
    "int8 oneDNN": (Net, (1, 3, 8, 8), dict(quantize=QuantConfig(cpu_engine="onednn"))),
    "int8 x86, linked": (Net, (1, 3, 8, 8), dict(quantize=QuantConfig(cpu_engine="x86"))),
    "float": (Net, (1, 3, 8, 8), dict(quantize=None)),
    "int8 dynamic": (_Head, (4, 16), dict(quantize="int8_dynamic")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_write_through_data_is_seen_after_weights_written(case):
    make, shape, options = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    if options["quantize"] is not None:
        options = {**options, "calibration_data": calibration() if shape[1:] == (3, 8, 8)
                   else [torch.randn(*shape) for _ in range(3)]}
    opt = fxopt.optimize(model, x, target="cpu", **options)
    with torch.no_grad():
        before = opt(x)
        opt(x), opt(x)  # packed, bound and linked
        assert _write_every_tensor(opt.graph_module) >= 4
        fxopt.weights_written()
        fresh = copy.deepcopy(opt.graph_module)  # new tensors: nothing cached from them
        expected = fresh(x)
        assert not torch.equal(expected, before)  # the writes change the output
        assert torch.equal(opt(x), expected)  # the direct twin, bound anew
        assert torch.equal(opt(x), expected)
        assert torch.equal(opt.graph_module(x), expected)  # the graph's kernels, repacked


def test_an_engine_backed_module_runs_its_graph_after_weights_written():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(model, x, target="onnxruntime")
    with torch.no_grad():
        opt(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing changed yet: the engine serves, no warning
            opt(x)
        _write_every_tensor(opt.graph_module)
        fxopt.weights_written()
        with pytest.warns(UserWarning, match="weights changed"):
            got = opt(x)
        assert torch.equal(got, copy.deepcopy(opt.graph_module)(x))
