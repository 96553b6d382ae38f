"""``constant_fold``: evaluate once what depends only on weights and constants.

The constant nodes are those computed, purely, from parameters, buffers and literals, with no
in-place write near them (``fxopt.ir.purity``). Each maximal constant subgraph that feeds the
rest of the graph is evaluated once and becomes one new buffer (``_fxopt_const0`` ...) or, for
a Python scalar, a literal inlined into its users; the subgraph and the weights only it read
go. Identical constant subgraphs are merged first (``merge_duplicates`` of ``cse``), so they
fold into one buffer.

Worked example: ``x @ (self.w.t() * 2) + x @ (self.w.t() * 2)`` is captured as

    w = self.w;  t = w.t();  mul = t * 2;  matmul = x @ mul
    t_1 = w.t();  mul_1 = t_1 * 2;  matmul_1 = x @ mul_1;  add = matmul + matmul_1

``constant_fold`` merges the two copies of ``w.t() * 2`` (stats ``merged: 2``), evaluates it
once into the buffer ``_fxopt_const0`` and deletes ``w``; ``cse`` then merges the two matmuls:

    _fxopt_const0 = self._fxopt_const0;  matmul = x @ _fxopt_const0;  add = matmul + matmul

Folding trades compute for memory, so it is refused where the trade is bad: a lone weight, a
chain of views of a weight that stays in use (it would store a copy for nothing), and a result
more than ``FOLD_MAX_GROWTH`` times bigger than its inputs and above ``FOLD_MAX_ELEMENTS``
elements (``w.expand(4096, 4096)``; the pass notes it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.graph import (add_buffer, copy_meta, get_attr_value, remove_unused_attributes,
                            set_provenance, tensor_meta_of)
from fxopt.ir.purity import MutationInfo, erase_dead, is_pure, may_alias_input
from fxopt.passes.cleanup.common_subexpressions import merge_duplicates

__all__ = ["constant_fold", "FOLD_MAX_GROWTH", "FOLD_MAX_ELEMENTS"]

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
