"""Purity and mutation facts that the cleanup passes share.

A cleanup pass may delete, merge, evaluate or bypass a node only when that cannot be seen from
outside the graph. Three questions decide it:

- ``has_side_effects(node)``: deleting the node, even when nothing reads it, would change the
  program (in-place writes, random draws that advance the RNG, ops torch calls impure);
- ``is_pure(node)``: the node is a deterministic function of its arguments, so two equal calls
  give equal values (CSE) and a call on constants can be evaluated once (constant folding);
- ``MutationInfo(graph).touches(node)``: the node's value, or one of its inputs, lives in the
  same storage as a tensor something writes into in place. Such a value differs depending on
  *when* it is read, so it is never merged, folded or bypassed.

    >>> info = MutationInfo(gm.graph)
    >>> [n.name for n in gm.graph.nodes if is_pure(n) and not info.touches(n)]

Captured graphs are canonical (in-place activations and arithmetic are made out-of-place), so
in-place ops are rare; the analysis is conservative where it has to guess: any op that may
return a view of an input (views, ``getitem``, ``to``, ``contiguous``, unknown modules) joins
that input's alias class. Leaf modules written by the user are assumed not to write into their
inputs (the same assumption ``torch.fx``'s own dead code elimination makes).
"""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.graph import get_attr_value

__all__ = [
    "target_name",
    "is_inplace",
    "is_random",
    "has_side_effects",
    "is_pure",
    "is_pure_module",
    "literal_flag",
    "training_flag",
    "DROPOUT_FUNCTIONS",
    "MutationInfo",
    "may_alias_input",
    "erase_dead",
    "node_inputs",
]

# Python operators that write into their first argument.
_INPLACE_OPERATORS = {
    operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
    operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
}
_INPLACE_DUNDERS = {"__setitem__", "__delitem__", "__iadd__", "__isub__", "__imul__",
                    "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__",
                    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}

# Ops whose value is a random draw (or uninitialised memory): never merged, never folded, and
# (being RNG-state side effects, as torch.fx treats them) never deleted by DCE. Dropout-like
# ops are random only in training mode; see _TRAINING_FLAG.
_RANDOM_NAMES = {
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
    "bernoulli", "normal", "poisson", "multinomial", "uniform", "exponential", "geometric",
    "cauchy", "log_normal", "random", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "gumbel_softmax", "native_dropout",
}
# Dropout-like functions -> (position of the training flag, its keyword, its default).
# F.alpha_dropout and F.feature_alpha_dropout default to training=False; F.dropout does not.
_TRAINING_FLAG: dict[Any, tuple[int, str, Any]] = {
    F.dropout: (2, "training", True), F.dropout1d: (2, "training", True),
    F.dropout2d: (2, "training", True), F.dropout3d: (2, "training", True),
    F.alpha_dropout: (2, "training", False), F.feature_alpha_dropout: (2, "training", False),
    F.rrelu: (3, "training", False),
    torch.dropout: (2, "train", None), torch.alpha_dropout: (2, "train", None),
    torch.feature_dropout: (2, "train", None), torch.feature_alpha_dropout: (2, "train", None),
}
# The dropout functions proper (identity when not training); rrelu and stochastic_depth are
# random in training too, but are not dropout.
DROPOUT_FUNCTIONS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout})
# Dropout-like functions with an inplace= parameter -> its position.
_INPLACE_FLAG = {F.dropout: 3, F.dropout1d: 3, F.dropout2d: 3, F.dropout3d: 3,
                 F.alpha_dropout: 3, F.feature_alpha_dropout: 3, F.rrelu: 4}
try:  # torchvision is optional
    from torchvision.ops import StochasticDepth as _StochasticDepth
    from torchvision.ops import stochastic_depth as _stochastic_depth

    _TRAINING_FLAG[_stochastic_depth] = (3, "training", True)
except ImportError:  # pragma: no cover - exercised only without torchvision
    _stochastic_depth = None
    _StochasticDepth = None

