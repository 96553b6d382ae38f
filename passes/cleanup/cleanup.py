"""Cleanup passes: dead code, common subexpressions, constants, no-ops, run to a fixpoint.

Each pass is exact (the graph after equals the graph before to float tolerance; in fact bit
for bit, since nothing is computed differently, up to the sign of zero: dropping ``x + 0``
keeps a ``-0.0`` that the addition would have made ``+0.0``), deterministic and idempotent.

- ``dce``: erases nodes nothing reads (never in-place writes, random draws or impure calls),
  then the parameters, buffers and submodules no node uses any more, so memory really drops.
- ``cse``: merges pure nodes that compute the same thing from the same inputs.
- ``constant_fold``: evaluates once what depends only on weights and constants, storing the
  result as one new buffer (``_fxopt_const0`` ...) or, for a Python scalar, inlining it.
- ``remove_noops``: the rule table in ``noops.py`` (eval dropout, identity, ``x*1``, ...).

Worked example: ``x @ (self.w.t() * 2) + x @ (self.w.t() * 2)`` is captured as

    w = self.w;  t = w.t();  mul = t * 2;  matmul = x @ mul
    t_1 = w.t();  mul_1 = t_1 * 2;  matmul_1 = x @ mul_1;  add = matmul + matmul_1

``constant_fold`` merges the two copies of ``w.t() * 2`` (stats ``merged: 2``), evaluates it
once into the buffer ``_fxopt_const0`` and deletes ``w``; ``cse`` then merges the two matmuls:

    _fxopt_const0 = self._fxopt_const0;  matmul = x @ _fxopt_const0;  add = matmul + matmul

"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxopt.infra.registry import PassContext, PassResult, register_group, register_pass
from fxopt.ir.graph import (
    add_buffer,
    copy_meta,
    count_bytes,
    get_attr_value,
    remove_unused_attributes,
    set_provenance,
    tensor_meta,
    tensor_meta_of,
)
from fxopt.ir.purity import MutationInfo, erase_dead, has_side_effects, is_pure, may_alias_input
from fxopt.passes.cleanup.noops import remove_noops

__all__ = ["dce", "cse", "constant_fold", "remove_noops", "merge_duplicates", "FOLD_MAX_GROWTH",
           "FOLD_MAX_ELEMENTS"]


# --------------------------------------------------------------------------------------------
# dce
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# cse
# --------------------------------------------------------------------------------------------
class _Unkeyable(Exception):
    """An argument that cannot be compared by value (a tensor constant)."""


_SCALARS = (bool, int, str, type(None), type(Ellipsis), torch.dtype, torch.device,
            torch.memory_format, torch.layout)
# Calls whose two operands may be swapped, when both are tensors or numbers (operator.add
# also concatenates tuples, which does not commute).
_COMMUTATIVE = {operator.add, operator.mul, torch.add, torch.mul}


def _arg_key(a: Any) -> Any:
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
        return (type(a), tuple(_arg_key(x) for x in a))
    if isinstance(a, dict):
        return (dict, tuple(sorted(((repr(k), _arg_key(v)) for k, v in a.items()),
                                   key=lambda kv: kv[0])))
    if isinstance(a, slice):
        return (slice, _arg_key(a.start), _arg_key(a.stop), _arg_key(a.step))
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
                            else (1, 0, repr(_arg_key(a)))))
    kwargs = tuple(sorted((k, _arg_key(v)) for k, v in node.kwargs.items()))
    return (node.op, node.target, _arg_key(tuple(args)), kwargs)


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


# --------------------------------------------------------------------------------------------
# constant_fold
# --------------------------------------------------------------------------------------------
# A folded result is stored in the model; refuse one that is much bigger than what it is
# computed from (``w.expand(4096, 4096)``, ``torch.zeros(10**8)``): folding trades compute for
# memory, and that trade is bad for broadcast-like ops.
FOLD_MAX_GROWTH = 4
FOLD_MAX_ELEMENTS = 1 << 20
_INLINE_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _inlinable(value: Any) -> bool:
    # (inf and nan are fine: torch.fx's generated code defines both names.)
    if isinstance(value, _INLINE_SCALARS):
        return True
    return isinstance(value, (tuple, list)) and all(_inlinable(v) for v in value)


def _literal(value: Any) -> Any:
    return tuple(_literal(v) for v in value) if isinstance(value, tuple) else (
        [_literal(v) for v in value] if isinstance(value, list) else value)


def _constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from weights and literals only, pure, with no in-place write near them."""
    mutation = MutationInfo(gm.graph)
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                value = get_attr_value(gm, node.target)
            except AttributeError:
                continue
            if isinstance(value, torch.Tensor) and not mutation.touches(node):
                const.add(node)
        elif node.op in ("call_function", "call_method", "call_module") and is_pure(node) \
                and not mutation.touches(node) and all(i in const for i in node.all_input_nodes):
            const.add(node)
    return const


