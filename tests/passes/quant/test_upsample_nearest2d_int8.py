"""``upsample_nearest2d_int8``, nearest-neighbour upsampling of an int8 value on its own grid
(FPN and U-Net decoders, YOLO necks: ``nn.Upsample(scale_factor=2)``, ``F.interpolate(x,
size=lateral.shape[-2:], mode="nearest")``), through the whole int8 path: the op against
PyTorch's quantized and float nearest kernels (a gather of codes: bit for bit), its fake; the
quantizer (golden op counts, the int8 graph equal to the simulation); the CPU lowering
(``F.interpolate`` on a quantized tensor, and the reference row for the scale factors PyTorch's
quantized kernel indexes differently); the ONNX QDQ export of both forms in ONNX Runtime; the
Triton lowering leaving it on PyTorch and naming it; the cases left float.
"""
import copy
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from int8_op_checks import (
    calibration,
    check_triton_leaves_on_pytorch,
    codes,
    count,
    lower_cpu,
    quantize_ir,
    quantized,
    t,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import fxopt
from fxopt.infra.rewrite import apply_rules
from fxopt.ops.int8 import UpsampleNearest2dInt8
from fxopt.quant.config import QuantConfig

lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
quant = __import__("fxopt.passes.quant.quantize", fromlist=["quantize"])
OPS = torch.ops.fxopt
UP8, CONV8, ADD8 = (OPS.upsample_nearest2d_int8.default, OPS.conv2d_int8.default,
                    OPS.add_int8.default)
CPU_UP8 = OPS.cpu_upsample_nearest2d_int8.default
Q, DQ = OPS.quantize.default, OPS.dequantize.default
G = torch.Generator().manual_seed(12)
_t, _count, _quantized, _cal = t, count, quantized, calibration
_codes = partial(codes, generator=G)


def _quantize(model, x, cfg=QuantConfig(min_sqnr_db=None)):  # every layer int8
    return quantize_ir(model, x, cfg)


def _up(q, size, factors, lo=0, hi=255):
    return OPS.upsample_nearest2d_int8(q, size, factors, _t(0.05), _t(3, torch.int64), lo, hi)


# output size, scale factors (one of them)
CASES = [
    (None, [2.0, 2.0]),      # nn.Upsample(scale_factor=2): YOLO necks, U-Net decoders
    (None, [3.0, 1.5]),      # per axis, a fractional one
    (None, [1.7, 0.6]),      # up and down
    ([17, 9], None),         # a size (FPN: the lateral's), odd ratios
    ([4, 3], None),          # a size below the input's
    ([22, 14], None),        # exactly twice
]


def _odd(factors) -> bool:
    """A scale factor PyTorch's quantized kernel indexes unlike its float one (cpu.py's rule)."""
    return any(1 < f < 1.5 or 2 < f < 2.5 for f in (factors or []))


@pytest.mark.parametrize("size,factors", CASES)
def test_reference_is_pytorchs_nearest_bit_for_bit(size, factors):
    """The codes PyTorch's quantized nearest kernel writes (what lower_int8_cpu runs), and the
    float kernel's on the values (what the float model computes), the same layout."""
    s, z = 0.0371, 117
    for channels_last, C in ((True, 16), (True, 13), (False, 16)):  # 13: the kernel's tail loop
        q = _codes((2, C, 11, 7), channels_last=channels_last)
        ref = _up(q, size, factors)
        ker = F.interpolate(_quantized(q, s, z), size=size, scale_factor=factors,
                            mode="nearest").int_repr()
        flt = F.interpolate(q.float(), size=size, scale_factor=factors, mode="nearest")
        assert torch.equal(ref, ker) and torch.equal(ref, flt.to(torch.uint8))
        assert ref.stride() == ker.stride() and ref.dtype == torch.uint8


def test_reference_on_signed_codes():
    q = _codes((2, 5, 6, 7), -128, 127, torch.int8)
    for size, factors in CASES:
        ref = _up(q, size, factors, -128, 127)
        flt = F.interpolate(q.float(), size=size, scale_factor=factors, mode="nearest")
        assert ref.dtype == torch.int8 and torch.equal(ref.float(), flt)


def test_where_the_quantized_kernel_indexes_differently():
    """PyTorch's quantized kernel lacks the float kernel's exact cases along an axis (a kept
    size copied, a doubled one halved; it copies only a fully kept image): with a scale factor
    in (1, 1.5) or (2, 2.5) it takes another pixel on small inputs, and nowhere else (the CPU
    row's check: those go to the reference row)."""
    differ = set()
    for f in [0.5, 0.99, 1.0, 1.01, 1.25, 1.49, 1.5, 1.7, 2.0, 2.0000001, 2.3, 2.5, 2.75, 3.0,
              4.0]:
        for n in range(2, 13):
            q = (torch.arange(n * n, dtype=torch.int64) % 251).to(torch.uint8).view(1, 1, n, n)
            for factors in ([f, 1.7], [1.7, f], [f, f]):
                ker = F.interpolate(_quantized(q, 0.1, 0), scale_factor=factors,
                                    mode="nearest").int_repr()
                if not torch.equal(_up(q, None, factors), ker):
                    differ.add(f)
    assert all(_odd([f]) for f in differ), differ
    assert differ == {1.01, 1.25, 1.49, 2.0000001, 2.3}


@pytest.mark.parametrize("size,factors", CASES)
@pytest.mark.parametrize("cl", [False, True])
def test_fake_matches_real(size, factors, cl):
    args = (_codes((2, 8, 9, 8), channels_last=cl), size, factors, _t(0.1), _t(3, torch.int64),
            0, 255)
    real = OPS.upsample_nearest2d_int8(*args)
    mode = FakeTensorMode()
    with mode:
        fake = OPS.upsample_nearest2d_int8(*torch.utils._pytree.tree_map_only(
            torch.Tensor, mode.from_tensor, args))
    assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()
    torch.library.opcheck(OPS.upsample_nearest2d_int8, args,
                          test_utils=("test_schema", "test_faketensor"))


# -- the quantizer ------------------------------------------------------------------------------
class Decoder(nn.Module):
    """conv-relu, ``nn.Upsample(scale_factor=2)`` (a U-Net decoder, a YOLO neck), conv."""

    def __init__(self, factor=2):
        super().__init__()
        self.c1, self.up, self.c2 = nn.Conv2d(3, 16, 3, padding=1), \
            nn.Upsample(scale_factor=factor, mode="nearest"), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(self.up(torch.relu(self.c1(x))))


class Functional(nn.Module):
    """conv-relu, ``F.interpolate(scale_factor=(2, 3))`` (nearest by default), conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(F.interpolate(torch.relu(self.c1(x)), scale_factor=(2, 3)))


class TopDown(nn.Module):
    """FPN's top-down step: the coarser map upsampled to the lateral's size (a value of the
    graph, ``lateral.shape[-2:]``) and added to it, then a 3x3 conv."""

    def __init__(self):
        super().__init__()
        self.lateral = nn.Conv2d(3, 16, 1)
        self.top = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.out = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        lateral = self.lateral(x)
        top = torch.relu(self.top(lateral))
        return self.out(lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest"))


class LeftAlone(nn.Module):
    """Interpolations the quantizer leaves float: of a float input, bilinear, a recomputed scale
    factor, and a 1-D nearest one (of a linear layer's 3-D output)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), \
            nn.Linear(8, 8)

    def forward(self, x):
        y = torch.relu(self.c1(F.interpolate(x, scale_factor=2)))
        y = F.interpolate(y, scale_factor=0.5, mode="bilinear")
        y = F.interpolate(torch.relu(self.c2(y)), scale_factor=2, recompute_scale_factor=True)
        z = self.fc(y.flatten(2).transpose(1, 2))          # [N, L, 8]
        return F.interpolate(z, scale_factor=2)            # 1-D nearest


def _float_upsamples(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is F.interpolate
               or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Upsample)))