# Ops that may return (a view of) their first tensor argument rather than fresh memory.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute",
    "t", "T", "mT", "H", "mH", "squeeze", "unsqueeze", "expand", "expand_as", "narrow",
    "select", "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "movedim",
    "moveaxis", "swapaxes", "swapdims", "diagonal", "as_strided", "unfold", "detach", "to",
    "type", "type_as", "contiguous", "float", "double", "half", "bfloat16", "int", "long",
    "short", "bool", "byte", "char", "cpu", "cuda", "real", "imag", "view_as_real",
    "__getitem__", "data", "align_to", "rename", "refine_names", "coalesce",
}
_VIEW_FUNCTIONS = {
    operator.getitem, getattr, torch.reshape, torch.flatten, torch.unflatten, torch.transpose,
    torch.permute, torch.t, torch.squeeze, torch.unsqueeze, torch.narrow, torch.select,
    torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.movedim, torch.moveaxis,
    torch.swapaxes, torch.swapdims, torch.diagonal, torch.as_strided, torch.detach,
    torch.view_as_real, torch.view_as_complex, torch.real, torch.imag, torch.broadcast_to,
    torch.broadcast_tensors, torch.atleast_1d, torch.atleast_2d, torch.atleast_3d,
    torch.hsplit, torch.vsplit, torch.dsplit, torch.split_with_sizes,
    torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.contiguous, torch.Tensor.to,
}
# Module types that hand back their input itself (or a view of it).
_VIEW_MODULES: tuple[type, ...] = (nn.Identity, nn.Flatten, nn.Unflatten,
                                   nn.modules.dropout._DropoutNd)
if _StochasticDepth is not None:
    _VIEW_MODULES = _VIEW_MODULES + (_StochasticDepth,)

# torch.nn modules that are not pure functions of their input even in eval mode, or that the
# passes should treat whole (recurrent state, dropout).
_IMPURE_MODULES: tuple[type, ...] = (nn.modules.dropout._DropoutNd, nn.RNNBase, nn.RNNCellBase)


def target_name(node: fx.Node) -> str:
    """The bare name of what a call node calls (``"relu_"``, ``"add"``, ``"conv"`` ...)."""
    t = node.target
    if isinstance(t, str):
        return t.rpartition(".")[2]
    if isinstance(t, torch._ops.OpOverload):
        return t._opname  # aten.add_.Tensor -> "add_"
    return getattr(t, "__name__", "") or ""


def node_inputs(node: fx.Node) -> list[fx.Node]:
    """Distinct input nodes of ``node`` in argument order."""
    return list(dict.fromkeys(node.all_input_nodes))


def literal_flag(node: fx.Node, position: int, keyword: str, default: Any) -> Any:
    """The literal value of a call's argument (``None`` if unknown or a node)."""
    if len(node.args) > position:
        value = node.args[position]
    else:
        value = node.kwargs.get(keyword, default)
    return None if isinstance(value, fx.Node) else value


def _module(node: fx.Node) -> nn.Module | None:
    gm = node.graph.owning_module
    if gm is None or node.op != "call_module":
        return None
    try:
        return get_attr_value(gm, node.target)
    except AttributeError:
        return None


def is_inplace(node: fx.Node) -> bool:
    """True when the node writes into one of its arguments (``x.add_(y)``, ``x[i] = v`` ...)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.op == "call_module":
        mod = _module(node)
        if isinstance(mod, nn.modules.dropout._DropoutNd) and not mod.training:
            return False  # Dropout(inplace=True) in eval hands back its input untouched
        return bool(getattr(mod, "inplace", False))
    if node.op == "call_function" and node.target in _TRAINING_FLAG:
        if training_flag(node) is False:
            return False  # likewise F.dropout(x, p, training=False, inplace=True)
        pos = _INPLACE_FLAG.get(node.target)
        return pos is not None and literal_flag(node, pos, "inplace", False) is not False
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return True
    if isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        op = node.target if isinstance(node.target, torch._ops.OpOverload) else \
            getattr(node.target, "default", None)
        schema = getattr(op, "_schema", None)
        if schema is not None:  # aten.add_.Tensor: the schema says what it writes
            return schema.is_mutable
    name = target_name(node)
    if name in _INPLACE_DUNDERS:
        return True
    # torch convention: a trailing underscore means in place (relu_, add_, copy_, zero_),
    # but dunders (__add__) are not.
    return name.endswith("_") and not name.endswith("__")


def training_flag(node: fx.Node) -> Any:
    """The literal training flag of a dropout-like call; None when it is not one or unknown."""
    spec = _TRAINING_FLAG.get(node.target) if node.op == "call_function" else None
    if spec is None:
        return None
    return literal_flag(node, *spec)


def is_random(node: fx.Node) -> bool:
    """True when the node draws random numbers (or reads uninitialised memory)."""
    if node.op == "call_module":
        mod = _module(node)
        if isinstance(mod, (nn.modules.dropout._DropoutNd, nn.RReLU)) or (
                _StochasticDepth is not None and isinstance(mod, _StochasticDepth)):
            return mod.training
        return False
    if node.op not in ("call_function", "call_method"):
        return False
    if node.op == "call_function" and node.target in _TRAINING_FLAG:
        # A dropout in eval mode is the identity; training=True (or unknown) is a draw.
        return training_flag(node) is not False
    name = target_name(node).rstrip("_")
    if name in _RANDOM_NAMES or getattr(node.target, "_nondeterministic_seeded", False):
        return True
    return "dropout" in name  # dropout variants not in the table: assume training


def has_side_effects(node: fx.Node) -> bool:
    """True when deleting the node would change the program even if nothing reads its value."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "get_attr":
        return False
    if is_inplace(node) or is_random(node):
        return True
    try:
        return node.is_impure()
    except Exception:  # noqa: BLE001 - unresolvable targets: keep the node
        return True


