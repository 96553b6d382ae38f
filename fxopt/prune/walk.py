"""The walk state of the channel analysis: slots, layouts, the union-find, what rules record.

``ChannelWalk`` visits the graph once, in order, and hands every call to its rule (see
``fxopt.prune.rule_table``). A rule is a plain function ``rule(walk, node)`` that reads the
layouts of the node's inputs and writes the node's own through this small API:

- reading: ``layout(x)``, ``pieces(x)`` (a tuple output's layouts), ``known(x)``,
  ``module_call(node)`` (the module a ``call_module`` node calls and its one input),
  ``attr(target)``, ``channel_vector(node, x, dim, size)``;
- slots: ``fresh(node, size, kind)`` (a layer's new output channels), ``unite(a, b)``,
  ``unite_all(slots)``, ``freeze(layout, reason)``, ``freeze_slots(slots, reason)``;
- layouts: ``set(node, layout)``, ``set_pieces(node, layouts)``;
- records for the pruner: ``param(path, dim, slots, role, owner)`` (a weight indexed by the
  slots), ``rewrite(Rewrite)``, ``fix_module(path, kind, node)``, ``norm_over_channels(node,
  dim)``, ``record_layer(node, out, inp)`` (MACs), ``event(kind, node, slots)`` (a coupling),
  ``zero_in_reference(path)`` (a weight whose removed slots only a call's inside sees).

A rule that cannot reason about a node raises ``Unsupported("why")``; any other exception is
caught too. Either way the walk applies the safety rule: every slot the node reads is frozen
(never removed), with a reason that names the op and the node, and its output is free. So is a
call with no rule at all, and so is everything that reaches the model's output.

    >>> walk = ChannelWalk(gm)
    >>> walk.run(CHANNEL_RULES)
    >>> walk.layout(node)              # Layout(pdim=1, vec=array([0, 1, ..., 63]))

Slots are integers handed out in graph order; the union-find keeps the oldest slot of a class
as its root, so roots (and with them units, groups and pruning decisions) are deterministic.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch.fx as fx
import torch.nn as nn

from fxopt.ir.graph import get_attr_value, module_path, tensor_meta
from fxopt.ir.metrics import node_macs
from fxopt.prune.nodes import describe, op_name, tensor_inputs
from fxopt.prune.records import FREE, Layout, MacNode, Rewrite, Space

__all__ = ["ChannelWalk", "Unsupported", "UnionFind", "PINNED"]

# why a slot tied to a channel that can never go (a model input, a -1) is frozen
PINNED = "tied to a channel that cannot be removed"


class Unsupported(Exception):
    """Raised by a rule that cannot reason about its node: the walk freezes what it reads."""


class UnionFind:
    """Classes of slots that must be removed together (the *units*), and the frozen slots."""

    def __init__(self):
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}  # slot -> first reason

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: int, b: int) -> None:
        if a < 0 or b < 0:
            return
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the older slot stays the root: roots are then stable and deterministic
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def union_vectors(self, a: np.ndarray, b: np.ndarray, reason: str = PINNED) -> None:
        """Unite ``a[i]`` with ``b[i]``; a slot paired with -1 (never removed) is frozen."""
        mixed = (a < 0) != (b < 0)
        if mixed.any():
            self.freeze(np.concatenate([a[mixed], b[mixed]]), reason)
        pairs = np.unique(np.stack([a, b], axis=1), axis=0) if len(a) else ()
        for x, y in pairs:
            if x != y:
                self.union(int(x), int(y))

    def unite_all(self, slots: np.ndarray, reason: str = PINNED) -> None:
        """Unite all of ``slots``; if one of them is -1 (never removed), freeze them all."""
        if (slots < 0).any():
            self.freeze(slots, reason)
        slots = np.unique(slots[slots >= 0])
        for s in slots[1:]:
            self.union(int(slots[0]), int(s))

    def freeze(self, slots: Iterable[int], reason: str) -> None:
        arr = slots if isinstance(slots, np.ndarray) else np.asarray(list(slots))
        for s in np.unique(arr):
            s = int(s)
            if s >= 0 and s not in self.frozen:
                self.frozen[s] = reason


def _is_tensor_value(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and (hasattr(meta, "shape") or isinstance(meta, tuple))


class ChannelWalk:
    """The state of one walk over ``gm`` and the API its rules use (see the module doc)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.uf = UnionFind()
        self.spaces: list[Space] = []
        self.layouts: dict[str, Layout] = {}
        self.tuple_layouts: dict[str, list[Layout]] = {}
        # param path -> dim -> slot vector (all requirements on one dim united)
        self.params: dict[str, dict[int, np.ndarray]] = {}
        # weight | bias | bn_weight | norm_weight | stat | constant
        self.param_roles: dict[str, str] = {}
        self.param_owner: dict[str, str] = {}  # param path -> the layer or node users see
        self.module_fixes: dict[str, tuple[str, str]] = {}  # module path -> (kind, node name)
        self.rewrites: list[Rewrite] = []
        self.norm_nodes: dict[str, int] = {}  # LayerNorm over the pruned dim: node -> dim
        self.mac_nodes: list[MacNode] = []
        self.events: list[tuple[str, str, np.ndarray]] = []
        self.unknown_ops: dict[str, int] = {}  # op name -> nodes the safety rule froze
        self.zeroed: list[str] = []  # params the reference zeroes at removed slots (inside a call)
        self.rules = None  # the table of the current run (a rule may visit a node again)

    # -- the walk -----------------------------------------------------------------------------
    def run(self, rules) -> "ChannelWalk":
        """Visit every node in order with its rule from ``rules`` (a ``ChannelRuleTable``)."""
        self.rules = rules
        for n in self.gm.graph.nodes:
            try:
                self.visit(n, rules)
            except Unsupported as e:
                self.unsupported(n, str(e))
            except Exception as e:  # noqa: BLE001 - a rule that trips freezes, never raises
                self.unsupported(n, f"the analysis failed here ({type(e).__name__}: {e})")
        return self

    def visit(self, n: fx.Node, rules) -> None:
        if n.op == "placeholder":
            self.set(n, FREE)
            return
        if n.op == "get_attr":
            return  # a constant gets slots when an elementwise op needs them
        if n.op == "output":
            self.freeze_inputs(n.args, "reaches the model output")
            return
        mod = get_attr_value(self.gm, n.target) if n.op == "call_module" else None
        rule = rules.lookup(n, mod)
        if n.op != "call_module" and not _is_tensor_value(n) and not (rule and rule.any_value):
            # sizes, dims, python numbers: computed at run time from the (pruned) shapes; a
            # value that must not change with them shows up in the pruner's shape check
            return
        if rule is None:
            several = mod is not None and (len(n.args) != 1 or n.kwargs)
            raise Unsupported("called with several inputs" if several else "")
        rule.fn(self, n)

    def unsupported(self, n: fx.Node, why: str = "") -> None:
        """The safety rule: freeze every slot ``n`` reads or made; its output is free."""
        name = op_name(n, self.gm) if n.op in ("call_module", "call_function",
                                               "call_method") else n.op
        self.unknown_ops[name] = self.unknown_ops.get(name, 0) + 1
        reason = f"unsupported op {name} at {describe(n)}" + (f": {why}" if why else "")
        self.freeze_inputs((n.args, n.kwargs), reason)
        for sp in self.spaces:  # slots a rule made for this node before it gave up
            if sp.node == n.name:
                self.uf.freeze(np.arange(sp.start, sp.start + sp.size), reason)
        self.layouts[n.name] = FREE
        if isinstance(tensor_meta(n), tuple) or isinstance(n.meta.get("tensor_meta"), tuple):
            self.tuple_layouts[n.name] = [FREE] * len(n.meta["tensor_meta"])

    # -- reading ------------------------------------------------------------------------------
    def layout(self, a: Any) -> Layout:
        """The layout of a node (``FREE`` for constants not yet seen and non-nodes)."""
        if not isinstance(a, fx.Node):
            return FREE
        return self.layouts.get(a.name, FREE)

    def pieces(self, a: fx.Node) -> list[Layout] | None:
        """The layouts of a tuple-valued node's items (split, chunk), or None."""
        return self.tuple_layouts.get(a.name)

    def known(self, a: fx.Node) -> bool:
        """True once ``a`` has a layout (constants get one when an op first needs it)."""
        return a.name in self.layouts

    def module_call(self, n: fx.Node) -> tuple[nn.Module, Any]:
        """The module a ``call_module`` node calls and its one input (else ``Unsupported``)."""
        if len(n.args) != 1 or n.kwargs:
            raise Unsupported("called with several inputs")
        return get_attr_value(self.gm, n.target), n.args[0]

    def attr(self, target: str):
        """The parameter, buffer or module at ``target`` in the walked graph module."""
        return get_attr_value(self.gm, target)

    def channel_vector(self, n: fx.Node, x, dim: int, size: int) -> np.ndarray:
        """Slots of ``x`` along ``dim`` (which ``n`` reads as channels); -1s if none can go."""
        lay = self.layout(x)
        if lay.free:
            return np.full(size, -1, dtype=np.int64)
        if lay.pdim != dim or len(lay.vec) != size:
            self.freeze(lay, f"{describe(n)} reads channels along another dim")
            return np.full(size, -1, dtype=np.int64)
        return lay.vec

    # -- slots --------------------------------------------------------------------------------
    def fresh(self, n: fx.Node, size: int, kind: str, path: str | None = None) -> np.ndarray:
        """``size`` new slots produced by ``n`` (``kind``: conv | linear | constant)."""
        slots = self.uf.new(size)
        self.spaces.append(Space(len(self.spaces), kind, n.name,
                                 path if path is not None else (module_path(n) or n.name),
                                 size, int(slots[0]) if size else len(self.uf.parent)))
        return slots

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        """Slot ``a[i]`` goes with ``b[i]``; one paired with -1 is frozen."""
        self.uf.union_vectors(a, b)

    def unite_all(self, slots: np.ndarray) -> None:
        """All of ``slots`` go together; if one is -1, none can go."""
        self.uf.unite_all(slots)

    def freeze(self, lay: Layout | None, reason: str) -> None:
        """Never remove the slots of a layout (a no-op for ``FREE``)."""
        if lay is not None and lay.vec is not None:
            self.uf.freeze(lay.vec, reason)

    def freeze_slots(self, slots, reason: str) -> None:
        self.uf.freeze(slots, reason)

    def freeze_node(self, name: str, reason: str) -> None:
        """Freeze the slots of the node named ``name`` (and of its tuple items)."""
        self.freeze(self.layouts.get(name), reason)
        for lay in self.tuple_layouts.get(name, ()):
            self.freeze(lay, reason)

    def freeze_inputs(self, args, reason: str) -> None:
        """Freeze the slots of every node in ``args`` (an op that cannot follow them)."""
        for a in tensor_inputs(args):
            self.freeze_node(a.name, reason)

    # -- layouts ------------------------------------------------------------------------------
    def set(self, n: fx.Node, lay: Layout) -> None:
        """The node's layout; one with no removable slot left is ``FREE``."""
        if lay.pdim is not None and (lay.vec is None or not (lay.vec >= 0).any()):
            lay = FREE
        self.layouts[n.name] = lay

    def set_pieces(self, n: fx.Node, lays: list[Layout]) -> None:
        """The layouts of a tuple-valued node's items; the tuple itself is free."""
        self.tuple_layouts[n.name] = lays
        self.layouts[n.name] = FREE

    # -- records for the pruner ---------------------------------------------------------------
    def event(self, kind: str, where: fx.Node | str, slots: np.ndarray) -> None:
        """Note a coupling of ``kind`` (one of ``COUPLING_KINDS``) among ``slots``."""
        slots = np.asarray(slots)
        slots = slots[slots >= 0]
        if len(slots):
            self.events.append((kind, where if isinstance(where, str) else where.name, slots))

    def param(self, path: str, dim: int, vec: np.ndarray, role: str, owner: str) -> None:
        """Tensor ``path`` is indexed by ``vec`` along ``dim``: it shrinks with those slots.

        A tensor read twice along one dim (a shared layer) unites the two uses.
        """
        dims = self.params.setdefault(path, {})
        self.param_roles.setdefault(path, role)
        self.param_owner.setdefault(path, owner)
        if dim in dims:
            old = dims[dim]
            if len(old) != len(vec):
                raise Unsupported(f"parameter '{path}' is used with {len(old)} and {len(vec)} "
                                  f"channels along dim {dim}")
            self.uf.union_vectors(old, vec)
            self.event("shared", path, vec)
        else:
            dims[dim] = vec

    def zero_in_reference(self, path: str) -> None:
        """Tensor ``path`` is read inside one call (no graph tensor carries its slots): the
        masked reference zeroes it at the removed slots."""
        if path not in self.zeroed:
            self.zeroed.append(path)

    def rewrite(self, rw: Rewrite) -> None:
        """An argument of a node that spells a channel count (the pruner updates it)."""
        self.rewrites.append(rw)

    def fix_module(self, path: str, kind: str, n: fx.Node) -> None:
        """Module ``path`` has channel-count attributes the pruner updates (``kind``: conv,
        linear, bn, layer_norm, group_norm, prelu)."""
        self.module_fixes[path] = (kind, n.name)

    def norm_over_channels(self, n: fx.Node, dim: int) -> None:
        """``n`` is a LayerNorm over the pruned dim (the masked reference renormalizes it)."""
        self.norm_nodes[n.name] = dim

    def record_layer(self, n: fx.Node, out: np.ndarray, inp: np.ndarray | None) -> None:
        """A conv/linear layer: its MACs scale with its kept output (and input) channels."""
        try:
            macs = int(node_macs(n, self.gm))
        except Exception:  # noqa: BLE001 - MACs are an estimate; a missing shape counts 0
            macs = 0
        self.mac_nodes.append(MacNode(n.name, macs, out, inp))
