"""The structural verifier the pass manager runs after every pass.

It finds: a graph that fails ``graph.lint()``; ``get_attr``/``call_module`` targets that do not
resolve (dangling attributes); parameters and buffers that no node reads (orphans: memory that
never drops); tensor nodes without ``tensor_meta``; generated code out of date with the graph.

    >>> problems = verify_structure(gm)   # [] when the graph is sound
"""
from __future__ import annotations

import torch.fx as fx

from fxopt.ir.graph import get_attr_value, unused_tensors

__all__ = ["verify_structure", "unused_tensors"]


def verify_structure(gm: fx.GraphModule, *, require_meta: bool = True) -> list[str]:
    """Problems found in ``gm`` as readable lines; empty when sound."""
    problems: list[str] = []
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises plain RuntimeError
        problems.append(f"graph lint: {e}")
        return problems
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                get_attr_value(gm, node.target)
            except AttributeError:
                problems.append(f"node '{node.name}' refers to '{node.target}', which does not "
                                f"exist")
        if require_meta and node.op not in ("output",) and node.users:
            if "tensor_meta" not in node.meta and "val" not in node.meta \
                    and _should_have_meta(node):
                problems.append(f"node '{node.name}' ({node.op} {_tname(node.target)}) has no "
                                f"tensor_meta")
    orphans = unused_tensors(gm)
    if orphans:
        shown = ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        problems.append(f"{len(orphans)} parameter/buffer(s) no node uses: {shown}")
    if getattr(gm, "_code", None) is not None and gm.code != gm.graph.python_code("self").src:
        problems.append("generated code is stale: the pass changed the graph without "
                        "gm.recompile()")
    return problems


def _should_have_meta(node: fx.Node) -> bool:
    # Nodes that produced a non-tensor (sizes, tuples) have no tensor_meta after ShapeProp;
    # they are marked with fxopt_nontensor by the check run.
    return not node.meta.get("fxopt_nontensor", False)


def _tname(target) -> str:
    return getattr(target, "__name__", str(target))
