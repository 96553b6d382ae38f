"""Calls that only move an int8 value's codes stay int8 on its grid (the ``move`` row of
``fxopt.quant.plan``): ShuffleNet V2's channel shuffle (``view -> transpose -> contiguous ->
view``), its ``chunk`` into two branches and a channel slice. No dequantize / quantize pair
around them: the quantizer's graph (golden counts, equal to the simulation), the CPU-lowered
module (one quantize at the input, one dequantize at the output, within fxopt's int8 bound of
eager), and the ONNX QDQ export in ONNX Runtime.
"""
import warnings

import pytest
import torch
import torch.nn as nn
from int8_op_checks import calibration, count, quantize_ir

import fxopt

lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
quant = __import__("fxopt.passes.quant.quantize", fromlist=["quantize"])
OPS = torch.ops.fxopt
CONV8, CAT8 = OPS.conv2d_int8.default, OPS.cat_int8.default
Q, DQ = OPS.quantize.default, OPS.dequantize.default
CPU_Q, CPU_DQ = OPS.cpu_quantize.default, OPS.cpu_dequantize.default


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's (``torchvision.models.shufflenetv2.channel_shuffle``)."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class Shuffle(nn.Module):
    """A stride-2 ShuffleNet V2 unit (two branches concatenated, shuffled), then a stride-1 one
    (``chunk``: half passes, half through a branch, concatenated, shuffled), then a conv of a
    channel slice (``x[:, :8]``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1, groups=16), nn.Conv2d(16, 8, 1),
                                nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(),
                                nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.Conv2d(8, 8, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1, groups=8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = channel_shuffle(torch.cat((self.b1(x), self.b2(x)), dim=1), 2)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.b3(x2)), dim=1), 2)
        return self.head(x[:, :8])


_MOVES = {"chunk", "transpose", "contiguous", "reshape", "view", "getitem"}


def _moves(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and getattr(n.target, "__name__", n.target) in _MOVES
            and n.all_input_nodes[0].target != "size"  # not the shape's numbers
            and n.all_input_nodes[0].op != "placeholder"]  # nor the float input's layout


def test_shuffle_chunk_and_slice_move_codes_golden_and_equal_to_the_simulation():
    x = torch.randn(2, 3, 16, 16)
    gm, rec, ctx, before = quantize_ir(Shuffle(), x)
    assert (count(gm, Q), count(gm, CAT8), count(gm, DQ)) == (1, 2, 1), gm.code
    assert count(gm, CONV8) == 9
    moves = _moves(gm)
    assert {getattr(n.target, "__name__", n.target) for n in moves} >= {
        "chunk", "transpose", "contiguous", "getitem"}
    for n in moves:  # every move reads and writes codes
        metas = n.meta["tensor_meta"]
        for tm in metas if type(metas) is tuple else (metas,):  # chunk: a tuple
            assert tm.dtype == torch.uint8, n
        assert all(a.target is not DQ for a in n.all_input_nodes), n
    cat1 = [n for n in gm.graph.nodes if n.target is CAT8][1]
    assert cat1.args[0][0].target is torch.fx.node.operator.getitem  # x1: a piece of the chunk
    res = quant.quantize_int8(before, ctx)
    assert res.max_abs_tolerance == rec.tolerance  # the moves copy codes: equal, not within
    for xb in calibration(n=3, seed=7, shape=(4, 3, 18, 14)):
        with torch.no_grad():
            assert torch.equal(gm(xb), res.reference(xb))


@pytest.mark.skipif(not lower.quantized_engine_available(), reason="no quantized CPU engine")
def test_lowered_shuffle_net_one_quantize_one_dequantize():
    """``optimize(target="cpu")``: the codes go through every shuffle, chunk and slice; the
    module within fxopt's int8 bound of eager (optimize checks it) and the error small."""
    cal = calibration(n=4, seed=2, shape=(2, 3, 16, 16))
    m = Shuffle().eval()
    opt = fxopt.optimize(m, cal[0], quantize="int8", calibration_data=cal, target="cpu")
    gm = opt.graph_module
    assert (count(gm, CPU_Q), count(gm, CPU_DQ)) == (1, 1), gm.code
    low = opt.report.record("lower_int8_cpu")
    assert low.stats["fallback"] == 0 and low.stats["cat"] == 2
    assert opt.report.record("quantize_int8").stats["sqnr_db"] > 25
    with torch.no_grad():
        ref = m(cal[1])
        assert (opt(cal[1]) - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_moves_of_a_float_value_stay_float():
    class FloatShuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            return self.c(channel_shuffle(torch.cat((b, a), 1), 2))

    gm, _, _, _ = quantize_ir(FloatShuffle(), torch.randn(2, 4, 8, 8),
                              cal=calibration(shape=(4, 4, 8, 8)))
    assert count(gm, CAT8) == 0 and count(gm, Q) == 1 and count(gm, CONV8) == 1
    (q,) = [n for n in gm.graph.nodes if n.target is Q]
    assert q.args[0].meta["tensor_meta"].dtype == torch.float32


@pytest.mark.parametrize("form", ["ir", "cpu"])
def test_onnx_export_moves_codes(tmp_path, form):
    """The exporter looks through the moves (``chunk`` too): the QDQ graph checks in ORT."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fxopt.export.onnx import export_onnx

    cal = calibration(shape=(2, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxopt.optimize(Shuffle().eval(), cal[0], quantize="int8", calibration_data=cal,
                             disable=["lower_int8_cpu"] if form == "ir" else [])
        result = export_onnx(opt, cal[0], tmp_path / f"shuffle_{form}.onnx")
    assert result.kept == [], result.kept
    assert result.check.ok and result.check.max_abs <= result.output_step * (1 + 1e-4) + 1e-6
