"""Checks shared by the cleanup pass tests: run a pass as the manager does, then its contract.

Loaded by file path (the tests run in importlib mode), like prune_zoo.py.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

import fxopt
from fxopt.infra.registry import GROUPS, PASSES, PassContext
from fxopt.ir.check import record_run
from fxopt.ir.tolerances import compare_outputs
from fxopt.ir.verify import verify_structure

__all__ = ["capture", "apply", "assert_matches", "assert_idempotent", "assert_untouched",
           "assert_group_fixpoint", "calls", "ops"]


def capture(model: nn.Module, *inputs) -> fx.GraphModule:
    gm = fxopt.capture(model.eval(), inputs)
    record_run(gm, inputs, keep_values=False)  # marks non-tensor nodes, as the manager does
    return gm


def apply(fn, gm: fx.GraphModule, *inputs):
    """Run a pass the way the manager does and check the structural contract after it."""
    result = fn(gm, PassContext(example_inputs=inputs))
    assert result.gm is gm
    assert verify_structure(gm) == [], verify_structure(gm)
    run = record_run(gm, inputs, keep_values=False)
    assert run.stale_meta == []
    return result


def assert_matches(gm: fx.GraphModule, model: nn.Module, *inputs) -> None:
    with torch.no_grad():
        stats = compare_outputs(gm(*inputs), model(*inputs))
    assert stats.ok and stats.rel_err < 1e-5, stats


def assert_idempotent(fn, gm: fx.GraphModule, *inputs) -> None:
    code, nodes = gm.code, len(gm.graph.nodes)
    again = fn(gm, PassContext(example_inputs=inputs))
    assert again.modified is False
    assert gm.code == code and len(gm.graph.nodes) == nodes


def assert_untouched(fn, gm: fx.GraphModule, *inputs) -> None:
    code = gm.code
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    result = fn(gm, PassContext(example_inputs=inputs))
    assert result.modified is False
    assert gm.code == code
    assert state.keys() == gm.state_dict().keys()


def assert_group_fixpoint(gm: fx.GraphModule, *inputs) -> None:
    """No member of the cleanup group finds anything more to do."""
    code = gm.code
    for name in GROUPS["cleanup"].members:
        assert PASSES[name].fn(gm, PassContext(example_inputs=inputs)).modified is False, name
    assert gm.code == code


def calls(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target or n.target is target)


def ops(gm: fx.GraphModule, op: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == op)
