"""The pattern language of the rewrite engine: what a rule matches, written as plain Python.

A pattern is built by calling pattern factories on pattern values. A rule's pattern function
takes wildcards (``Var``) for its parameters; ``call``, ``method``, ``module`` and ``op`` make
factories that match one kind of node and bind it under a name; torch functions and ``+``/``*``
applied to pattern values build call patterns too (``__torch_function__``)::

    conv = module("conv", nn.Conv2d)                   # a call of an nn.Conv2d, bound as "conv"
    act = call("act", F.relu, torch.sigmoid)           # a call_function of either, as "act"
    flat = method("flat", "flatten")                   # x.flatten(...), as "flat"
    view = op("view", torch.reshape, "view", "reshape")  # any of the three kinds, as "view"

    def pattern(x):                                    # "x" matches any value
        return act(conv(x))                            # F.relu(conv(x)) or sigmoid(conv(x))

    [b["act"].name for b in bindings(pattern(Var("x")), node, gm)]   # -> ['relu'] at a relu

Matching (``bindings``) is structural and deterministic: a call pattern matches a node of its
kind and target whose leading positional arguments match the pattern's arguments (the rest,
and the kwargs, are for the rule's ``check`` to read); a ``Var`` binds any value, the same
value wherever it appears; a constant in the pattern matches an equal constant of the same
type. Commutative ``+``/``*`` try the written operand order first, then the swapped one.

The rules, the engine that applies them and the builder of replacements are in
``fxopt.infra.rewrite``, which re-exports every name here.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, Iterator, Sequence

import torch.fx as fx
import torch.nn as nn

from fxopt.ir.graph import get_attr_value

__all__ = [
    "Pattern", "Var", "CallPattern", "FnCall", "MethodCall", "ModuleCall", "OpCall",
    "call", "method", "module", "op", "walk", "bindings",
]

_COMMUTATIVE = {operator.add, operator.mul}


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


class CallPattern(Pattern):
    """A pattern for one call node, bound under ``name``; subclasses say which nodes qualify."""

    def __init__(self, name: str, targets: tuple, args: tuple):
        self.name, self.targets, self.args = name, targets, tuple(args)

    def node_ok(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        raise NotImplementedError

    @property
    def commutative(self) -> bool:
        return len(self.args) == 2 and all(t in _COMMUTATIVE for t in self.targets)

    def __repr__(self):
        return f"{self.name}({', '.join(map(repr, self.args))})"


def _module_type_in(node: fx.Node, gm: fx.GraphModule, types: tuple) -> bool:
    try:
        mod = get_attr_value(gm, node.target)
    except AttributeError:
        return False
    # Exact types: a subclass may override forward (a leaf the user marked, say).
    return type(mod) in types


class FnCall(CallPattern):
    """A ``call_function`` of one of ``targets``."""

    def node_ok(self, node, gm):
        return node.op == "call_function" and node.target in self.targets


class ModuleCall(CallPattern):
    """A ``call_module`` of a module of exactly one of the types ``targets``."""

    def node_ok(self, node, gm):
        return node.op == "call_module" and _module_type_in(node, gm, self.targets)


class MethodCall(CallPattern):
    """A ``call_method`` of one of the Tensor method names ``targets``."""

    def node_ok(self, node, gm):
        return node.op == "call_method" and node.target in self.targets


def _is_module_type(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, nn.Module)


class OpCall(CallPattern):
    """A call of any of ``targets``, each by its kind: a method name (str), a module type, or
    a function or op overload. One op in its three spellings is one pattern:
    ``torch.reshape(x, s)``, ``x.reshape(s)`` and ``x.view(s)``."""

    def __init__(self, name: str, targets: tuple, args: tuple):
        super().__init__(name, targets, args)
        self.methods = tuple(t for t in targets if isinstance(t, str))
        self.module_types = tuple(t for t in targets if _is_module_type(t))
        self.functions = tuple(t for t in targets if not isinstance(t, str)
                               and not _is_module_type(t))

    def node_ok(self, node, gm):
        if node.op == "call_function":
            return node.target in self.functions
        if node.op == "call_method":
            return node.target in self.methods
        if node.op == "call_module":
            return bool(self.module_types) and _module_type_in(node, gm, self.module_types)
        return False


class module:
    """``module("conv", nn.Conv1d, nn.Conv2d)(x)``: a call of a module of exactly these types."""

    def __init__(self, name: str, *types: type):
        if not types or not all(_is_module_type(t) for t in types):
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


class op:
    """``op("mul", operator.mul, torch.mul, "mul")(x)``: a call of any of these, whatever its
    kind: functions and op overloads (call_function), Tensor method names (call_method) and
    nn.Module subclasses (call_module, exact type), mixed freely."""

    def __init__(self, name: str, *targets: Any):
        if not targets:
            raise TypeError("op(name, *targets): give at least one target")
        if any(isinstance(t, type) and not _is_module_type(t) for t in targets):
            raise TypeError("op(name, *targets): a class target must be an nn.Module subclass")
        self.name, self.targets = name, targets

    def __call__(self, *args) -> OpCall:
        return OpCall(self.name, self.targets, args)


def walk(p: Pattern) -> Iterator[Pattern]:
    """``p`` and every pattern inside it, outermost first."""
    yield p
    if isinstance(p, CallPattern):
        for a in p.args:
            if isinstance(a, Pattern):
                yield from walk(a)


# -- matching -----------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - tensors and other odd constants compare by identity
        return a is b


def bindings(p: Any, v: Any, gm: fx.GraphModule,
             bound: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every way pattern ``p`` matches value ``v`` (a node, or a constant), as name -> value
    (call patterns bind their node, ``Var`` its value), in the deterministic order of the
    module docstring. ``bound`` holds names already bound (they must bind the same again)."""
    b = {} if bound is None else bound
    if isinstance(p, Var):
        if p.name in b:
            if _same(b[p.name], v):
                yield b
        else:
            yield {**b, p.name: v}
        return
    if not isinstance(p, CallPattern):  # a constant in the pattern
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


def _bind_seq(pats: Sequence, vals: Sequence, b: dict[str, Any],
              gm: fx.GraphModule) -> Iterator[dict[str, Any]]:
    if not pats:
        yield b
        return
    for b2 in bindings(pats[0], vals[0], gm, b):
        yield from _bind_seq(pats[1:], vals[1:], b2, gm)
