"""``cse``: common subexpression elimination, one node for each distinct pure computation.

Two nodes merge when they call the same target on equal arguments: nodes by identity, constants
by type and value (``arg_key``: ``x * 1`` and ``x * 1.0`` differ, and so do ``0.0`` and
``-0.0``); ``x + y`` and ``y + x`` are one key. The later node's users move to the first one,
which comes first in graph order and so dominates them all. Only pure nodes merge
(``fxopt.ir.purity.is_pure``), never one whose value or inputs something writes into in place.

    >>> gm.code
    a = relu(x);  b = relu(x);  c = a + b;  d = b + a;  return c * d
    >>> cse(gm, ctx).stats
    {'merged': 2, 'get_attr': 0, 'call_module': 0}
    >>> gm.code
    a = relu(x);  c = a + a;  return c * c

``merge_duplicates(graph, eligible)`` is the merging itself; ``constant_fold`` uses it too.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.graph import tensor_meta
from fxopt.ir.purity import MutationInfo, is_pure

__all__ = ["cse", "merge_duplicates", "arg_key"]


class _Unkeyable(Exception):
    """An argument that cannot be compared by value (a tensor constant)."""


_SCALARS = (bool, int, str, type(None), type(Ellipsis), torch.dtype, torch.device,
            torch.memory_format, torch.layout)
# Calls whose two operands may be swapped, when both are tensors or numbers (operator.add
# also concatenates tuples, which does not commute).
_COMMUTATIVE = {operator.add, operator.mul, torch.add, torch.mul}


def arg_key(a: Any) -> Any:
    """A hashable key equal for equal arguments: nodes by identity, constants by type and value.

    The type is part of the key because ``1 == 1.0 == True`` in Python but ``x * 1`` and
    ``x * 1.0`` differ for integer tensors; floats go by ``repr`` so that ``-0.0 != 0.0``.
    """
    if isinstance(a, fx.Node):
        return ("node", a)
    if isinstance(a, (float, complex)):
        return (type(a), repr(a))
    if isinstance(a, _SCALARS):
        return (type(a), a)
    if isinstance(a, (tuple, list)):
        return (type(a), tuple(arg_key(x) for x in a))
    if isinstance(a, dict):
        return (dict, tuple(sorted(((repr(k), arg_key(v)) for k, v in a.items()),
                                   key=lambda kv: kv[0])))
    if isinstance(a, slice):
        return (slice, arg_key(a.start), arg_key(a.stop), arg_key(a.step))
    if isinstance(a, torch.Tensor):
        raise _Unkeyable
    return ("object", type(a), id(a))  # other objects: equal only to themselves


def _is_operand(a: Any) -> bool:
    return (isinstance(a, fx.Node) and tensor_meta(a) is not None) or (
        isinstance(a, (int, float)) and not isinstance(a, bool))


def _node_key(node: fx.Node, order: dict[fx.Node, int]) -> tuple:
    args = node.args
    if node.target in _COMMUTATIVE and len(args) == 2 and not node.kwargs and \
            all(_is_operand(a) for a in args) and any(isinstance(a, fx.Node) for a in args):
        # Sort the operands: nodes first, by position; so x+y and y+x get one key.
        args = tuple(sorted(args, key=lambda a: (0, order[a], "") if isinstance(a, fx.Node)
                            else (1, 0, repr(arg_key(a)))))
    kwargs = tuple(sorted((k, arg_key(v)) for k, v in node.kwargs.items()))
    return (node.op, node.target, arg_key(tuple(args)), kwargs)


def merge_duplicates(graph: fx.Graph, eligible) -> dict[str, int]:
    """Merge each ``eligible`` node into the first earlier node with the same key.

    Callers decide what is eligible (pure, not touched by an in-place write); the first node
    of a key comes first in graph order, so it dominates every user of the later ones.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    seen: dict[tuple, fx.Node] = {}
    stats = {"merged": 0, "get_attr": 0, "call_module": 0}
    for node in list(graph.nodes):
        if not eligible(node):
            continue
        try:
            key = _node_key(node, order)
        except _Unkeyable:
            continue
        rep = seen.get(key)
        if rep is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(rep)
        kept = list(rep.meta.get("fxopt_from", [rep.name]))
        # rep now stands for both; its own name stays last (the checks compare against it).
        rep.meta["fxopt_from"] = [n for n in node.meta.get("fxopt_from", [node.name])
                                  if n not in kept] + kept
        graph.erase_node(node)
        stats["merged"] += 1
        if node.op in ("get_attr", "call_module"):
            stats[node.op] += 1
    return stats


@register_pass("cse", reference="exact")
def cse(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Common subexpression elimination: one node for each distinct pure computation.

    Only pure nodes merge (no random draws, no in-place writes, no impure calls, modules only
    when they are torch.nn layers in eval mode other than dropout and recurrent ones), and never
    a node whose value or inputs something writes into in place: its value depends on when it
    is read.
    """
    mutation = MutationInfo(gm.graph)
    stats = merge_duplicates(gm.graph, lambda n: is_pure(n) and not mutation.touches(n))
    if stats["merged"]:
        gm.recompile()
    return PassResult(gm, modified=stats["merged"] > 0, stats=stats)
