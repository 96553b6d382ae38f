"""Declarative graph rewrites: rules as data, matched deterministically over a torch.fx graph.

A rule is a pattern function, a replacement function, an optional check predicate and a name.
The pattern is plain Python over pattern variables: its parameters are wildcards, ``module``
and ``call`` make matchers that bind names, and torch functions and ``+``/``*`` work on
pattern values as they do on tensors::

    conv = module("conv", nn.Conv2d)                     # a call of an nn.Conv2d, bound as "conv"
    act = call("act", F.relu, torch.sigmoid)             # either function, bound as "act"

    def pattern(x):                                      # "x" matches any value
        return act(conv(x))

    def replace(m: Match, b: Builder) -> fx.Node:        # inserted before the matched root
        w = b.get_attr(m.nodes["conv"].target + ".weight")
        return b.call_function(my_op, (m["x"], w), name="conv_act")

    RULE = Rule("conv_act", pattern, replace, check=lambda m: m["x"].meta["tensor_meta"].dtype
                == torch.float32 or m.reject("not float32"))
    result = apply_rules(gm, [RULE])                     # RewriteResult: counts, notes, rewrites

Semantics (what makes the result deterministic):
- Anchors are visited in graph order; at each anchor the rules are tried in list order and,
  within a rule, bindings in a fixed order (commutative ``+``/``*`` try the written order
  first). The first binding that passes the structural test and ``check`` is rewritten.
- A matched node other than the root may have no user outside the match (its value would
  still be needed), unless the rule says ``allow_external_users=True`` (then ``check`` decides,
  and such nodes stay in the graph for their other users).
- Nodes a rewrite creates are not anchors in the same sweep but can be matched as inputs by
  later anchors: back-to-back and chained rewrites (``conv + y`` then ``relu(fused)``) happen in
  one sweep. Sweeps repeat until nothing matches (``max_sweeps``).
- The node returned by ``replace`` takes the root's users; a node it created also takes the
  root's ``tensor_meta`` and module path, and ``fxopt_from`` naming every matched node, the root
  last (the node whose value it reproduces). Other nodes it created get their own name.
  Matched nodes and inputs left without users are erased; unused parameters, buffers and
  submodules are deleted; the graph is linted and recompiled.
- ``m.reject("why")`` in a check records a note (reported once) unless another binding or
  rule rewrites that anchor.

Tables of one-op rewrites (lowerings, exporters) use ``op_rule(name, targets, replace, check)``:
a rule that matches one call of those targets whatever its arguments, read in ``check`` and
``replace`` through the op schema (``Conv2dInt8.of(m.root).w_q``). State the table shares (a
cache of prepared weights, say) travels as ``apply_rules(gm, rules, context=state)`` and is
``m.context`` in the rule functions.
"""
from __future__ import annotations

import inspect
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.ir.graph import get_attr_value, remove_unused_attributes, set_provenance, tensor_meta_of

__all__ = [
    "Pattern", "Var", "module", "call", "method", "op_rule", "Rule", "Match", "Builder",
    "RewriteResult", "apply_rules", "find_match",
]

_COMMUTATIVE = {operator.add, operator.mul}


# -- patterns ---------------------------------------------------------------------------------
class Pattern:
    """A pattern value. Torch functions and ``+``/``*`` on it build call patterns."""

    _auto = itertools.count()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Only positional arguments are matched; ``check`` reads keyword arguments off the node.
        return FnCall(f"{getattr(func, '__name__', 'fn')}#{next(cls._auto)}", (func,), args)

    def __add__(self, other):
        return FnCall(f"add#{next(Pattern._auto)}", (operator.add,), (self, other))

    def __radd__(self, other):
        return FnCall(f"add#{next(Pattern._auto)}", (operator.add,), (other, self))

    def __mul__(self, other):
        return FnCall(f"mul#{next(Pattern._auto)}", (operator.mul,), (self, other))

    def __rmul__(self, other):
        return FnCall(f"mul#{next(Pattern._auto)}", (operator.mul,), (other, self))


