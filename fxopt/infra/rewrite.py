"""Declarative graph rewrites: rules as data, applied deterministically to a torch.fx graph.

A rule is a name, a pattern function, a replacement function, an optional check predicate
and a one-line doc. The pattern is plain Python over pattern variables (the language is in
``fxopt.infra.patterns``; every name of it is importable from here)::

    conv = module("conv", nn.Conv2d)                     # a call of an nn.Conv2d, bound as "conv"
    act = call("act", F.relu, torch.sigmoid)             # either function, bound as "act"

    def pattern(x):                                      # "x" matches any value
        return act(conv(x))

    def replace(m: Match, b: Builder) -> fx.Node:        # inserted before the matched root
        w = b.get_attr(m.nodes["conv"].target + ".weight")
        return b.call_function(my_op, (m["x"], w), name="conv_act")

    RULE = Rule("conv_act", pattern, replace, check=lambda m: m["x"].meta["tensor_meta"].dtype
                == torch.float32 or m.reject("not float32"), doc="conv then relu/sigmoid")
    result = apply_rules(gm, [RULE])                     # RewriteResult: counts, notes, rewrites

Semantics (what makes the result deterministic):
- Anchors are visited in graph order; at each anchor the rules are tried in list order and,
  within a rule, bindings in a fixed order (commutative ``+``/``*`` try the written order
  first). The first binding that passes the structural test and ``check`` is rewritten.
- A matched node other than the root may have no user outside the match (its value would
  still be needed), unless the rule says ``allow_external_users=True`` (then ``check`` decides,
  and such nodes stay in the graph for their other users). It may never have side effects
  (``fxopt.ir.purity.has_side_effects``: in-place writes, random draws, impure calls), nor be
  a node the caller's ``skip`` leaves alone.
- Nodes a rewrite creates are not anchors in the same sweep but can be matched as inputs by
  later anchors: back-to-back and chained rewrites (``conv + y`` then ``relu(fused)``) happen in
  one sweep. Sweeps repeat until nothing matches (``max_sweeps``).
- ``replace`` returns the node that now stands for the root: a node it created, or an existing
  one (``m["x"]`` for an identity). The root's users move to it and the root is erased. A node
  ``replace`` created also takes the root's ``tensor_meta`` and module path, and ``fxopt_from``
  naming every matched node, the root last (the node whose value it reproduces); an existing
  node keeps its own. Other created nodes get their own name. Matched nodes and inputs left
  without users are erased unless they have side effects (``fxopt.ir.purity.erase_dead``: the
  ``x.size(0)`` of a reshape spec goes with the reshape); unused parameters, buffers and
  submodules are deleted; the graph is linted and recompiled.
- ``m.reject("why")`` in a check records a note (reported once) unless another binding or
  rule rewrites that anchor.

Tables of one-op rewrites (no-ops, lowerings, exporters) use ``op_rule(name, targets, replace,
check)``: a rule that matches one call of those targets whatever its arguments, read in
``check`` and ``replace`` (through the op schema for fxopt ops: ``Conv2dInt8.of(m.root).w_q``).
Targets may mix functions, Tensor method names and module types (``op`` patterns), so one row
covers ``x * 1``, ``torch.mul(x, 1)`` and ``x.mul(1)``. State the table shares travels as
``apply_rules(gm, rules, context=state)`` and is ``m.context`` in the rule functions;
``skip(node)`` leaves nodes alone (no match is rooted at one or contains one);
``before_sweep(gm)`` runs before every sweep, to refresh an analysis the previous sweep's
rewrites made stale. ``remove_noops`` leaves alone every value something writes into in place,
as its graph is now::

    state = NoopContext(batch_is_one=False)              # .mutation: a MutationInfo, or None
    apply_rules(gm, RULES, context=state, skip=state.written_in_place,
                before_sweep=state.refresh)              # refresh: MutationInfo(gm.graph) again
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.infra.patterns import CallPattern, Pattern, Var, bindings, call, method, module, op, walk
from fxopt.ir.graph import get_attr_value, remove_unused_attributes, set_provenance, tensor_meta_of
from fxopt.ir.purity import erase_dead, has_side_effects, node_inputs

__all__ = [
    "Pattern", "Var", "module", "call", "method", "op", "op_rule", "Rule", "Match", "Builder",
    "RewriteResult", "apply_rules", "find_match",
]


# -- rules --------------------------------------------------------------------------------------
@dataclass
class Rule:
    """A rewrite rule. ``pattern(*vars) -> Pattern``; ``replace(match, builder) -> fx.Node``;
    ``check(match) -> bool`` (call ``match.reject(reason)`` to say why not); ``doc``: what it
    rewrites, in a line (``"x * 1, 1 * x"``), for tables read by people."""

    name: str
    pattern: Callable[..., Pattern]
    replace: Callable[["Match", "Builder"], fx.Node]
    check: Callable[["Match"], bool] | None = None
    allow_external_users: bool = False
    doc: str = ""
    root: CallPattern = field(init=False, repr=False)
    var_names: tuple[str, ...] = field(init=False, repr=False)
    call_names: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self):
        names = tuple(inspect.signature(self.pattern).parameters)
        root = self.pattern(*(Var(n) for n in names))
        if not isinstance(root, CallPattern):
            raise TypeError(f"rule '{self.name}': the pattern must return a call pattern, "
                            f"got {root!r}")
        self.root, self.var_names = root, names
        seen: set[str] = set()
        for p in walk(root):
            if isinstance(p, CallPattern):
                if p.name in seen:
                    raise TypeError(f"rule '{self.name}': pattern name '{p.name}' is used twice")
                seen.add(p.name)
        self.call_names = frozenset(seen)


def op_rule(name: str, targets: Sequence[Any], replace: Callable[["Match", "Builder"], fx.Node],
            check: Callable[["Match"], bool] | None = None, *, doc: str = "") -> Rule:
    """A rule for one call of any of ``targets`` (functions or op overloads, Tensor method names,
    module types: see ``op``), whatever its arguments: a row of a one-op table. ``m.root`` is the
    call (read its arguments through the op schema's view); the rule's name is also the bound
    name."""
    pattern = op(name, *targets)
    return Rule(name, lambda: pattern(), replace, check, doc=doc)


# -- matches and replacements ------------------------------------------------------------------
class Match:
    """One binding of a rule's pattern: ``m["x"]``, ``m.nodes["conv"]``, ``m.module("conv")``;
    ``m.context`` is what the caller passed to ``apply_rules`` (a lowering's state, say)."""

    def __init__(self, rule: Rule, gm: fx.GraphModule, root: fx.Node, bindings: dict[str, Any],
                 calls: set[str], context: Any = None):
        self.rule, self.gm, self.root, self.context = rule, gm, root, context
        self.nodes: dict[str, fx.Node] = {k: v for k, v in bindings.items() if k in calls}
        self.values: dict[str, Any] = {k: v for k, v in bindings.items() if k not in calls}
        self.reasons: list[str] = []
        self.data: dict[str, Any] = {}  # what ``check`` worked out, for ``replace`` to use

    def __getitem__(self, name: str) -> Any:
        return self.nodes[name] if name in self.nodes else self.values[name]

    def module(self, name: str) -> nn.Module:
        return get_attr_value(self.gm, self.nodes[name].target)

    @property
    def matched(self) -> list[fx.Node]:
        """The matched nodes in graph order (the root is last)."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return sorted(set(self.nodes.values()), key=lambda n: order[n])

    def reject(self, reason: str) -> bool:
        """Record why this match is not rewritten; returns False (for ``return m.reject(...)``)."""
        self.reasons.append(reason)
        return False


class Builder:
    """Creates the replacement's nodes just before the matched root, and new attributes."""

    def __init__(self, gm: fx.GraphModule, match: Match):
        self.gm, self.graph, self.match = gm, gm.graph, match
        self.created: list[fx.Node] = []
        self.notes: list[str] = []
        self.tallies: dict[str, int] = {}

    def _new(self, node: fx.Node) -> fx.Node:
        self.created.append(node)
        return node

    def call_function(self, target, args=(), kwargs=None, *, name: str | None = None) -> fx.Node:
        return self._new(self.graph.create_node("call_function", target, tuple(args),
                                                dict(kwargs or {}), name=name))

    def call_method(self, target: str, args=(), kwargs=None, *,
                    name: str | None = None) -> fx.Node:
        return self._new(self.graph.create_node("call_method", target, tuple(args),
                                                dict(kwargs or {}), name=name))

    def call_module(self, qualname: str, args=(), kwargs=None, *,
                    name: str | None = None) -> fx.Node:
        get_attr_value(self.gm, qualname)  # fail here, not at run time
        return self._new(self.graph.create_node("call_module", qualname, tuple(args),
                                                dict(kwargs or {}), name=name))

    def get_attr(self, qualname: str) -> fx.Node:
        value = get_attr_value(self.gm, qualname)
        node = self._new(self.graph.get_attr(qualname))
        if isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = tensor_meta_of(value)
        node.meta["fxopt_from"] = [node.name]
        node.meta["fxopt_path"] = qualname.rpartition(".")[0]
        return node

    def fresh_name(self, qualname: str) -> str:
        """``qualname`` if no attribute has it yet, else ``qualname_1``, ``qualname_2``, ..."""
        name, i = qualname, 0
        while _has_attr(self.gm, name):
            i += 1
            name = f"{qualname}_{i}"
        return name

    def add_module(self, qualname: str, mod: nn.Module, *, replace: bool = False) -> str:
        """Install ``mod`` at ``qualname`` (or a fresh variant of it unless ``replace``)."""
        name = qualname if replace else self.fresh_name(qualname)
        self.gm.add_submodule(name, mod)
        return name

    def add_buffer(self, qualname: str, value: torch.Tensor) -> str:
        name = self.fresh_name(qualname)
        owner_path, _, leaf = name.rpartition(".")
        owner = get_attr_value(self.gm, owner_path) if owner_path else self.gm
        owner.register_buffer(leaf, value)
        return name

    def note(self, text: str) -> None:
        """Say what the rewrite decided (it goes into the pass's notes)."""
        self.notes.append(text)

    def tally(self, key: str, n: int = 1) -> None:
        """Count something the rewrite did (``RewriteResult.tallies``)."""
        self.tallies[key] = self.tallies.get(key, 0) + n


def _has_attr(gm: nn.Module, qualname: str) -> bool:
    try:
        get_attr_value(gm, qualname)
        return True
    except AttributeError:
        return False


@dataclass
class RewriteResult:
    """What ``apply_rules`` did: rewrites per rule, notes (decisions and reasons), the reasons
    matches were rejected, tallies kept by replacements, and the list of rewrites as (rule,
    matched node names, new node name)."""

    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    tallies: dict[str, int] = field(default_factory=dict)
    rewrites: list[tuple[str, list[str], str]] = field(default_factory=list)
    sweeps: int = 0

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# -- matching -----------------------------------------------------------------------------------
def _structurally_ok(m: Match, skip: Callable[[fx.Node], bool] | None) -> bool:
    inside = set(m.nodes.values())
    for node in inside:
        if node is m.root:
            continue
        # Bypassing a write or a draw inside the match would change the program.
        if has_side_effects(node) or (skip is not None and skip(node)):
            return False
        if not m.rule.allow_external_users and any(u not in inside for u in node.users):
            return False
    return True


def find_match(rule: Rule, anchor: fx.Node, gm: fx.GraphModule,
               reasons: list[str] | None = None, context: Any = None,
               skip: Callable[[fx.Node], bool] | None = None) -> Match | None:
    """The first binding of ``rule`` rooted at ``anchor`` that passes the checks, or None.
    (``skip`` is checked on the other matched nodes; the caller checks the anchor.)"""
    for b in bindings(rule.root, anchor, gm):
        m = Match(rule, gm, anchor, b, rule.call_names, context)
        if not _structurally_ok(m, skip):
            continue
        if rule.check is None or rule.check(m):
            return m
        if reasons is not None:
            reasons.extend(r for r in m.reasons if r not in reasons)
    return None


# -- rewriting ----------------------------------------------------------------------------------
def _rewrite(m: Match, gm: fx.GraphModule, result: RewriteResult) -> fx.Node:
    b = Builder(gm, m)
    matched = m.matched
    with gm.graph.inserting_before(m.root):
        new = m.rule.replace(m, b)
    if not isinstance(new, fx.Node):
        raise TypeError(f"rule '{m.rule.name}': replace must return an fx.Node, "
                        f"got {type(new).__name__}")
    root = m.root
    if new is root:
        raise TypeError(f"rule '{m.rule.name}': replace returned the matched root itself")
    if new in b.created:  # an existing node (``x`` for an identity rewrite) keeps its own meta
        for key in ("fxopt_path", "nn_module_stack", "stack_trace"):
            if key in root.meta:
                new.meta[key] = root.meta[key]
        if "tensor_meta" in root.meta:
            new.meta["tensor_meta"] = root.meta["tensor_meta"]
        set_provenance(new, matched)  # the root last: its value is what ``new`` reproduces
    for node in b.created:
        if node is not new and "fxopt_from" not in node.meta:
            node.meta["fxopt_from"] = [node.name]
            node.meta.setdefault("fxopt_path", root.meta.get("fxopt_path", ""))
    root.replace_all_uses_with(new)
    # The root goes even if it has side effects of its own: the rule vouched that ``new``
    # reproduces it (an eval-mode ``stochastic_depth`` counts as a draw, but is the identity).
    inputs = node_inputs(root)
    gm.graph.erase_node(root)
    erase_dead(gm.graph, [n for n in matched if n is not root] + inputs)
    result.counts[m.rule.name] = result.counts.get(m.rule.name, 0) + 1
    result.rewrites.append((m.rule.name, [n.name for n in matched], new.name))
    for text in b.notes:
        result.note(text)
    for key, n in b.tallies.items():
        result.tallies[key] = result.tallies.get(key, 0) + n
    return new


def apply_rules(gm: fx.GraphModule, rules: Sequence[Rule], *, max_sweeps: int = 8,
                context: Any = None, skip: Callable[[fx.Node], bool] | None = None,
                before_sweep: Callable[[fx.GraphModule], Any] | None = None) -> RewriteResult:
    """Rewrite ``gm`` in place with ``rules`` until none matches; see the module docstring.

    ``context`` is handed to every match (``m.context``); ``skip(node)`` leaves nodes alone (a
    node whose value depends on when it is read, say): no match is rooted at one or contains
    one; ``before_sweep(gm)`` is called at the start of every sweep (to rebuild an analysis that
    ``skip`` or the rules read)."""
    result = RewriteResult()
    for sweep in range(max_sweeps):
        result.sweeps = sweep + 1
        if before_sweep is not None:
            before_sweep(gm)
        changed = False
        for anchor in list(gm.graph.nodes):
            if getattr(anchor, "_erased", False) or \
                    anchor.op in ("placeholder", "output", "get_attr"):
                continue
            if skip is not None and skip(anchor):
                continue
            reasons: list[str] = []
            for rule in rules:
                m = find_match(rule, anchor, gm, reasons, context, skip)
                if m is not None:
                    _rewrite(m, gm, result)
                    changed = True
                    reasons = []
                    break
            for r in reasons:
                result.note(r)
                if r not in result.rejected:
                    result.rejected.append(r)
        if not changed:
            break
    else:
        result.note(f"rewrites did not converge in {max_sweeps} sweeps")
    if result.count:
        gm.graph.lint()
        remove_unused_attributes(gm)
        gm.recompile()
    return result
