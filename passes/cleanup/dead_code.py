"""``dce``: dead code elimination, down to the weights nothing reads any more.

A node goes when nothing reads its value and deleting it cannot be seen from outside the graph
(``fxopt.ir.purity.has_side_effects``: in-place writes, random draws that advance the RNG, calls
torch.fx calls impure stay). Then the parameters, buffers and submodules no node uses go too, so
the model's memory really drops.

    >>> gm.code                              # self.unused: a Linear(8, 32) no output depends on
    a = self.used(x);  b = self.unused(x);  c = b * 2;  return a
    >>> dce(gm, ctx).stats
    {'nodes': 2, 'tensors': 2, 'modules': 1, 'bytes': 1152}
    >>> gm.code
    a = self.used(x);  return a
"""
from __future__ import annotations

import torch.fx as fx

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.graph import count_bytes, remove_unused_attributes
from fxopt.ir.purity import has_side_effects

__all__ = ["dce"]


@register_pass("dce", reference="exact")
def dce(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Dead code elimination: unused nodes, then parameters, buffers and submodules no node uses.

    Nodes with side effects stay even when nothing reads them: in-place writes, random draws
    (they advance the RNG) and whatever ``torch.fx`` calls impure.
    """
    graph = gm.graph
    removed_nodes = 0
    # One reverse sweep is a fixpoint: a node's users all come after it, so by the time the
    # sweep reaches a node every dead user of it has already gone.
    for node in reversed(list(graph.nodes)):
        if not node.users and not has_side_effects(node):
            graph.erase_node(node)
            removed_nodes += 1
    modules_before = {name for name, _ in gm.named_modules()}
    bytes_before = count_bytes(gm)
    removed_tensors = remove_unused_attributes(gm)
    removed_modules = len(modules_before - {name for name, _ in gm.named_modules()})
    if removed_nodes:
        gm.recompile()
    return PassResult(gm, modified=bool(removed_nodes or removed_tensors or removed_modules),
                      stats={"nodes": removed_nodes, "tensors": removed_tensors,
                             "modules": removed_modules, "bytes": bytes_before - count_bytes(gm)})
