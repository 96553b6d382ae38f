"""Dynamic int8 with one run-time grid per token (``QuantConfig(mode="dynamic",
per_token=True)``): the op against its reference and the simulation, the product of codes
(``codes_mm``: torch._int_mm, float32 slices, float64) and which one this CPU runs, per-row
grids, the accuracy it buys over one grid per tensor, save/load and the ONNX refusal, and the
config's errors. The per-tensor op and the pass: ``test_dynamic.py``."""
import math

import pytest
import torch
import torch.nn.functional as F

import fxopt
from dynamic_cases import Block, deep_vit, int8_weights  # tests/support
from fxopt.ir.tolerances import compare_outputs
from fxopt.ops.int8_dynamic import LinearInt8Dynamic, linear_int8_dynamic_reference
from fxopt.quant.config import QuantConfig


@pytest.mark.parametrize("shape,n,act,reduce_range,residual", [
    ((2, 9, 96), 384, "gelu", False, False), ((197, 768), 64, "none", True, True),
    ((1, 40), 24, "relu", False, False), ((3, 5, 3072), 16, "none", False, False),
    ((4, 7, 33), 5, "silu", True, True)])
def test_per_token_op_equals_its_reference_and_simulation(shape, n, act, reduce_range,
                                                          residual):
    from fxopt.ir.activations import apply_activation
    from fxopt.ops.int8_dynamic import fake_quantize_token
    torch.manual_seed(3)
    w_q, w_s = int8_weights(n, shape[-1])
    b = torch.randn(n)
    x = torch.randn(*shape) * 2 + 0.3
    x.reshape(-1, shape[-1])[0] *= 40  # one token far wider than the rest
    res = torch.randn(*shape[:-1], n) if residual else None
    kw = dict(act=act, reduce_range=reduce_range, per_token=True)
    y = torch.ops.fxopt.linear_int8_dynamic(x, w_q, w_s, b, res, **kw)
    ref = linear_int8_dynamic_reference(x, w_q, w_s, b, res, **kw)
    # the same codes and the same exact int32 sums (torch._int_mm against float64), then one
    # shared float32 epilogue: bit-identical by construction
    assert torch.equal(y, ref)
    sim = F.linear(fake_quantize_token(x, reduce_range), w_q.float() * w_s[:, None], b)
    sim = apply_activation(sim if res is None else sim + res, act, [])
    assert (y - sim).abs().max() <= 1e-5 * sim.abs().max()


@pytest.mark.parametrize("k", [1, 1024, 1025, 3072, 4100])
def test_codes_mm_is_exact_every_way(k):
    """The per-token product of codes, three ways: torch._int_mm, float32 GEMMs over slices
    (a CPU without VNNI or AMX), float64 (the reference): equal to the last bit, also at the
    extremes where a float32 sum over more terms than a slice would round."""
    from fxopt.ops.int8_dynamic import codes_mm
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (5, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (7, k), generator=g, dtype=torch.int8)
    # large products of one sign: one float32 GEMM over all 4100 terms was 7 off here
    a[0], w[0] = torch.randint(100, 128, (2, k), generator=g, dtype=torch.int8)
    a[1], w[1] = -128, -127
    exact = (a.long() @ w.long().t()).to(torch.int32)
    for how in ("int", "float32", "float64"):
        assert torch.equal(codes_mm(a, w, how), exact), how


