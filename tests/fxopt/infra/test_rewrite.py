"""The rewrite engine: patterns as Python, deterministic matching, provenance, cleanup."""
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.rewrite import (Builder, Match, Rule, apply_rules, call, method, module, op,
                                 op_rule)
from fxopt.ir.graph import count_params
from fxopt.ir.tolerances import compare_outputs
from fxopt.ir.verify import verify_structure


def _capture(model, *inputs):
    return fxopt.capture(model.eval(), inputs)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_module")]


# A toy rule: sigmoid(x) * x -> F.silu(x) (the SiLU identity), written as data.
def _silu_pattern(x):
    return torch.sigmoid(x) * x


def _silu_replace(m: Match, b: Builder) -> fx.Node:
    return b.call_function(F.silu, (m["x"],), name="silu_of_" + m["x"].name)


SILU = Rule("sigmoid_mul", _silu_pattern, _silu_replace)


class SiluTwice(nn.Module):
    def forward(self, x):
        a = torch.sigmoid(x) * x            # back to back: the second match reads the first
        return x * torch.sigmoid(x) + (torch.sigmoid(a) * a)  # commuted and chained


def test_rule_fires_back_to_back_and_commuted():
    x = torch.randn(4, 5)
    gm = _capture(SiluTwice(), x)
    ref = SiluTwice()(x)
    res = apply_rules(gm, [SILU])
    assert res.counts == {"sigmoid_mul": 3}
    assert res.sweeps == 2  # one sweep rewrites all three; the next finds nothing
    assert _targets(gm) == [F.silu, F.silu, F.silu, operator.add]
    assert compare_outputs(gm(x), ref).ok
    assert verify_structure(gm) == []


def test_provenance_and_meta_on_new_nodes():
    x = torch.randn(4, 5)
    gm = _capture(SiluTwice(), x)
    mul = next(n for n in gm.graph.nodes if n.target is operator.mul)
    mul_name, sigmoid_name = mul.name, mul.args[0].name
    res = apply_rules(gm, [SILU])
    first = next(n for n in gm.graph.nodes if n.target is F.silu)
    # every matched node, the root last: its value is what the new node reproduces
    assert first.meta["fxopt_from"] == [sigmoid_name, mul_name]
    assert first.meta["tensor_meta"].shape == torch.Size([4, 5])
    assert res.rewrites[0][0] == "sigmoid_mul" and res.rewrites[0][2] == first.name


def test_idempotent_and_untouched_when_nothing_matches():
    x = torch.randn(3)
    gm = _capture(SiluTwice(), x)
    apply_rules(gm, [SILU])
    code = gm.code
    res = apply_rules(gm, [SILU])
    assert res.count == 0 and gm.code == code


class Chain(nn.Module):
    def forward(self, x):
        return torch.neg(torch.neg(torch.neg(x)))


def test_overlapping_candidates_resolve_in_graph_order():
    # neg(neg(neg(x))): two overlapping candidates; the earlier anchor wins, deterministically.
    rule = Rule("double_neg", lambda x: torch.neg(torch.neg(x)),
                lambda m, b: b.call_function(torch.abs, (m["x"],)))
    x = torch.randn(6)
    for _ in range(3):
        gm = _capture(Chain(), x)
        apply_rules(gm, [rule])
        assert _targets(gm) == [torch.abs, torch.neg]
        assert gm.code.count("torch.abs(x)") == 1


class Shared(nn.Module):
    def forward(self, x):
        s = torch.sigmoid(x)
        return s * x, s  # sigmoid has a user outside the match


def test_interior_node_with_external_user_is_not_matched():
    x = torch.randn(3)
    gm = _capture(Shared(), x)
    res = apply_rules(gm, [SILU])
    assert res.count == 0
    rule = Rule("sigmoid_mul", _silu_pattern, _silu_replace, allow_external_users=True)
    res = apply_rules(gm, [rule])
    assert res.count == 1
    out, s = gm(x)
    assert torch.allclose(out, F.silu(x)) and torch.allclose(s, torch.sigmoid(x))


class SameVar(nn.Module):
    def forward(self, x, y):
        return x + x, x + y


def test_a_variable_binds_one_value():
    rule = Rule("double", lambda x: x + x, lambda m, b: b.call_function(torch.mul, (m["x"], 2)))
    gm = _capture(SameVar(), torch.randn(2), torch.randn(2))
    assert apply_rules(gm, [rule]).count == 1
    assert _targets(gm) == [torch.mul, operator.add]


class ConvPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.b = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        ya = self.a(x)
        return ya + self.b(x), ya  # a's output has another user: only b can be the match


def test_commutative_alternatives_and_reject_notes():
    conv = module("conv", nn.Conv2d)

    def check(m):
        return m.nodes["conv"].target == "b" or m.reject(f"{m.nodes['conv'].target} declined")

    rule = Rule("conv_add", lambda x, y: conv(x) + y,
                lambda m, b: b.call_function(torch.add, (m.nodes["conv"], m["y"])),
                check=check, allow_external_users=True)
    gm = _capture(ConvPair(), torch.randn(1, 2, 3, 3))
    res = apply_rules(gm, [rule])
    # 'a' (left operand) is tried first and declined; 'b' (right) is taken: no note survives
    assert res.count == 1 and res.notes == [] and res.rejected == []
    add = next(n for n in gm.graph.nodes if n.target is torch.add)
    assert add.args[0].target == "b"


def test_reject_reasons_are_reported_once():
    rule = Rule("never", _silu_pattern, _silu_replace, check=lambda m: m.reject("not today"))
    gm = _capture(SiluTwice(), torch.randn(3))
    res = apply_rules(gm, [rule])
    assert res.count == 0 and res.notes == ["not today"] and res.rejected == ["not today"]


class MyConv(nn.Conv2d):
    pass


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(2, 2, 1)
        self.mine = MyConv(2, 2, 1)

    def forward(self, x):
        return F.relu(self.plain(x)) + F.relu(self.mine(x))


def test_module_patterns_match_exact_types_and_unused_weights_go():
    conv = module("conv", nn.Conv2d)

    def replace(m, b):  # a 1x1 conv followed by relu -> relu of a scaled input (drops the conv)
        return b.call_function(F.relu, (m["x"],))

    rule = Rule("drop_conv", lambda x: F.relu(conv(x)), replace)
    # Both convs are leaves here; MyConv is a subclass (its forward could differ): not matched.
    tracer = fx.Tracer()
    tracer.is_leaf_module = lambda m, q: isinstance(m, nn.Conv2d)
    model = Convs()
    gm = fx.GraphModule(model, tracer.trace(model))
    gm.graph.lint()
    params = count_params(gm)
    res = apply_rules(gm, [rule])
    assert res.count == 1
    assert not hasattr(gm, "plain") and hasattr(gm, "mine")  # the dropped conv's weights went
    assert count_params(gm) == params - 6


def test_builder_attributes_and_fresh_names():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    lin = module("lin", nn.Linear)

    def replace(m, b):
        mod = m.module("lin")
        name = b.add_buffer("scaled_weight", mod.weight.detach() * 2)
        assert b.fresh_name("lin") == "lin_1"
        w = b.get_attr(name)
        assert w.meta["tensor_meta"].shape == torch.Size([3, 3])
        y = b.call_function(F.linear, (m["x"], w, None))
        return b.call_function(torch.tanh, (y,))

    m = M().eval()
    x = torch.randn(2, 3)
    gm = _capture(m, x)
    res = apply_rules(gm, [Rule("lin_tanh", lambda x: torch.tanh(lin(x)), replace)])
    assert res.count == 1
    assert torch.allclose(gm(x), torch.tanh(F.linear(x, m.lin.weight * 2)))
    assert not hasattr(gm, "lin")  # the Linear no node uses is gone


def test_rule_definition_errors():
    with pytest.raises(TypeError, match="call pattern"):
        Rule("bad", lambda x: x, lambda m, b: None)
    conv = module("conv", nn.Conv2d)
    with pytest.raises(TypeError, match="used twice"):
        Rule("bad", lambda x: conv(conv(x)), lambda m, b: None)
    with pytest.raises(TypeError):
        module("conv", int)
    with pytest.raises(TypeError):
        call("nothing")


def test_replacement_may_return_an_existing_node():
    rule = Rule("double_neg", lambda x: torch.neg(torch.neg(x)), lambda m, b: m["x"])
    x = torch.randn(5)
    gm = _capture(Chain(), x)
    res = apply_rules(gm, [rule])
    assert res.count == 1 and _targets(gm) == [torch.neg]
    assert torch.equal(gm(x), -x)


# -- one-op rows, mixed targets, docs -----------------------------------------------------------
class ThreeSpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.ident = nn.Identity()
        self.mine = MyIdentity()

    def forward(self, x):
        return self.mine(self.ident(torch.neg(x).neg())).relu()


class MyIdentity(nn.Identity):
    pass


