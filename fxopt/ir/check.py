"""Running a graph on the example inputs, recording what every node produced.

The pass manager uses one recorded run per pass: it refreshes ``tensor_meta`` (catching stale
metadata a pass left behind), gives the outputs to compare with the reference, and keeps the
intermediate values so that a mismatch can be traced to the first node that diverged.

    >>> run = record_run(gm, inputs)
    >>> run.output, run.values["layer1_0_conv1"]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.graph import module_path, tensor_meta_of
from fxopt.ir.tolerances import rel_err, tolerance_for

__all__ = ["RecordedRun", "record_run", "first_divergence", "value_key", "describe_node"]


def value_key(node: fx.Node) -> str:
    """The identity of the value a node computes, stable across passes.

    It is the last entry of ``fxopt_from`` (the original node whose value this node reproduces),
    so a rewritten node is compared with the node it replaced.
    """
    return node.meta.get("fxopt_from", [node.name])[-1]


@dataclass
class RecordedRun:
    output: Any
    values: dict[str, Any] = field(default_factory=dict)  # value_key -> value (tensors)
    by_node: dict[str, Any] = field(default_factory=dict)  # node name -> the same tensors
    stale_meta: list[str] = field(default_factory=list)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep_values: bool, refresh_meta: bool):
        super().__init__(gm, garbage_collect_values=not keep_values)
        self.keep_values = keep_values
        self.refresh_meta = refresh_meta
        self.values: dict[str, Any] = {}
        self.by_node: dict[str, Any] = {}
        self.stale: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            meta = tensor_meta_of(result)
            old = n.meta.get("tensor_meta")
            if not self.refresh_meta and old is not None and hasattr(old, "shape") and (
                    tuple(old.shape) != tuple(meta.shape) or old.dtype != meta.dtype):
                self.stale.append(f"node '{n.name}': tensor_meta says {tuple(old.shape)} "
                                  f"{old.dtype}, it computes {tuple(meta.shape)} {meta.dtype}")
            if self.refresh_meta or old is None:
                n.meta["tensor_meta"] = meta
            n.meta.pop("fxopt_nontensor", None)
            if self.keep_values and n.op != "placeholder":
                self.values[value_key(n)] = result
                self.by_node[n.name] = result
        elif n.op != "output":
            if self.refresh_meta or "tensor_meta" not in n.meta:
                n.meta.pop("tensor_meta", None)
                if isinstance(result, (tuple, list)) and result and all(
                        isinstance(r, torch.Tensor) for r in result):
                    n.meta["tensor_meta"] = tuple(tensor_meta_of(r) for r in result)
                else:
                    n.meta["fxopt_nontensor"] = True
        return result


def record_run(gm: fx.GraphModule, inputs: tuple, *, keep_values: bool = True,
               refresh_meta: bool = False) -> RecordedRun:
    """Run ``gm`` on ``inputs`` under no_grad, recording node values and checking metadata."""
    rec = _Recorder(gm, keep_values, refresh_meta)
    with torch.no_grad():
        out = rec.run(*inputs)
    return RecordedRun(out, rec.values, rec.by_node, rec.stale)


def first_divergence(gm: fx.GraphModule, by_node: dict[str, Any],
                     ref_values: dict[str, Any]) -> tuple[fx.Node, float] | None:
    """The first node (graph order) whose value differs from its reference counterpart.

    Nodes are matched by ``value_key`` (the last ``fxopt_from`` entry). Nodes without a
    counterpart of the same shape are skipped.
    """
    for node in gm.graph.nodes:
        val = by_node.get(node.name)
        if not isinstance(val, torch.Tensor):
            continue
        ref = ref_values.get(value_key(node))
        if not isinstance(ref, torch.Tensor) or ref.shape != val.shape or ref.dtype != val.dtype:
            continue
        if ref.numel() == 0:
            continue
        err = rel_err(val, ref)
        if err != err or err > tolerance_for(ref.dtype, ref.device):
            return node, err
    return None


def describe_node(node: fx.Node) -> str:
    path = module_path(node)
    return f"'{node.name}'" + (f" ({path})" if path else "")
