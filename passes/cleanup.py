"""Cleanup passes (placeholder: dce only; cse, constant folding and no-op removal follow)."""
from __future__ import annotations

import torch.fx as fx

from fxopt.graph_utils import remove_unused_attributes
from fxopt.registry import PassContext, PassResult, register_group, register_pass

__all__ = ["dce"]


@register_pass("dce")
def dce(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Dead code elimination: unused nodes, then parameters and buffers no node reads."""
    removed_nodes = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op not in ("placeholder", "output") and not node.users and not node.is_impure():
                gm.graph.erase_node(node)
                removed_nodes += 1
                changed = True
    removed_tensors = remove_unused_attributes(gm)
    if removed_nodes:
        gm.recompile()
    return PassResult(gm, modified=bool(removed_nodes or removed_tensors),
                      stats={"nodes": removed_nodes, "tensors": removed_tensors})


register_group("cleanup", ["dce"], "Dead code, common subexpressions, constants and no-ops, to a fixpoint.")