class Var(Pattern):
    """A wildcard: matches any value (a node or a constant) and binds it to ``name``."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return self.name


class _Call(Pattern):
    op = ""

    def __init__(self, name: str, targets: tuple, args: tuple):
        self.name, self.targets, self.args = name, targets, tuple(args)

    def node_ok(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        raise NotImplementedError

    @property
    def commutative(self) -> bool:
        return len(self.args) == 2 and all(t in _COMMUTATIVE for t in self.targets)

    def __repr__(self):
        return f"{self.name}({', '.join(map(repr, self.args))})"


class FnCall(_Call):
    op = "call_function"

    def node_ok(self, node, gm):
        return node.op == "call_function" and node.target in self.targets


class ModuleCall(_Call):
    op = "call_module"

    def node_ok(self, node, gm):
        if node.op != "call_module":
            return False
        try:
            mod = get_attr_value(gm, node.target)
        except AttributeError:
            return False
        # Exact types: a subclass may override forward (a leaf the user marked, say).
        return type(mod) in self.targets


class MethodCall(_Call):
    op = "call_method"

    def node_ok(self, node, gm):
        return node.op == "call_method" and node.target in self.targets


class module:
    """``module("conv", nn.Conv1d, nn.Conv2d)(x)``: a call of a module of exactly these types."""

    def __init__(self, name: str, *types: type):
        if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError("module(name, *types): give nn.Module subclasses")
        self.name, self.types = name, types

    def __call__(self, *args) -> ModuleCall:
        return ModuleCall(self.name, self.types, args)


class call:
    """``call("act", F.relu, torch.tanh)(x)``: a call_function of one of these targets.

    Only the leading positional arguments written in the pattern are matched; the rest (and the
    kwargs) are for ``check`` and ``replace`` to read off the node.
    """

    def __init__(self, name: str, *targets: Any):
        if not targets:
            raise TypeError("call(name, *targets): give at least one target")
        self.name, self.targets = name, targets

    def __call__(self, *args) -> FnCall:
        return FnCall(self.name, self.targets, args)


class method:
    """``method("c", "contiguous")(x)``: a call of one of these Tensor methods on ``x``."""

    def __init__(self, name: str, *names: str):
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError("method(name, *method_names): give method names")
        self.name, self.names = name, names

    def __call__(self, *args) -> MethodCall:
        return MethodCall(self.name, self.names, args)


def op_rule(name: str, targets: Sequence[Any], replace: Callable[["Match", "Builder"], fx.Node],
            check: Callable[["Match"], bool] | None = None) -> "Rule":
    """A rule for one call of any of ``targets`` (functions or op overloads), whatever its
    arguments: a row of a lowering or export table. ``m.root`` is the call (read its arguments
    through the op schema's view); the rule's name is also the bound name."""
    pattern = call(name, *targets)
    return Rule(name, lambda: pattern(), replace, check)


# -- rules and matches ------------------------------------------------------------------------
@dataclass
class Rule:
    """A rewrite rule. ``pattern(*vars) -> Pattern``; ``replace(match, builder) -> fx.Node``;
    ``check(match) -> bool`` (call ``match.reject(reason)`` to say why not)."""

    name: str
    pattern: Callable[..., Pattern]
    replace: Callable[["Match", "Builder"], fx.Node]
    check: Callable[["Match"], bool] | None = None
    allow_external_users: bool = False
    root: Pattern = field(init=False, repr=False)
    var_names: tuple[str, ...] = field(init=False, repr=False)
    call_names: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self):
        names = tuple(inspect.signature(self.pattern).parameters)
        root = self.pattern(*(Var(n) for n in names))
        if not isinstance(root, _Call):
            raise TypeError(f"rule '{self.name}': the pattern must return a call pattern, got {root!r}")
        self.root, self.var_names = root, names
        seen: set[str] = set()
        for p in _walk(root):
            if isinstance(p, _Call):
                if p.name in seen:
                    raise TypeError(f"rule '{self.name}': pattern name '{p.name}' is used twice")
                seen.add(p.name)
        self.call_names = frozenset(seen)


def _walk(p: Pattern) -> Iterator[Pattern]:
    yield p
    if isinstance(p, _Call):
        for a in p.args:
            if isinstance(a, Pattern):
                yield from _walk(a)


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

    def call_method(self, target: str, args=(), kwargs=None, *, name: str | None = None) -> fx.Node:
        return self._new(self.graph.create_node("call_method", target, tuple(args),
                                                dict(kwargs or {}), name=name))

    def call_module(self, qualname: str, args=(), kwargs=None, *, name: str | None = None) -> fx.Node:
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


# -- matching ---------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - tensors and other odd constants compare by identity
        return a is b


def _bind(p: Any, v: Any, b: dict[str, Any], gm: fx.GraphModule) -> Iterator[dict[str, Any]]:
    if isinstance(p, Var):
        if p.name in b:
            if _same(b[p.name], v):
                yield b
        else:
            yield {**b, p.name: v}
        return
    if not isinstance(p, _Call):  # a constant in the pattern
        if _same(p, v):
            yield b
        return
    if not isinstance(v, fx.Node) or not p.node_ok(v, gm) or len(v.args) < len(p.args):
        return
    if p.name in b:
        if b[p.name] is v:
            yield b
        return
    b = {**b, p.name: v}
    orders = [p.args] + ([p.args[::-1]] if p.commutative else [])
    for pargs in orders:
        yield from _bind_seq(pargs, v.args[:len(pargs)], b, gm)


def _bind_seq(pats: Sequence, vals: Sequence, b, gm) -> Iterator[dict[str, Any]]:
    if not pats:
        yield b
        return
    for b2 in _bind(pats[0], vals[0], b, gm):
        yield from _bind_seq(pats[1:], vals[1:], b2, gm)


def _structurally_ok(m: Match) -> bool:
    inside = set(m.nodes.values())
    for node in inside:
        if node is m.root:
            continue
        if node.op in ("placeholder", "output") or node.is_impure():
            return False
        if not m.rule.allow_external_users and any(u not in inside for u in node.users):
            return False
    return True


def find_match(rule: Rule, anchor: fx.Node, gm: fx.GraphModule,
               reasons: list[str] | None = None, context: Any = None) -> Match | None:
    """The first binding of ``rule`` rooted at ``anchor`` that passes the checks, or None."""
    for b in _bind(rule.root, anchor, {}, gm):
        m = Match(rule, gm, anchor, b, rule.call_names, context)
        if not _structurally_ok(m):
            continue
        if rule.check is None or rule.check(m):
            return m
        if reasons is not None:
            reasons.extend(r for r in m.reasons if r not in reasons)
    return None


# -- rewriting --------------------------------------------------------------------------------
def _erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` (reverse order) when unused, then inputs they leave unused."""
    work = list(reversed(nodes))
    while work:
        node = work.pop(0)
        if getattr(node, "_erased", False) or node.users or node.op in ("placeholder", "output"):
            continue
        if node.is_impure():
            continue
        inputs = [a for a in node.all_input_nodes]
        graph.erase_node(node)
        work.extend(inputs)


def _rewrite(m: Match, gm: fx.GraphModule, result: RewriteResult) -> fx.Node:
    b = Builder(gm, m)
    matched = m.matched
    with gm.graph.inserting_before(m.root):
        new = m.rule.replace(m, b)
    if not isinstance(new, fx.Node):
        raise TypeError(f"rule '{m.rule.name}': replace must return an fx.Node, got {type(new).__name__}")
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
    _erase_dead(gm.graph, matched)
    result.counts[m.rule.name] = result.counts.get(m.rule.name, 0) + 1
    result.rewrites.append((m.rule.name, [n.name for n in matched], new.name))
    for text in b.notes:
        result.note(text)
    for key, n in b.tallies.items():
        result.tallies[key] = result.tallies.get(key, 0) + n
    return new


def apply_rules(gm: fx.GraphModule, rules: Sequence[Rule], *, max_sweeps: int = 8,
                context: Any = None,
                skip: Callable[[fx.Node], bool] | None = None) -> RewriteResult:
    """Rewrite ``gm`` in place with ``rules`` until none matches; see the module docstring.

    ``context`` is handed to every match (``m.context``); ``skip(node)`` leaves anchors alone
    (a node whose value depends on when it is read, say)."""
    result = RewriteResult()
    for sweep in range(max_sweeps):
        result.sweeps = sweep + 1
        changed = False
        for anchor in list(gm.graph.nodes):
            if getattr(anchor, "_erased", False) or anchor.op in ("placeholder", "output", "get_attr"):
                continue
            if skip is not None and skip(anchor):
                continue
            reasons: list[str] = []
            for rule in rules:
                m = find_match(rule, anchor, gm, reasons, context)
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