@pytest.mark.parametrize("net,want", [
    (Decoder, (None, [2.0, 2.0])),
    (Functional, (None, [2.0, 3.0])),
    (TopDown, ("node", None)),
])
def test_upsample_between_convs_golden_and_equal_to_the_simulation(net, want):
    x = torch.randn(2, 3, 16, 16)
    gm, rec, ctx, before = _quantize(net(), x)
    adds = 1 if net is TopDown else 0
    assert (_count(gm, Q), _count(gm, CONV8), _count(gm, UP8), _count(gm, ADD8),
            _count(gm, DQ)) == (1, 3 if net is TopDown else 2, 1, adds, 1)
    assert _float_upsamples(gm) == 0 and rec.stats["upsample"] == 1
    up = next(n for n in gm.graph.nodes if n.target is UP8)
    v = UpsampleNearest2dInt8.of(up)
    assert v.q.target is CONV8
    assert (v.scale, v.zp) == tuple(v.q.args[10:12])  # the conv's output grid, kept
    assert (v.qmin, v.qmax) == (0, 255) and up.meta["tensor_meta"].dtype == torch.uint8
    size, factors = want
    assert v.scale_factors == factors
    assert (isinstance(v.output_size, torch.fx.Node) if size == "node" else v.output_size is None)
    # nearest copies codes: the simulation and the int8 graph are equal, not just within a step
    res = quant.quantize_int8(before, ctx)
    assert res.gm.code == gm.code and res.max_abs_tolerance == rec.tolerance
    for xb in _cal(n=3, seed=7, shape=(4, 3, 18, 14)):  # another spatial size too
        with torch.no_grad():
            out = gm(xb)
            assert torch.equal(out, res.reference(xb))
    assert out.shape[-2:] == ((18, 14) if net is TopDown else (36, 28) if net is Decoder
                              else (36, 42))