def is_pure_module(mod: nn.Module) -> bool:
    """A torch.nn module (and everything inside it) that is a function of its input in eval."""
    for m in mod.modules():
        cls = type(m)
        if not cls.__module__.startswith("torch.nn."):
            return False  # user code: may hold state or mutate
        if isinstance(m, _IMPURE_MODULES) or m.training or getattr(m, "inplace", False):
            return False
        if getattr(m, "_is_impure", False):
            return False
    return True


def is_pure(node: fx.Node) -> bool:
    """True when the node is a deterministic, side-effect-free function of its arguments."""
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if has_side_effects(node):
        return False
    if node.op == "call_module":
        mod = _module(node)
        return mod is not None and is_pure_module(mod)
    return True


def may_alias_input(node: fx.Node) -> bool:
    """True when the node may return (a view of) one of its inputs rather than fresh memory."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS or node.target in _TRAINING_FLAG
    if node.op == "call_module":
        mod = _module(node)
        if mod is None or isinstance(mod, _VIEW_MODULES):
            return True
        # torch.nn layers compute fresh outputs; user modules may hand back their input.
        return not type(mod).__module__.startswith("torch.nn.")
    return False


class MutationInfo:
    """Which nodes share storage with a tensor that the graph writes into in place.

    Alias classes are built with union-find over "may return a view of its input" edges; every
    member of the class of a mutated tensor is *tainted*.
    """

    def __init__(self, graph: fx.Graph):
        self._parent: dict[fx.Node, fx.Node] = {}
        mutated: list[fx.Node] = []
        for node in graph.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            if may_alias_input(node) or is_inplace(node):
                for inp in node.all_input_nodes:
                    self._union(node, inp)
            if is_inplace(node):
                mutated.extend(self._written(node))
        roots = {self._find(m) for m in mutated}
        self.tainted: set[fx.Node] = {n for n in graph.nodes if self._find(n) in roots} \
            if roots else set()

    @staticmethod
    def _written(node: fx.Node) -> list[fx.Node]:
        out = node.kwargs.get("out")
        written = [a for a in (out if isinstance(out, (tuple, list)) else [out])
                   if isinstance(a, fx.Node)]
        if node.args and isinstance(node.args[0], fx.Node):
            written.append(node.args[0])
        return written

    def _find(self, n: fx.Node) -> fx.Node:
        parent = self._parent
        root = n
        while parent.get(root, root) is not root:
            root = parent[root]
        while parent.get(n, n) is not root:  # path compression
            parent[n], n = root, parent[n]
        return root

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra is not rb:
            self._parent[ra] = rb

    def is_tainted(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.tainted

    def touches(self, node: fx.Node) -> bool:
        """The node's value or one of its inputs may be written in place somewhere."""
        tainted = self.tainted
        return bool(tainted) and (node in tainted
                                  or any(i in tainted for i in node.all_input_nodes))


def erase_dead(graph: fx.Graph, candidates: Iterable[fx.Node]) -> int:
    """Erase candidates (and, transitively, their inputs) that nothing reads and that are pure.

    Returns how many nodes went. Used after a rewrite bypasses a node, so that the values only
    it read (``x.size(0)`` in a reshape spec, the inner reshape of a chain) go in the same pass.
    """
    erased = 0
    stack = list(candidates)
    gone: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in gone or node.users or has_side_effects(node):
            continue
        gone.add(node)
        inputs = node_inputs(node)
        graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased
