"""Tests of ``remove_noops``: every rule of the table fires where it should and nowhere else.

Each positive case is a tiny module, the rule expected to fire (and how often) and the call
targets that must be gone; one parametrized test checks the golden graph, the stats, the
structure, the numbers against eager and idempotence. Each negative case is a module the pass
must leave exactly as it is.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.ir.check import record_run
from fxopt.ir.tolerances import compare_outputs
from fxopt.ir.verify import verify_structure
from fxopt.infra.rewrite import Rule, op_rule
from fxopt.passes.cleanup.noops import RULES, apply_noop_rules, remove_noops

torchvision = pytest.importorskip("torchvision")


class Fn(nn.Module):
    """A module whose forward is ``fn`` (and that may hold submodules)."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, mod in modules.items():
            self.add_module(name, mod)

    def forward(self, x):
        return self.fn(self, x)


def capture(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = fxopt.capture(model.eval(), x)
    record_run(gm, (x,), keep_values=False)  # marks non-tensor nodes, as the manager does
    return gm


def targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


X2 = (2, 3, 4)  # batch 2: contiguity is provable
X1 = (1, 3, 4)

# (id, module, input shape, {rule: times fired}, targets that must be gone, calls left)
POSITIVE = [
    ("dropout_module", Fn(lambda m, x: m.d(x) + 1, d=nn.Dropout(0.3)), X2,
     {"dropout_module": 1}, ["d"], 1),
    ("dropout inplace module", Fn(lambda m, x: m.d(x.relu()), d=nn.Dropout(0.3, inplace=True)), X2,
     {"dropout_module": 1}, ["d"], 1),
    ("dropout1d_module", Fn(lambda m, x: m.d(x), d=nn.Dropout1d(0.3)), X2,
     {"dropout_module": 1}, ["d"], 0),
    ("dropout2d_module", Fn(lambda m, x: m.d(x.unsqueeze(1)), d=nn.Dropout2d(0.3)), X2,
     {"dropout_module": 1}, ["d"], 1),
    ("alpha_dropout_module", Fn(lambda m, x: m.a(m.f(x)), a=nn.AlphaDropout(0.2),
                                f=nn.FeatureAlphaDropout(0.2)), X2,
     {"dropout_module": 2}, ["a", "f"], 0),
    ("F.dropout", Fn(lambda m, x: F.dropout(x, 0.2, m.training) * 3), X2,
     {"dropout_function": 1}, [F.dropout], 1),
    ("F.dropout inplace", Fn(lambda m, x: F.dropout(x.relu(), 0.2, False, True)), X2,
     {"dropout_function": 1}, [F.dropout], 1),
    ("F.dropout2d", Fn(lambda m, x: F.dropout2d(x.unsqueeze(1), 0.2, training=False)), X2,
     {"dropout_function": 1}, [F.dropout2d], 1),
    ("F.alpha_dropout default", Fn(lambda m, x: F.alpha_dropout(x, 0.2)), X2,
     {"dropout_function": 1}, [F.alpha_dropout], 0),
    ("torch.dropout", Fn(lambda m, x: torch.dropout(x, 0.1, False)), X2,
     {"dropout_function": 1}, [torch.dropout], 0),
    ("stochastic_depth module", Fn(lambda m, x: x + m.sd(x.relu()),
                                   sd=torchvision.ops.StochasticDepth(0.2, "row")), X2,
     {"stochastic_depth": 1}, [torchvision.ops.stochastic_depth], 2),
    ("identity", Fn(lambda m, x: m.i(m.j(x)).relu(), i=nn.Identity(), j=nn.Identity()), X2,
     {"identity_module": 2}, ["i", "j"], 1),
    ("x*1", Fn(lambda m, x: (x * 1).relu()), X2, {"mul_one": 1}, [operator.mul], 1),
    ("1*x", Fn(lambda m, x: (1.0 * x).relu()), X2, {"mul_one": 1}, [operator.mul], 1),
    ("torch.mul(x, 1)", Fn(lambda m, x: torch.mul(x, 1).relu()), X2, {"mul_one": 1},
     [operator.mul], 1),
    ("x+0", Fn(lambda m, x: (x + 0).relu()), X2, {"add_zero": 1}, [operator.add], 1),
    ("0+x", Fn(lambda m, x: (0 + x).relu()), X2, {"add_zero": 1}, [operator.add], 1),
    ("x-0", Fn(lambda m, x: (x - 0).relu()), X2, {"sub_zero": 1}, [operator.sub], 1),
    ("x/1", Fn(lambda m, x: (x / 1).relu()), X2, {"div_one": 1}, [operator.truediv], 1),
    ("torch.div(x, 1.0)", Fn(lambda m, x: torch.div(x, 1.0).relu()), X2, {"div_one": 1},
     [torch.div], 1),
    ("reshape(-1, 3, 4)", Fn(lambda m, x: x.reshape(-1, 3, 4).relu()), X2,
     {"reshape_identity": 1}, [torch.reshape], 1),
    ("reshape(size(0), 3, 4) -> flatten(2, 2)",
     Fn(lambda m, x: torch.reshape(x, (x.size(0), 3, 4)).relu()), X2,
     {"flatten_identity": 1}, [torch.flatten], 2),  # relu and the size() canonicalization left
    ("view(size(0), -1, 4)", Fn(lambda m, x: x.view(x.size(0), -1, 4).relu()), X2,
     {"reshape_identity": 1}, [torch.reshape, "size"], 1),
    ("view(size(0), -1) -> flatten(1, 1)",
     Fn(lambda m, x: (lambda y: y.view(y.size(0), -1))(x.relu())),
     (2, 4), {"flatten_identity": 1}, [torch.flatten], 2),
    ("flatten(2, 2)", Fn(lambda m, x: x.flatten(2, -1).relu()), X2, {"flatten_identity": 1},
     [torch.flatten], 1),
    ("contiguous", Fn(lambda m, x: x.relu().contiguous()), X2, {"contiguous": 1},
     ["contiguous"], 1),
    ("permute inverse", Fn(lambda m, x: x.permute(0, 2, 1).permute(0, 2, 1).relu()), X2,
     {"inverse_permute": 1}, ["permute"], 1),
    ("permute 3-cycle", Fn(lambda m, x: x.permute(2, 0, 1).permute(1, 2, 0).relu()), X1,
     {"inverse_permute": 1}, ["permute"], 1),
    ("transpose twice", Fn(lambda m, x: x.transpose(1, 2).transpose(2, 1).relu()), X2,
     {"inverse_permute": 1}, ["transpose"], 1),
    ("t().t()", Fn(lambda m, x: x.t().t().relu()), (2, 5), {"inverse_permute": 1}, ["t"], 1),
    ("reshape chain", Fn(lambda m, x: x.reshape(-1, 12).reshape(-1, 6, 2).relu()), X2,
     {"reshape_chain": 1}, [], 2),
    ("reshape chain to identity", Fn(lambda m, x: x.reshape(-1, 12).reshape(-1, 3, 4).relu()), X2,
     {"reshape_chain": 1, "reshape_identity": 1}, [torch.reshape], 1),
    ("flatten then reshape", Fn(lambda m, x: torch.flatten(x, 1).reshape(-1, 6, 2).relu()), X2,
     {"reshape_chain": 1}, [torch.flatten], 2),
]


@pytest.mark.parametrize("case", POSITIVE, ids=[c[0] for c in POSITIVE])
def test_rule_fires(case):
    _, model, shape, fired, gone, left = case
    x = torch.randn(shape)
    gm = capture(model, x)
    before = targets(gm)
    for t in gone:
        assert t in before, f"the case does not exercise {t}"
    result = remove_noops(gm, PassContext(example_inputs=(x,)))
    # golden: the stats name the rule, the targets are gone, what is left is what computes
    assert result.modified
    assert {k: v for k, v in result.stats.items() if k != "total"} == fired
    assert result.stats["total"] == sum(fired.values())
    after = targets(gm)
    for t in gone:
        assert t not in after
    assert len(after) == left, gm.code
    assert verify_structure(gm) == []
    assert record_run(gm, (x,), keep_values=False).stale_meta == []
    # numeric: against eager on a fresh input of another batch size too
    for inp in (x, torch.randn((3,) + tuple(shape[1:])) if len(shape) > 2 else x):
        with torch.no_grad():
            stats = compare_outputs(gm(inp), model(inp))
        assert stats.ok and stats.rel_err < 1e-5
    # idempotent
    code = gm.code
    again = remove_noops(gm, PassContext(example_inputs=(x,)))
    assert not again.modified and gm.code == code and again.stats == {"total": 0}


def _train_dropout(gm):
    gm.d.train()  # after capture: a training-mode dropout is random, not a no-op


NEGATIVE = [
    ("dropout training", Fn(lambda m, x: m.d(x) + 1, d=nn.Dropout(0.3)), X2, _train_dropout),
    ("F.dropout training=True", Fn(lambda m, x: F.dropout(x, 0.2, True) + 1), X2, None),
    ("F.dropout default trains", Fn(lambda m, x: F.dropout(x, 0.2) + 1), X2, None),
    ("x*2", Fn(lambda m, x: x * 2 + 1), X2, None),
    ("0-x and 1/x", Fn(lambda m, x: (0 - x) + (1 / x)), X2, None),
    ("x*1 promotes int", Fn(lambda m, x: x.long() * 1.0), X2, None),
    ("x/1 promotes int", Fn(lambda m, x: x.long() / 1), X2, None),
    ("x+0 broadcasts", Fn(lambda m, x: x.sum(0) + torch.zeros_like(x)), X2, None),
    ("torch.add alpha", Fn(lambda m, x: torch.add(x, 0, alpha=2)), X2, None),
    ("reshape changes shape", Fn(lambda m, x: x.reshape(-1, 12)), X2, None),
    ("reshape with literal batch", Fn(lambda m, x: x.reshape(2, 3, 4)), X2, None),
    ("reshape by another tensor's size", Fn(lambda m, x: x.relu().reshape(x.sum(1).size(0), 3, 4)),
     X2, None),
    ("flatten merges dims", Fn(lambda m, x: torch.flatten(x, 1)), X2, None),
    ("contiguous of a transpose", Fn(lambda m, x: x.transpose(1, 2).contiguous()), X2, None),
    ("contiguous at batch 1", Fn(lambda m, x: x.relu().contiguous()), X1, None),
    ("contiguous channels_last", Fn(lambda m, x: x.unsqueeze(1).contiguous(
        memory_format=torch.channels_last)), X2, None),
    ("permute not inverse", Fn(lambda m, x: x.permute(0, 2, 1).permute(2, 1, 0)), (2, 3, 3), None),
    ("transpose different dims", Fn(lambda m, x: x.transpose(0, 1).transpose(1, 2)), X2, None),
    ("reshape chain, inner used",
     Fn(lambda m, x: (lambda y: (y.reshape(-1, 6, 2), y))(x.reshape(-1, 12))),
     X2, None),
]


@pytest.mark.parametrize("case", NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_rule_does_not_fire(case):
    _, model, shape, prepare, = case
    x = torch.randn(shape)
    gm = capture(model, x)
    if prepare:
        prepare(gm)
    code = gm.code
    result = remove_noops(gm, PassContext(example_inputs=(x,)))
    assert not result.modified and gm.code == code and result.stats == {"total": 0}


def _stochastic_depth_graph(p: float, training: bool) -> fx.GraphModule:
    # Built by hand: torch.fx wraps stochastic_depth only where torchvision's module calls it.
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torchvision.ops.stochastic_depth, (x, p, "row", training))
    graph.output(graph.call_function(F.relu, (y,)))
    return fx.GraphModule(nn.Module(), graph)


@pytest.mark.parametrize("p, training, fires", [(0.0, True, True), (0.3, False, True),
                                                (0.3, True, False), (1.5, False, False)])
def test_stochastic_depth_function(p, training, fires):
    gm = _stochastic_depth_graph(p, training)
    x = torch.randn(X2)
    if p <= 1:
        record_run(gm, (x,), keep_values=False)
    code = gm.code
    result = remove_noops(gm, PassContext(example_inputs=(x,)))
    assert result.modified == fires
    assert result.stats.get("stochastic_depth", 0) == int(fires)
    if fires:
        assert targets(gm) == [F.relu]
        assert torch.equal(gm(x), F.relu(x))
        assert verify_structure(gm) == []
    else:
        assert gm.code == code


def test_no_rule_bypasses_a_value_written_in_place():
    class M(nn.Module):
        def forward(self, x):
            y = x * 1  # a copy: the write below must not reach it
            x.mul_(0)
            return y

    x = torch.randn(2, 3)
    gm = capture(M(), x)
    code = gm.code
    assert not remove_noops(gm, PassContext(example_inputs=(x,))).modified and gm.code == code
    inp = torch.randn(2, 3)
    assert torch.equal(gm(inp.clone()), M()(inp.clone()))


def test_rules_table_is_data():
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    assert {"dropout_module", "dropout_function", "stochastic_depth", "identity_module", "mul_one",
            "add_zero", "sub_zero", "div_one", "reshape_identity", "flatten_identity",
            "contiguous", "inverse_permute", "reshape_chain"} == set(names)
    assert all(isinstance(r, Rule) and r.doc for r in RULES)  # rows of the shared engine


def test_a_new_rule_is_one_row():
    # A pattern row: -(-x) is x. The inner neg goes with the outer one (nothing else reads it).
    neg_neg = Rule("double_neg", lambda x: torch.neg(torch.neg(x)), lambda m, b: m["x"],
                   doc="-(-x)")
    # A one-op row: x.float() of a float32 tensor hands back x itself.
    to_float = op_rule("float_of_float", ("float",), lambda m, b: m.root.args[0],
                       lambda m: m.root.args[0].meta["tensor_meta"].dtype == torch.float32,
                       doc="x.float() of a float32 x")
    x = torch.randn(2, 3)
    model = Fn(lambda m, x: torch.neg(torch.neg(x)).float().relu())
    gm = capture(model, x)
    result = apply_noop_rules(gm, [*RULES, neg_neg, to_float], (x,))
    assert result.counts == {"double_neg": 1, "float_of_float": 1}
    assert targets(gm) == [F.relu]
    assert torch.equal(gm(x), model(x))


def test_a_new_rule_leaves_values_written_in_place_alone():
    class M(nn.Module):
        def forward(self, x):
            y = torch.neg(torch.neg(x))  # a copy: the write below must not reach the result
            x.mul_(0)
            return y

    neg_neg = Rule("double_neg", lambda x: torch.neg(torch.neg(x)), lambda m, b: m["x"])
    x = torch.randn(2, 3)
    gm = capture(M(), x)
    code = gm.code
    assert apply_noop_rules(gm, [neg_neg], (x,)).count == 0 and gm.code == code


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5).flatmap(lambda nd: st.permutations(list(range(nd)))))
def test_random_permutation_and_its_inverse_cancel(perm):
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    shape = tuple(range(2, len(perm) + 2))
    model = Fn(lambda m, x: x.permute(*perm).permute(*inverse) * 2)
    x = torch.randn(shape)
    gm = capture(model, x)
    result = remove_noops(gm, PassContext(example_inputs=(x,)))
    identity = list(perm) == sorted(perm)
    # x.permute(identity) is itself a no-op pair with the other identity permute
    assert result.stats.get("inverse_permute") == 1
    assert "permute" not in targets(gm)
    assert torch.equal(gm(x), model(x))
    assert identity or result.stats["total"] == 1


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4).flatmap(lambda nd: st.tuples(st.permutations(list(range(nd))),
                                                      st.permutations(list(range(nd))))))
def test_random_permutation_pairs_cancel_only_when_inverse(pq):
    p, q = pq
    shape = (2,) + tuple(range(3, len(p) + 2))
    model = Fn(lambda m, x: x.permute(*p).permute(*q) + 1)
    x = torch.randn(shape)
    gm = capture(model, x)
    result = remove_noops(gm, PassContext(example_inputs=(x,)))
    cancels = all(p[q[i]] == i for i in range(len(p)))
    assert result.modified == cancels
    assert torch.equal(gm(x), model(x))


def test_remove_noops_through_optimize():
    model = Fn(lambda m, x: m.d(m.i(x) * 1).reshape(-1, 3, 4).permute(0, 2, 1).permute(0, 2, 1),
               d=nn.Dropout(0.5), i=nn.Identity())
    x = torch.randn(X2)
    opt = fxopt.optimize(model.eval(), x, pipeline=["remove_noops"])
    rec = opt.report.record("remove_noops")
    assert rec.status == "ok" and rec.stats["total"] == 5
    assert targets(opt.graph_module) == []  # forward returns its input
    assert not hasattr(opt.graph_module, "d") and not hasattr(opt.graph_module, "i")
    assert torch.equal(opt(x), x)


@pytest.mark.slow
def test_efficientnet_stochastic_depth_and_dropout_go():
    model = torchvision.models.efficientnet_b0().eval()
    x = torch.randn(1, 3, 32, 32)
    opt = fxopt.optimize(model, x, pipeline=["remove_noops"])
    stats = opt.report.record("remove_noops").stats
    assert stats["stochastic_depth"] == 9 and stats["dropout_module"] == 1
    assert not any(n.target is torchvision.ops.stochastic_depth
                   for n in opt.graph_module.graph.nodes)
    with torch.no_grad():
        assert compare_outputs(opt(x), model(x)).ok
