"""Tests of dce, cse, constant_fold and the cleanup group (remove_noops: test_cleanup_noops.py).

Each pass gets a golden test (what the graph holds after), a negative test (a graph it must
leave alone), an idempotence test, a numeric test against eager and a check of its stats.
Models are tiny and built here; passes are called directly on a captured graph, or through
``fxopt.optimize`` for the end-to-end tests.
"""
from __future__ import annotations

import gc
import operator
import weakref

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.registry import GROUPS, PASSES, PassContext
from fxopt.ir.check import record_run
from fxopt.ir.graph import count_params
from fxopt.ir.tolerances import compare_outputs
import fxopt.passes.cleanup as cleanup
from fxopt.passes.cleanup import cse, dce
from fxopt.passes.cleanup.common_subexpressions import arg_key

torch.manual_seed(0)


import pass_checks  # noqa: E402  (tests/support, on the path from tests/conftest.py)
capture, apply, assert_matches = pass_checks.capture, pass_checks.apply, pass_checks.assert_matches
assert_idempotent, assert_untouched = pass_checks.assert_idempotent, pass_checks.assert_untouched
assert_group_fixpoint, calls, ops = (pass_checks.assert_group_fixpoint, pass_checks.calls,
                                     pass_checks.ops)


# -- registration ------------------------------------------------------------------------------
def test_passes_and_group_are_registered():
    for name in ("dce", "cse", "constant_fold", "remove_noops"):
        assert PASSES[name].reference == "exact"
        assert PASSES[name].summary
    group = GROUPS["cleanup"]
    assert group.members == ("remove_noops", "constant_fold", "cse", "dce")
    assert group.max_iterations == 4
    assert set(cleanup.__all__) >= {"dce", "cse", "constant_fold", "remove_noops"}
    assert cleanup.CLEANUP is group


# -- dce ---------------------------------------------------------------------------------------
class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 32)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.register_buffer("b", torch.randn(8))

    def forward(self, x):
        dead = F.relu(self.unused(x)) * 2  # noqa: F841 - dead on purpose
        dead2 = self.w.t() + self.b  # noqa: F841
        return self.used(x)


def test_dce_golden_drops_nodes_params_and_modules():
    x = torch.randn(2, 8)
    model = DeadBranch().eval()
    gm = capture(model, x)
    params_before = count_params(gm)
    result = apply(dce, gm, x)
    assert result.modified
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert result.stats["nodes"] == 7  # unused, relu, mul, w, t, b, add
    assert result.stats["tensors"] == 4  # unused.weight, unused.bias, w, b
    assert result.stats["modules"] == 1
    assert count_params(gm) == params_before - (8 * 32 + 32 + 64 + 8) == 8 * 8 + 8
    assert result.stats["bytes"] == 4 * (8 * 32 + 32 + 64 + 8)
    assert not hasattr(gm, "unused") and not hasattr(gm, "w")
    assert "b" not in dict(gm.named_buffers())
    assert_matches(gm, model, x)
    assert_idempotent(dce, gm, x)


def test_dce_memory_really_drops():
    x = torch.randn(2, 8)
    gm = capture(DeadBranch(), x)
    ref = weakref.ref(gm.unused.weight)
    dce(gm, PassContext(example_inputs=(x,)))
    gc.collect()
    assert ref() is None  # nothing keeps the dropped weight alive


def test_dce_negative_leaves_live_graph_alone():
    x = torch.randn(2, 8)
    gm = capture(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), x)
    assert_untouched(dce, gm, x)