def _graph_of(model):
    # Identity modules stay leaves (fxopt.capture would inline them).
    tracer = fx.Tracer()
    tracer.is_leaf_module = lambda m, q: isinstance(m, nn.Identity)
    return fx.GraphModule(model, tracer.trace(model))


def test_op_rule_matches_functions_methods_and_module_types():
    rule = op_rule("passthrough", (torch.neg, "neg", nn.Identity), lambda m, b: m.root.args[0],
                   doc="drops the call (a toy: neg is not a no-op)")
    assert rule.doc.startswith("drops") and Rule("r", lambda x: torch.neg(x), None).doc == ""
    gm = _graph_of(ThreeSpellings())
    res = apply_rules(gm, [rule])
    # torch.neg, x.neg() and self.ident; MyIdentity is a subclass (its forward could differ)
    assert res.counts == {"passthrough": 3}
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_method",
                                              "output"]
    assert not hasattr(gm, "ident") and hasattr(gm, "mine")


def test_op_patterns_inside_a_pattern():
    neg = op("neg", torch.neg, "neg")
    inner = op("inner", torch.neg, "neg")
    rule = Rule("double_neg", lambda x: neg(inner(x)), lambda m, b: m["x"])
    gm = _graph_of(ThreeSpellings())
    assert apply_rules(gm, [rule]).count == 1  # torch.neg(x).neg() -> x
    assert not any(n.target in (torch.neg, "neg") for n in gm.graph.nodes)


def test_op_pattern_definition_errors():
    with pytest.raises(TypeError, match="at least one"):
        op("nothing")
    with pytest.raises(TypeError, match="nn.Module"):
        op("bad", int)


# -- sweeps, skip, erasure ----------------------------------------------------------------------
def test_before_sweep_runs_before_every_sweep():
    seen = []
    x = torch.randn(4, 5)
    gm = _capture(SiluTwice(), x)
    res = apply_rules(gm, [SILU], before_sweep=lambda g: seen.append(len(g.graph.nodes)))
    assert res.sweeps == 2 and len(seen) == 2
    assert seen[0] > seen[1]  # the second sweep saw the graph the first one rewrote


def test_skip_leaves_nodes_alone_inside_a_match_too():
    rule = Rule("double_neg", lambda x: torch.neg(torch.neg(x)), lambda m, b: m["x"])
    x = torch.randn(5)
    for skipped in ("neg", "neg_1"):  # the inner call, then the root
        gm = _capture(Chain(), x)
        names = [n.name for n in gm.graph.nodes if n.target is torch.neg]
        assert names == ["neg", "neg_1", "neg_2"]
        res = apply_rules(gm, [rule], skip=lambda n: n.name == skipped)
        # skipping "neg" rules out both (neg_1 <- neg) and (neg <- x): only (neg_2 <- neg_1)
        # is left; skipping "neg_1" rules out every pair
        assert res.count == (1 if skipped == "neg" else 0)


def _hand_graph(build) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(build(graph, x))
    gm = fx.GraphModule(nn.Module(), graph)
    return gm


def test_dead_inputs_go_unless_they_have_side_effects():
    def build(g, x):
        dead = g.call_function(torch.sin, (g.call_function(torch.cos, (x,)),))
        noise = g.call_function(torch.randn_like, (x,))  # a draw: it advances the RNG
        first = g.call_function(operator.add, (x, dead))
        return g.call_function(operator.add, (first, noise))

    gm = _hand_graph(build)
    keep_first = op_rule("keep_first", (operator.add,), lambda m, b: m.root.args[0])
    res = apply_rules(gm, [keep_first])
    assert res.count == 2
    # sin and cos went with the add that read them; the random draw stays
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.randn_like]


def test_a_side_effect_is_never_inside_a_match_but_a_root_may_be_one():
    def build(g, x):
        y = g.call_method("add_", (x, 1))  # writes into x
        return g.call_function(torch.neg, (g.call_function(torch.rand_like, (y,)),))

    gm = _hand_graph(build)
    add_ = method("add_", "add_")
    bypass = Rule("bypass_add_", lambda x: torch.neg(add_(x)), lambda m, b: m["x"])
    assert apply_rules(gm, [bypass]).count == 0  # the write would be lost
    # The root is the rule's to vouch for: a draw replaced by zeros goes.
    zeros = op_rule("zeros", (torch.rand_like,),
                    lambda m, b: b.call_function(torch.zeros_like, (m.root.args[0],)))
    assert apply_rules(gm, [zeros]).count == 1
    assert [n.target for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output"] == \
        ["add_", torch.zeros_like, torch.neg]