def _ancestors(node: fx.Node, const: set[fx.Node]) -> set[fx.Node]:
    found, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in found and n in const:
            found.add(n)
            stack.extend(n.all_input_nodes)
    return found


@register_pass("constant_fold", reference="exact")
def constant_fold(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Evaluate once what depends only on parameters, buffers and constants.

    Each maximal constant subgraph that feeds the rest of the graph becomes one new buffer
    (a Python scalar result is inlined instead); the subgraph and the weights only it read go.
    A lone ``get_attr`` is left alone, and so is a chain of views of a weight that stays in use
    (folding would copy the weight for nothing), or a result more than ``FOLD_MAX_GROWTH`` times
    bigger than its inputs and above ``FOLD_MAX_ELEMENTS`` (noted in the result).
    """
    graph = gm.graph
    const = _constant_nodes(gm)
    boundaries = [n for n in graph.nodes if n in const and n.op != "get_attr"
                  and any(u not in const for u in n.users)]
    stats = {"folded": 0, "inlined": 0, "merged": 0, "nodes": 0, "tensors": 0}
    notes: list[str] = []
    if not boundaries:
        return PassResult(gm, modified=False, stats=stats)
    # Identical constant subgraphs first become one, so that they fold into one buffer (cse
    # runs after this pass in the group, too late to merge two buffers).
    stats["merged"] = merge_duplicates(graph, const.__contains__)["merged"]
    if stats["merged"]:
        const = {n for n in const if not getattr(n, "_erased", False)}
        boundaries = [n for n in graph.nodes if n in const and n.op != "get_attr"
                      and any(u not in const for u in n.users)]
    order = {n: i for i, n in enumerate(graph.nodes)}
    needed: set[fx.Node] = set()
    for b in boundaries:
        needed |= _ancestors(b, const)
    interp = fx.Interpreter(gm)
    failed: set[fx.Node] = set()
    with torch.no_grad():
        for node in graph.nodes:
            if node not in needed:
                continue
            if any(i in failed for i in node.all_input_nodes):
                failed.add(node)
                continue
            try:
                interp.env[node] = interp.run_node(node)
            except Exception as e:  # noqa: BLE001 - a constant that does not evaluate stays
                failed.add(node)
                notes.append(f"not folded: '{node.name}' failed to evaluate: "
                             f"{type(e).__name__}: {e}")
    touched: list[fx.Node] = []
    for b in boundaries:
        if b in failed:
            continue
        value = interp.env[b]
        sub = sorted(_ancestors(b, const), key=order.__getitem__)
        if isinstance(value, torch.Tensor):
            sources = [n for n in sub if n.op == "get_attr"]
            src_values = [interp.env[n] for n in sources]
            in_elems = sum(v.numel() for v in src_values)
            if value.numel() > FOLD_MAX_GROWTH * in_elems and value.numel() > FOLD_MAX_ELEMENTS:
                notes.append(f"not folded: '{b.name}' would store {value.numel()} elements "
                             f"computed from {in_elems}")
                continue
            if _view_of_kept_weight(value, sub, sources, src_values, const):
                continue
            name = add_buffer(gm, "_fxopt_const", value.detach().clone())
            with graph.inserting_before(b):
                new = graph.get_attr(name)
            copy_meta(new, b, with_tensor_meta=False)
            set_provenance(new, sub)
            new.meta["tensor_meta"] = tensor_meta_of(getattr(gm, name))
            b.replace_all_uses_with(new)
            stats["folded"] += 1
        elif _inlinable(value):
            literal = _literal(value)
            for user in [u for u in b.users if u not in const]:
                user.args = fx.node.map_arg(user.args, lambda n: literal if n is b else n)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda n: literal if n is b else n)
            stats["inlined"] += 1
        else:
            continue  # tuples of tensors and other values: their getitem users fold instead
        touched.append(b)
    if not touched and not stats["merged"]:
        return PassResult(gm, modified=False, stats=stats, notes=notes)
    stats["nodes"] = erase_dead(graph, touched)
    stats["tensors"] = remove_unused_attributes(gm)
    gm.recompile()
    return PassResult(gm, modified=True, stats=stats, notes=notes)


def _view_of_kept_weight(value: torch.Tensor, sub: list[fx.Node], sources: list[fx.Node],
                         src_values: list[torch.Tensor], const: set[fx.Node]) -> bool:
    """True when ``value`` only re-views a weight that other nodes keep needing anyway.

    ``w.t()`` next to a use of ``w`` itself: folding would store a second copy of ``w`` and
    save no arithmetic (a view costs nothing to compute).
    """
    if not all(n.op == "get_attr" or may_alias_input(n) for n in sub):
        return False
    ptr = value.untyped_storage().data_ptr()
    for src, v in zip(sources, src_values):
        if v.untyped_storage().data_ptr() == ptr and any(u not in const for u in src.users):
            return True
    return False


register_group(
    "cleanup", ["remove_noops", "constant_fold", "cse", "dce"],
    "Dead code, common subexpressions, constants and no-ops, to a fixpoint.",
    max_iterations=4)