class SideEffects(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.narrow(0, 0, 1).zero_()  # writes into y through a view; no users, must stay
        torch.rand_like(x)  # a random draw advances the RNG: treated as impure, like torch.fx
        x.mul_(2)  # in place on an input: canonicalization keeps it, dce must too
        return y + x


def test_dce_keeps_side_effects():
    gm = capture(SideEffects(), torch.randn(3, 4))
    before = gm.code
    result = dce(gm, PassContext(example_inputs=(torch.randn(3, 4),)))
    assert not result.modified and gm.code == before
    assert calls(gm, "zero_") == 1 and calls(gm, "mul_") == 1 and calls(gm, torch.rand_like) == 1
    x = torch.randn(3, 4)
    out, ref = gm(x.clone()), SideEffects()(x.clone())
    assert torch.equal(out, ref)


# -- cse ---------------------------------------------------------------------------------------
class Repeated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x, y):
        a = torch.sigmoid(x) + 1
        b = torch.sigmoid(x) + 1  # same as a
        c = self.lin(x) * self.lin(x)  # the same module call twice
        d = x * y + y * x  # commutes
        n = x.size(0) + x.size(0)
        return a * b + c + d + n


def test_cse_golden_merges_pure_duplicates():
    x, y = torch.randn(3, 6), torch.randn(3, 6)
    model = Repeated().eval()
    gm = capture(model, x, y)
    result = apply(cse, gm, x, y)
    assert result.modified
    assert calls(gm, torch.sigmoid) == 1
    assert ops(gm, "call_module") == 1
    assert calls(gm, "size") == 1
    # a, b merged; x*y and y*x merged; a*b, c=lin*lin, d=xy+xy remain
    assert calls(gm, operator.mul) == 3
    assert result.stats == {"merged": 5, "get_attr": 0, "call_module": 1}
    assert_matches(gm, model, x, y)
    assert_idempotent(cse, gm, x, y)


def test_cse_merges_duplicate_get_attr_and_keeps_provenance():
    x = torch.randn(2, 4)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x + self.w

    model = M().eval()
    gm = capture(model, x)
    first = next(n for n in gm.graph.nodes if n.op == "get_attr")
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    with gm.graph.inserting_before(add):
        dup = gm.graph.get_attr("w")
    dup.meta.update(first.meta, fxopt_from=["w_again"])
    with gm.graph.inserting_after(add):
        add2 = gm.graph.call_function(operator.add, (add, dup))
    add2.meta.update(add.meta, fxopt_from=["add2"])
    gm.graph.output_node().args = (add2,)
    gm.recompile()
    result = apply(cse, gm, x)
    assert result.stats["get_attr"] == 1 and ops(gm, "get_attr") == 1
    assert first.meta["fxopt_from"][-1] == "w" and "w_again" in first.meta["fxopt_from"]
    assert torch.allclose(gm(x), x + 2 * model.w)


def test_cse_kwargs_order_does_not_matter_but_values_do():
    graph = fx.Graph()
    x = graph.placeholder("x")
    s1 = graph.call_function(torch.sum, (x,), {"dim": 1, "keepdim": True})
    s2 = graph.call_function(torch.sum, (x,), {"keepdim": True, "dim": 1})
    s3 = graph.call_function(torch.sum, (x,), {"keepdim": False, "dim": 1})
    graph.output((s1, s2, s3))
    gm = fx.GraphModule(nn.Module(), graph)
    x0 = torch.randn(2, 3)
    record_run(gm, (x0,), keep_values=False)
    result = apply(cse, gm, x0)
    assert result.stats["merged"] == 1 and calls(gm, torch.sum) == 2


def test_cse_keys_are_type_aware():
    assert arg_key(1) != arg_key(1.0) != arg_key(True)
    assert arg_key(0.0) != arg_key(-0.0)
    assert arg_key((1, 2)) != arg_key([1, 2])
    assert arg_key(slice(None, 2)) == arg_key(slice(None, 2))


class RandomTwice(nn.Module):
    def forward(self, x):
        a = torch.rand_like(x) + F.dropout(x, 0.5, True)
        b = torch.rand_like(x) + F.dropout(x, 0.5, True)
        return a, b


def test_cse_never_merges_random_ops():
    x = torch.randn(2, 4)
    gm = capture(RandomTwice(), x)
    assert_untouched(cse, gm, x)
    assert calls(gm, torch.rand_like) == 2 and calls(gm, F.dropout) == 2


class MutatedAfter(nn.Module):
    def forward(self, x):
        a = x + 1
        b = x + 1
        s1 = a.sum()
        a.masked_fill_(a > 1.5, 5.0)  # writes into a: a != b now, nor s1 != s2
        s2 = a.sum()
        v = b.view(-1)
        c = x * 3
        d = x * 3
        v.mul_(2)  # in place through a view of b
        return a, b, s1, s2, c, d


def test_cse_never_merges_values_mutated_in_place():
    x = torch.randn(2, 3)
    model = MutatedAfter()
    gm = capture(model, x)
    assert calls(gm, "masked_fill_") == 1 and calls(gm, "mul_") == 1
    result = apply(cse, gm, x)
    # only c and d (never written) merge
    assert result.stats["merged"] == 1
    assert calls(gm, operator.add) == 2 and calls(gm, "sum") == 2 and calls(gm, operator.mul) == 1
    assert_matches(gm, model, x)


def test_cse_negative_distinct_computations():
    x = torch.randn(2, 4)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    gm = capture(model, x)
    assert_untouched(cse, gm, x)


def test_cse_does_not_merge_impure_or_user_modules():
    class Counter(nn.Module):  # user code: may keep state
        def forward(self, x):
            return x + 1

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Counter()
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return self.c(x) + self.c(x) + self.drop(x) + self.drop(x)

    x = torch.randn(2, 3)
    gm = fxopt.capture(M().eval(), x, leaf_modules=[Counter])
    assert_untouched(cse, gm, x)


class Messy(nn.Module):
    """Everything at once: each pass opens work for the next."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.2)
        self.id = nn.Identity()
        self.unused = nn.Linear(8, 100)

    def forward(self, x):
        a = self.lin(self.drop(x))
        b = self.lin(self.id(x))  # the same as a once dropout and identity are gone
        k = self.w.t() * 0.5  # folds
        y = (a + b) @ k
        y = y.reshape(-1, 2, 4).reshape(-1, 8)  # chain, then an identity
        y = F.dropout(y * 1, 0.1, self.training)
        dead = self.unused(x)  # noqa: F841
        y = y.permute(1, 0).permute(1, 0).contiguous()
        return y + torch.sigmoid(x) * torch.sigmoid(x)


def test_cleanup_group_end_to_end():
    x = torch.randn(2, 8)
    model = Messy().eval()
    opt = fxopt.optimize(model, x, pipeline="cleanup")
    gm = opt.graph_module
    names = [(n.op, n.target) for n in gm.graph.nodes]
    assert names == [("placeholder", "x"), ("call_module", "lin"),
                     ("get_attr", "_fxopt_const0"), ("call_function", operator.add),
                     ("call_function", operator.matmul), ("call_function", torch.sigmoid),
                     ("call_function", operator.mul), ("call_function", operator.add),
                     ("output", "output")]
    assert opt.report.notes == []  # converged
    assert all(r.status == "ok" for r in opt.report.passes)
    stats = {r.name: r.stats for r in opt.report.passes}
    assert stats["cleanup/remove_noops"]["dropout_module"] == 1
    assert stats["cleanup/cse"]["merged"] == 2  # lin(x) twice, sigmoid(x) twice
    assert stats["cleanup/dce"]["modules"] >= 1
    assert opt.report.after.params < opt.report.before.params
    assert opt.report.final_rel_err < 1e-5
    assert_matches(gm, model, x)
    assert_group_fixpoint(gm, x)


@pytest.mark.parametrize("name", ["dce", "cse", "constant_fold", "remove_noops"])
def test_each_pass_through_optimize(name):
    x = torch.randn(2, 8)
    model = Messy().eval()
    opt = fxopt.optimize(model, x, pipeline=[name])
    rec = opt.report.record(name)
    assert rec.modified and rec.status == "ok" and rec.rel_err < 1e-5
    assert_matches(opt.graph_module, model, x)


def test_cleanup_group_on_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    opt = fxopt.optimize(model, x, pipeline="cleanup")
    assert all(r.status == "ok" for r in opt.report.passes)
    assert opt.report.notes == []
    with torch.no_grad():
        stats = compare_outputs(opt(x), model(x))
    assert stats.ok and stats.rel_err < 1e-5
    assert_group_fixpoint(opt.graph_module, x)
