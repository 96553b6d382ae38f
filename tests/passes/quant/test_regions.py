"""quantize_int8 region formation (DESIGN.md section 8): golden graphs, numeric against the
simulated reference, negative, idempotence, and the sensitivity fallback.

One quantize at each region entry, one dequantize per exit, codes (uint8) between int8 ops.
"""
import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ops.int8 import Int8Layer
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.pipelines import expand_pipeline
from fxopt.quant.config import QuantConfig

quant = __import__("fxopt.passes.quant.quantize", fromlist=["quantize"])
OPS = torch.ops.fxopt
CONV8, LIN8 = OPS.conv2d_int8.default, OPS.linear_int8.default
Q, DQ = OPS.quantize.default, OPS.dequantize.default
ADD8, CAT8 = OPS.add_int8.default, OPS.cat_int8.default
AVG8, MAX8 = OPS.adaptive_avg_pool2d_int8.default, OPS.max_pool2d_int8.default


def _cal(shape, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def quantize(model, x, quantize=None, steps=("fold_bn", "fuse_act", "quantize_int8")):
    """``quantize`` None: every layer int8 (``min_sqnr_db=None``): the region tests' unseeded
    models measure near the default's accuracy target, which keeps a layer float on some draws."""
    quantize = QuantConfig(min_sqnr_db=None) if quantize is None else quantize
    gm = fxopt.capture(model.eval(), x)
    ctx = PassContext(example_inputs=(x,), configs=[QuantConfig.coerce(quantize)],
                      calibration_data=_cal((4, *x.shape[1:])))
    out, report = PassManager(expand_pipeline(list(steps)), check="each").run(gm, ctx)
    rec = report.record("quantize_int8")
    assert rec.status == "ok", rec.notes
    return out, rec


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


def node(gm, target, i=0):
    return [n for n in gm.graph.nodes if n.target is target][i]


class Chain(nn.Module):
    """conv-relu -> maxpool -> conv-relu -> avgpool -> flatten -> linear: one region."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(8, 5)

    def forward(self, x):
        y = self.pool(torch.relu(self.c1(x)))
        y = torch.relu(self.c2(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.c, self.d = nn.Conv2d(4, 6, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        s = a + b                         # add of two int8 values
        c = torch.cat([a, torch.tanh(self.c(s)[:, :4])], 1)  # tanh is float: c is float
        k = torch.cat([a, b], 1)          # cat of int8 values
        return self.d(k), torch.sin(s), c


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1),
                                     nn.Conv2d(6, 4, 3, padding=1))

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


@pytest.fixture
def chain():
    return Chain().eval(), torch.randn(2, 3, 8, 8)


def test_golden_one_region(chain):
    m, x = chain
    gm, rec = quantize(m, x)
    assert count(gm, Q) == 1 and count(gm, DQ) == 1
    assert count(gm, CONV8) == 2 and count(gm, LIN8) == 1
    assert count(gm, MAX8) == 1 and count(gm, AVG8) == 1
    c1, c2, fc = node(gm, CONV8), node(gm, CONV8, 1), node(gm, LIN8)
    assert c1.args[0].target is Q and node(gm, MAX8).args[0] is c1
    assert c2.args[0] is node(gm, MAX8)  # int8 between the convs: no float round trip
    assert node(gm, AVG8).args[0] is c2
    assert fc.args[0].op == "call_function" and fc.args[0].target is torch.flatten
    assert fc.args[0].args[0] is node(gm, AVG8)  # flatten on the codes
    assert node(gm, DQ).args[0] is fc and all(Int8Layer.of(n).out_int8 for n in (c1, c2, fc))
    assert [Int8Layer.of(n).act for n in (c1, c2, fc)] == ["relu", "relu", "none"]
    for n in (c1, c2, fc, node(gm, MAX8), node(gm, AVG8)):
        assert n.meta["tensor_meta"].dtype == torch.uint8, n
    assert rec.stats["quantize"] == 1 and rec.stats["dequantize"] == 1 and rec.stats["pool"] == 2


def test_golden_add_cat_and_float_consumers():
    m, x = Branches().eval(), torch.randn(2, 3, 6, 6)
    # every layer int8 (on some example inputs it measures under 30.5 dB, where the
    # default's accuracy target keeps a layer float)
    gm, rec = quantize(m, x, QuantConfig(min_sqnr_db=None), steps=("quantize_int8",))
    assert count(gm, Q) == 1  # x, read by a and b: one entry
    add = node(gm, ADD8)
    assert {add.args[0].target, add.args[3].target} == {CONV8}  # both inputs codes
    cats = [n for n in gm.graph.nodes if n.target is CAT8]
    assert len(cats) == 1 and all(a.target is CONV8 for a in cats[0].args[0])
    assert node(gm, CONV8, 3).args[0] is cats[0]  # d reads the int8 cat
    # the cat with a float input stays float and reads a dequantize of a
    fcat = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(fcat) == 1 and fcat[0].args[0][0].target is DQ
    sin = next(n for n in gm.graph.nodes if n.target is torch.sin)
    assert sin.args[0].target is DQ and sin.args[0].args[0] is add
    # exits: a (float cat), s (sin), c(s)[:, :4] (the slice moves codes; tanh reads it), d
    # (output): one dequantize each
    assert count(gm, DQ) == 4
    assert sum(1 for n in gm.graph.nodes if n.target is operator.add) == 0


def test_keep_float_splits_the_region():
    m, x = Three().eval(), torch.randn(2, 3, 6, 6)
    gm, rec = quantize(m, x, quantize=QuantConfig(keep_float=["c2"]))
    assert count(gm, CONV8) == 2 and rec.stats["kept_float"] == 1
    mods = [n for n in gm.graph.nodes if n.op == "call_module" or n.target is OPS.conv2d_act.default]
    assert len(mods) == 1  # c2 (fused with its relu) in float
    c2 = mods[0]
    assert c2.args[0].target is DQ and node(gm, CONV8, 1).args[0].target is Q
    assert node(gm, CONV8, 1).args[0].args[0] is c2
    assert count(gm, Q) == 2 and count(gm, DQ) == 2
    assert "kept in float: c2" in " ".join(rec.notes)


@pytest.mark.parametrize("make, shape", [(Chain, (2, 3, 8, 8)), (Branches, (2, 3, 6, 6)),
                                         (Three, (2, 3, 6, 6))])
def test_numeric_within_one_step_of_simulated(make, shape):
    m = make().eval()
    x = torch.randn(*shape)
    gm = fxopt.capture(m, x)
    res = quant.quantize_int8(gm, PassContext((x,), calibration_data=_cal((4, *shape[1:]))))
    assert res.modified and res.max_abs_tolerance > 0
    for xb in _cal((3, *shape[1:]), n=2, seed=9):  # fresh inputs
        with torch.no_grad():
            got, ref = res.gm(xb), res.reference(xb)
        got, ref = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)
        for g, r in zip(got, ref):
            assert (g - r).abs().max().item() <= res.max_abs_tolerance
    assert math.isfinite(res.stats["sqnr_db"]) and res.stats["sqnr_db"] > 15


def test_negative_no_layers_and_idempotent(chain):
    class Plain(nn.Module):
        def forward(self, x):
            return F.max_pool2d(torch.relu(x), 2).flatten(1)

    x = torch.randn(2, 3, 4, 4)
    gm = fxopt.capture(Plain().eval(), x)
    code = gm.code
    res = quant.quantize_int8(gm, PassContext((x,), calibration_data=_cal((2, 3, 4, 4))))
    assert res.modified is False and gm.code == code
    m, x = chain
    gm, _ = quantize(m, x)
    code = gm.code
    res = quant.quantize_int8(gm, PassContext((x,), calibration_data=_cal((4, 3, 8, 8))))
    assert res.modified is False and gm.code == code


# -- sensitivity fallback -----------------------------------------------------------------------
@pytest.fixture
def sensitive():
    torch.manual_seed(0)
    m = Three().eval()
    with torch.no_grad():  # an outlier per output channel: c1's int8 weights lose the rest
        m.c1.weight[:, 0, 0, 0] = 40.0
    return m, torch.randn(2, 3, 6, 6)


def _fallback(m, x, **cfg):
    gm = fxopt.capture(m, x)
    return quant.quantize_int8(gm, PassContext((x,), configs=[QuantConfig(**cfg)],
                                               calibration_data=_cal((4, 3, 6, 6))))


def test_fallback_keeps_most_sensitive_layer(sensitive):
    m, x = sensitive
    res = _fallback(m, x, min_sqnr_db=200.0, max_float_layers=1)
    sens = res.stats["sensitivity_db"]
    assert set(sens) == {"c1", "c2", "c3"} and min(sens, key=sens.get) == "c1"
    assert [f["layer"] for f in res.stats["fallback"]] == ["c1"]
    assert res.stats["fallback"][0]["sensitivity_db"] == sens["c1"]
    assert res.stats["conv2d"] == 2 and res.stats["kept_float"] == 1
    notes = " ".join(res.notes)
    assert "kept in float by sensitivity: c1" in notes
    assert "min_sqnr_db=200.0 not reached" in notes  # unreachable: says so


def test_fallback_honours_max_float_layers_in_order(sensitive):
    m, x = sensitive
    res = _fallback(m, x, min_sqnr_db=200.0, max_float_layers=2)
    sens = res.stats["sensitivity_db"]
    moved = [f["layer"] for f in res.stats["fallback"]]
    assert moved == sorted(sens, key=sens.get)[:2]
    assert res.stats["conv2d"] == 1
    after = [f["model_sqnr_db_after"] for f in res.stats["fallback"]]
    assert after[0] > min(sens.values())  # moving c1 back to float helped


def test_fallback_target_met_keeps_none(sensitive):
    m, x = sensitive
    res = _fallback(m, x, min_sqnr_db=-100.0)
    assert res.stats["fallback"] == [] and res.stats["conv2d"] == 3
    assert not any("by sensitivity" in n or "not reached" in n for n in res.notes)
    res = _fallback(m, x, min_sqnr_db=200.0, max_float_layers=0)
    assert res.stats["fallback"] == [] and res.stats["conv2d"] == 3


def test_fallback_reaches_target(sensitive):
    m, x = sensitive
    full = _fallback(m, x, max_float_layers=0).stats["sqnr_db"]
    res = _fallback(m, x, min_sqnr_db=full + 3.0)
    moved = res.stats["fallback"]
    assert moved and moved[-1]["model_sqnr_db_after"] >= full + 3.0
    assert not any("not reached" in n for n in res.notes)
