"""constant_fold: golden, negative, idempotence and numeric tests (DESIGN.md section 8)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.graph import count_params
from fxopt.passes.cleanup.constant_folding import FOLD_MAX_ELEMENTS, constant_fold

import pass_checks  # noqa: E402  (tests/support, on the path from tests/conftest.py)
capture, apply, assert_matches = pass_checks.capture, pass_checks.apply, pass_checks.assert_matches
assert_idempotent, assert_untouched = pass_checks.assert_idempotent, pass_checks.assert_untouched
calls, ops = pass_checks.calls, pass_checks.ops

torch.manual_seed(0)


# -- constant_fold -----------------------------------------------------------------------------
class WeightMath(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = x @ (self.w.t() * 2)
        y = y + torch.ones_like(self.b)  # computed from a weight: folds too
        return y.reshape(-1, self.w.size(0)) + self.b


def test_constant_fold_golden_one_buffer_per_constant():
    x = torch.randn(3, 4)
    model = WeightMath().eval()
    gm = capture(model, x)
    result = apply(constant_fold, gm, x)
    assert result.modified
    assert result.stats == {"folded": 2, "inlined": 1, "merged": 0, "nodes": 5, "tensors": 1}
    assert calls(gm, "t") == 0 and calls(gm, "size") == 0 and calls(gm, torch.ones_like) == 0
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert attrs == ["_fxopt_const0", "b", "_fxopt_const1"]
    assert not hasattr(gm, "w")  # the weight only the folded subgraph read is gone
    assert torch.equal(gm._fxopt_const0, model.w.detach().t() * 2)
    assert not gm._fxopt_const0.requires_grad
    reshape = next(n for n in gm.graph.nodes if n.target is torch.reshape)
    assert reshape.args[1] == (-1, 4)  # w.size(0) inlined as a literal
    const0 = next(n for n in gm.graph.nodes if n.target == "_fxopt_const0")
    assert const0.meta["fxopt_from"] == ["w", "t", "mul"]
    assert_matches(gm, model, x)
    assert_idempotent(constant_fold, gm, x)


def test_constant_fold_through_optimize():
    x = torch.randn(3, 4)
    model = WeightMath().eval()
    opt = fxopt.optimize(model, x, pipeline=["constant_fold"])
    rec = opt.report.record("constant_fold")
    assert rec.modified and rec.status == "ok" and rec.stats["folded"] == 2
    assert "w" in dict(model.named_parameters())  # the user's model is untouched
    assert_matches(opt.graph_module, model, x)


def test_constant_fold_negative_lone_attr_and_input_dependent():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return (x * 2 + self.b).relu()

    x = torch.randn(2, 4)
    assert_untouched(constant_fold, capture(M(), x), x)


def test_constant_fold_keeps_views_of_weights_in_use():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w + x @ self.w.t()  # folding w.t() would store w twice

    x = torch.randn(2, 4)
    assert_untouched(constant_fold, capture(M(), x), x)


def test_constant_fold_refuses_big_results_with_a_note():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 256))

        def forward(self, x):
            return x + self.w.expand(FOLD_MAX_ELEMENTS // 256 + 1, 256) * 2

    x = torch.randn(1, 256)
    model = M().eval()
    gm = capture(model, x)
    code = gm.code
    result = apply(constant_fold, gm, x)
    assert not result.modified and gm.code == code
    assert len(result.notes) == 1 and "not folded" in result.notes[0]


def test_constant_fold_never_folds_random_or_mutated():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            # A parameter, not a buffer: torch.fx traces buffer arithmetic as constants.
            self.count = nn.Parameter(torch.zeros(4), requires_grad=False)

        def forward(self, x):
            self.count.add_(1)  # a running counter: count * 2 differs on every call
            return x + torch.rand_like(self.count) * 0 + self.count * 2

    x = torch.randn(2, 4)
    gm = capture(M(), x)
    assert calls(gm, "add_") == 1
    assert_untouched(constant_fold, gm, x)


def test_constant_fold_evaluates_module_calls_on_weights():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Parameter(torch.randn(5, 8))
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return x @ F.relu(self.proj(self.emb)).t()

    x = torch.randn(2, 8)
    model = M().eval()
    gm = capture(model, x)
    before = count_params(gm)
    result = apply(constant_fold, gm, x)
    assert result.stats["folded"] == 1 and result.stats["tensors"] == 3
    assert ops(gm, "call_module") == 0 and not hasattr(gm, "proj")
    assert count_params(gm) == 5 * 8 and before == 5 * 8 + 8 * 8 + 8
    assert_matches(gm, model, x)
    assert_idempotent(constant_fold, gm, x)


# -- the group ---------------------------------------------------------------------------------


def test_constant_fold_merges_identical_constants_into_one_buffer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ (self.w.t() * 2) + (x + 1) @ (self.w.t() * 2)

    x = torch.randn(2, 4)
    model = M().eval()
    gm = capture(model, x)
    result = apply(constant_fold, gm, x)
    assert result.stats["folded"] == 1 and result.stats["merged"] == 2
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["_fxopt_const0"]
    assert_matches(gm, model, x)
    assert_idempotent(constant_fold, gm, x)
