"""Tests of the purity and mutation facts the cleanup passes rely on (``passes/purity.py``)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.purity import (MutationInfo, erase_dead, has_side_effects, is_inplace, is_pure,
                             is_pure_module, is_random)


def _graph(build) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """Build a graph by hand: ``build(graph, x)`` returns {name: node}; the last is output."""
    root = nn.Module()
    root.drop = nn.Dropout(0.5)
    root.drop_inplace = nn.Dropout(0.5, inplace=True)
    root.lin = nn.Linear(3, 3)
    root.lstm = nn.LSTM(3, 3)
    root.eval()
    graph = fx.Graph()
    x = graph.placeholder("x")
    nodes = build(graph, x)
    graph.output(list(nodes.values())[-1])
    return fx.GraphModule(root, graph), nodes


CASES = [  # name, how to build it, inplace, random, side effects, pure
    ("add", lambda g, x: g.call_function(operator.add, (x, 1)), False, False, False, True),
    ("relu_", lambda g, x: g.call_function(torch.relu_, (x,)), True, False, True, False),
    ("add_ method", lambda g, x: g.call_method("add_", (x, 1)), True, False, True, False),
    ("__add__", lambda g, x: g.call_method("__add__", (x, 1)), False, False, False, True),
    ("__iadd__", lambda g, x: g.call_method("__iadd__", (x, 1)), True, False, True, False),
    ("setitem", lambda g, x: g.call_function(operator.setitem, (x, 0, 1.0)), True, False, True, False),
    ("iadd", lambda g, x: g.call_function(operator.iadd, (x, 1)), True, False, True, False),
    ("out=", lambda g, x: g.call_function(torch.add, (x, 1), {"out": x}), True, False, True, False),
    ("aten.add_", lambda g, x: g.call_function(torch.ops.aten.add_.Tensor, (x, x)), True, False, True, False),
    ("aten.add", lambda g, x: g.call_function(torch.ops.aten.add.Tensor, (x, x)), False, False, False, True),
    ("randn_like", lambda g, x: g.call_function(torch.randn_like, (x,)), False, True, True, False),
    ("aten.rand_like", lambda g, x: g.call_function(torch.ops.aten.rand_like.default, (x,)),
     False, True, True, False),
    ("normal_", lambda g, x: g.call_method("normal_", (x,)), True, True, True, False),
    ("bernoulli", lambda g, x: g.call_function(torch.bernoulli, (x,)), False, True, True, False),
    ("empty_like", lambda g, x: g.call_function(torch.empty_like, (x,)), False, True, True, False),
    ("F.normalize", lambda g, x: g.call_function(F.normalize, (x,)), False, False, False, True),
    ("F.dropout eval", lambda g, x: g.call_function(F.dropout, (x, 0.5, False)), False, False, False, True),
    ("F.dropout eval inplace", lambda g, x: g.call_function(F.dropout, (x, 0.5, False, True)),
     False, False, False, True),
    ("F.dropout train", lambda g, x: g.call_function(F.dropout, (x,), {"p": 0.5}), False, True, True, False),
    ("F.dropout train inplace", lambda g, x: g.call_function(F.dropout, (x, 0.5, True, True)),
     True, True, True, False),
    ("F.alpha_dropout default", lambda g, x: g.call_function(F.alpha_dropout, (x, 0.5)),
     False, False, False, True),
    ("torch.dropout flag node", lambda g, x: g.call_function(torch.dropout, (x, 0.5, x)),
     False, True, True, False),
    ("size", lambda g, x: g.call_method("size", (x, 0)), False, False, False, True),
    ("linear module", lambda g, x: g.call_module("lin", (x,)), False, False, False, True),
    ("dropout module (eval)", lambda g, x: g.call_module("drop", (x,)), False, False, False, False),
    ("dropout inplace (eval)", lambda g, x: g.call_module("drop_inplace", (x,)), False, False, False, False),
    ("lstm module", lambda g, x: g.call_module("lstm", (x,)), False, False, False, False),
    ("get_attr", lambda g, x: g.get_attr("lin.weight"), False, False, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_classification(case):
    name, build, inplace, random, side, pure = case
    gm, nodes = _graph(lambda g, x: {"n": build(g, x)})
    n = nodes["n"]
    assert (is_inplace(n), is_random(n), has_side_effects(n), is_pure(n)) == (inplace, random, side, pure)


def test_pure_modules():
    assert is_pure_module(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()).eval())
    assert not is_pure_module(nn.Linear(2, 2).train())
    assert not is_pure_module(nn.Sequential(nn.Dropout()).eval())
    assert not is_pure_module(nn.GRU(2, 2).eval())
    assert not is_pure_module(nn.ReLU(inplace=True).eval())

    class Mine(nn.Module):
        def forward(self, x):
            return x

    assert not is_pure_module(Mine().eval())
    assert not is_pure_module(nn.Sequential(Mine()).eval())


def test_mutation_taints_the_whole_alias_class_and_readers():
    def build(g, x):
        a = g.call_function(operator.add, (x, 1))
        v = g.call_function(torch.reshape, (a, (-1,)))  # a view of a
        t = g.call_method("t", (a,))  # another view of a
        other = g.call_function(operator.mul, (x, 2))  # fresh memory
        reader = g.call_function(torch.sum, (t,))
        w = g.call_method("mul_", (v, 2))  # writes into a through v
        return {"a": a, "v": v, "t": t, "other": other, "reader": reader, "w": w}

    gm, n = _graph(build)
    info = MutationInfo(gm.graph)
    assert {n["a"], n["v"], n["t"], n["w"]} <= info.tainted
    assert n["other"] not in info.tainted and n["reader"] not in info.tainted
    assert info.touches(n["reader"])  # reads a tainted value
    assert not info.touches(n["other"])


def test_no_mutation_no_taint():
    gm, _ = _graph(lambda g, x: {"y": g.call_function(torch.relu, (g.call_method("t", (x,)),))})
    assert MutationInfo(gm.graph).tainted == set()


def test_erase_dead_goes_transitively_but_keeps_side_effects():
    def build(g, x):
        s = g.call_method("size", (x, 0))
        r = g.call_function(torch.reshape, (x, (s, -1)))
        w = g.call_method("add_", (x, 1))  # dead but a write
        out = g.call_function(torch.relu, (x,))
        return {"s": s, "r": r, "w": w, "out": out}

    gm, n = _graph(build)
    assert erase_dead(gm.graph, [n["r"], n["w"]]) == 2  # r, then s
    assert [m.op for m in gm.graph.nodes].count("call_method") == 1  # add_ stays