@pytest.mark.parametrize("isa", [None, "avx512_vnni"])
def test_per_token_cpu_op_takes_the_product_this_cpu_runs_fast(isa, monkeypatch):
    """Without int8 dot products the CPU op multiplies in float32 slices, with them
    torch._int_mm: the same bits either way, and the one it calls is the one the ISA says."""
    import fxopt.ops.int8_dynamic as dyn
    monkeypatch.setattr(dyn, "int8_dot_product_isa", lambda: isa)
    seen = []
    real = dyn.codes_mm
    monkeypatch.setattr(dyn, "codes_mm", lambda a, w, how: seen.append(how) or real(a, w, how))
    torch.manual_seed(5)
    w_q, w_s = int8_weights(24, 2100)
    x = torch.randn(3, 4, 2100)
    y = torch.ops.fxopt.linear_int8_dynamic(x, w_q, w_s, None, per_token=True)
    ref = linear_int8_dynamic_reference(x, w_q, w_s, None, per_token=True)
    assert torch.equal(y, ref)
    assert seen[0] == ("float32" if isa is None else "int") and seen[1] == "float64"


def test_per_token_grids_are_per_row():
    from fxopt.ops.int8_dynamic import token_qparams
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [100.0, 3.0, 2.0]])
    scale, zp = token_qparams(x, reduce_range=False)
    assert scale.shape == (3, 1) and scale[0].item() == 1.0  # an all-zero row: scale 1
    assert scale[1].item() == pytest.approx(2 / 255) and zp[1].item() in (127, 128)
    assert scale[2].item() == pytest.approx(100 / 255) and zp[2].item() == 0
    w_q, w_s = int8_weights(4, 3)
    # row 1's output does not depend on row 2's range (per tensor it would)
    alone = torch.ops.fxopt.linear_int8_dynamic(x[1:2], w_q, w_s, None, per_token=True)
    together = torch.ops.fxopt.linear_int8_dynamic(x, w_q, w_s, None, per_token=True)
    assert torch.equal(alone[0], together[1])
    with pytest.raises(ValueError, match="non-finite"):
        token_qparams(torch.tensor([[1.0, float("nan")]]))


def test_per_token_beats_per_tensor_where_one_token_is_wide():
    torch.manual_seed(4)
    m, x = Block(d=48, h=192, out=48).eval(), torch.randn(2, 24, 48)
    x[:, 0] *= 30  # a class token far wider than the others
    sq = {}
    for per_token in (False, True):
        opt = fxopt.optimize(m, x, quantize=QuantConfig(mode="dynamic", per_token=per_token))
        rec = opt.report.record("quantize_int8")
        assert rec.status == "ok" and rec.stats["linear"] == 3
        assert rec.stats.get("per_token", False) is per_token
        with torch.no_grad():
            out, ref = opt(x), m(x)
        sq[per_token] = 10 * math.log10(float(ref.pow(2).mean() / (out - ref).pow(2).mean()))
    assert sq[True] > sq[False] + 3, sq
    assert any("one grid per token" in note for note in rec.notes)
    # where the CPU has no int8 dot products the report says per-token runs slower there
    from fxopt.quant.isa import int8_dot_product_isa
    slow = any("slower than float here" in note for note in rec.notes)
    assert slow is (int8_dot_product_isa() is None)


def test_per_token_deep_transformer_saves_and_refuses_onnx(tmp_path):
    m = deep_vit()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    opt = fxopt.optimize(m, x, quantize=QuantConfig(mode="dynamic", per_token=True))
    rec = opt.report.record("quantize_int8")
    assert rec.status == "ok" and rec.stats["linear"] == 49 and rec.stats["per_token"]
    assert all(LinearInt8Dynamic.of(n).per_token for n in opt.graph_module.graph.nodes
               if LinearInt8Dynamic.matches(n))
    back = fxopt.load(opt.save(tmp_path / "vit.fxopt"))
    other = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back(other), opt(other))
        assert compare_outputs(opt(other), m(other)).rel_err < 0.1
    with pytest.raises(fxopt.UnsupportedOpError, match="one grid per token"):
        fxopt.export_onnx(opt, x, tmp_path / "vit.onnx")


def test_per_token_config_errors():
    with pytest.raises(fxopt.InputError, match="needs mode='dynamic'"):
        QuantConfig(per_token=True)
    with pytest.raises(fxopt.InputError, match="per_token must be True or False"):
        QuantConfig(mode="dynamic", per_token="yes")