def test_float_input_bilinear_recomputed_and_1d_are_left_alone():
    gm, rec, _, _ = _quantize(LeftAlone(), torch.randn(2, 3, 16, 16))
    assert _count(gm, UP8) == 0 and _float_upsamples(gm) == 4
    assert _count(gm, CONV8) == 2 and "upsample" not in rec.stats


# -- the CPU lowering ---------------------------------------------------------------------------
def _cpu(ir, ctx):
    low, rec = lower_cpu(ir, ctx)
    assert not any("more than one code" in note for note in rec.notes), rec.notes
    return low, rec


@pytest.mark.skipif(not lower.quantized_engine_available(), reason="no quantized CPU engine")
@pytest.mark.parametrize("net", [Decoder, Functional, TopDown])
def test_cpu_row_runs_pytorchs_interpolate_on_views_of_the_codes(net):
    ir, _, ctx, _ = _quantize(net(), torch.randn(2, 3, 16, 16))
    table = apply_rules(copy.deepcopy(ir), lower.RULES, context=lower.CpuLowering())
    assert table.counts["upsample_nearest2d_int8"] == 1 and table.rejected == []
    low, rec = _cpu(ir, ctx)
    assert rec.stats["upsample"] == 1 and rec.stats["fallback"] == 0
    assert _count(low, CPU_UP8) == 1 and _count(low, UP8) == 0
    for xb in _cal(n=3, seed=8, shape=(4, 3, 18, 14)):
        with torch.no_grad():
            assert (low(xb) - ir(xb)).abs().max().item() <= rec.tolerance


@pytest.mark.skipif(not lower.quantized_engine_available(), reason="no quantized CPU engine")
def test_a_scale_factor_the_kernel_indexes_differently_stays_the_ir_op():
    """scale_factor=1.25: the kernel row rejects it, the IR op stays (named in the notes) and
    runs its reference on the codes: the IR's codes exactly."""
    ir, _, ctx, _ = _quantize(Decoder(factor=1.25), torch.randn(2, 3, 16, 16))
    low, rec = _cpu(ir, ctx)
    assert rec.stats["fallback"] == 1 and "upsample" not in rec.stats
    assert any(note.startswith("no PyTorch int8 kernel") and note.endswith(": up")
               for note in rec.notes), rec.notes
    assert _count(low, UP8) == 1 and _count(low, CPU_UP8) == 0
    for xb in _cal(n=2, seed=9, shape=(2, 3, 2, 8)) + _cal(n=2, seed=9, shape=(2, 3, 13, 9)):
        with torch.no_grad():  # 2x8: 1.25 keeps the height, where the kernel's rows differ
            assert torch.equal(low(xb), ir(xb))


# -- ONNX QDQ export, both forms ------------------------------------------------------------------
@pytest.mark.parametrize("net", [Decoder, Functional])
@pytest.mark.parametrize("form,row", [("ir", "upsample_nearest2d_int8"),
                                      ("cpu", "cpu_upsample_nearest2d_int8")])
def test_onnx_export_both_forms(tmp_path, net, form, row):
    """The IR row (``qdq_ir``) and, once lowered, the CPU twin's row (``qdq_cpu``: the IR
    row) each write one nearest Resize between Q and DQ, checked in ORT."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fxopt.export.onnx import export_onnx

    cal = _cal(shape=(2, 3, 16, 16))
    opt = fxopt.optimize(net().eval(), cal[0], quantize="int8", calibration_data=cal,
                         disable=["lower_int8_cpu"] if form == "ir" else [])
    result = export_onnx(opt, cal[0], tmp_path / f"{net.__name__}_{form}.onnx")
    assert result.kept == [] and result.translated.get(row) == 1, result.translated
    assert result.check.ok and result.check.max_abs <= result.output_step * (1 + 1e-4) + 1e-6
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    (resize,) = [n for n in model.graph.node if n.op_type == "Resize"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in resize.attribute}
    assert attrs["mode"] == b"nearest"
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    consumers = [n.op_type for n in model.graph.node if resize.output[0] in n.input]
    assert producers[resize.input[0]] == "DequantizeLinear" and consumers == ["QuantizeLinear"]


# -- the Triton lowering: no kernel, left on PyTorch and named -----------------------------------
def test_triton_lowering_leaves_upsample_nearest2d_int8_on_pytorch(monkeypatch):
    x = torch.randn(1, 3, 16, 16)
    ir, _, _, _ = _quantize(Decoder(), x)
    check_triton_leaves_on_pytorch(monkeypatch, ir, x, UP8, "upsample_nearest2d_int8")
