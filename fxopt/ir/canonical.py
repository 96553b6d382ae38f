"""Canonical forms, so that passes match one pattern per computation.

After capture every activation is one ``call_function`` of its canonical function (the table
``fxopt.ir.activations``) with all its parameters as keyword arguments
(``F.leaky_relu(x, negative_slope=0.1)``), whichever way the user wrote it (``nn.LeakyReLU``
module, ``F.leaky_relu``, ``x.relu()``, in place or not);
``torch.add``/``x.add``/``+=`` become ``operator.add`` (likewise sub and mul); clamps become
``torch.clamp(x, min=, max=)``; flattens become ``torch.flatten(x, start_dim=, end_dim=)``
(a ``view``/``reshape`` that is a flatten included); other views become ``torch.reshape``.
A tensor's rank read in the graph (``x.ndim``, ``x.dim()``: timm's
``_assert(x.ndim == 4)`` after every conv) becomes the constant from its ``tensor_meta``: the
rank of every tensor is fixed once the input's is (only the batch size may vary), and a
rank read left on a conv's output would be a second user that keeps it from folding and fusing.

In-place forms are made out-of-place; uses of the mutated tensor after the in-place op are
redirected to its result, which is what the in-place op meant. So are the later uses of every
other name for the same tensor: ops that may hand back their input itself (eval-mode
``Dropout``, ``Identity``, ``.contiguous()`` of a contiguous tensor, a ``.to()`` that changes
nothing, ``.detach()``) are followed both ways (``_same_tensor``). An in-place op on a view
whose base (or another view of it) is used again is left alone (changing it would lose the
write through the view); so is one that writes into an input or a weight.

    >>> activation_of(node)      # ("leaky_relu", {"negative_slope": 0.1}) or None
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.ir.activations import CAPTURE_FORMS
from fxopt.ir.graph import copy_meta, get_attr_value, tensor_meta

__all__ = ["canonicalize", "activation_of", "is_size_of"]

# Capture's view of the activation table: spelling -> (canonical name, writes in place?).
_CANONICAL_FN = {row.canonical: name for name, row in CAPTURE_FORMS.items()}
_ACT_MODULES = {cls: name for name, row in CAPTURE_FORMS.items() for cls in row.modules}
_ACT_FUNCTIONS = {fn: (name, ip) for name, row in CAPTURE_FORMS.items()
                  for fn, ip in row.functions.items()}
_ACT_METHODS = {m: (name, ip) for name, row in CAPTURE_FORMS.items()
                for m, ip in row.methods.items()}

_BINARY_FUNCTIONS = {torch.add: ("add", False), torch.sub: ("sub", False),
                     torch.mul: ("mul", False), operator.iadd: ("add", True),
                     operator.isub: ("sub", True), operator.imul: ("mul", True)}
_BINARY_METHODS = {"add": ("add", False), "add_": ("add", True), "sub": ("sub", False),
                   "sub_": ("sub", True), "mul": ("mul", False), "mul_": ("mul", True)}
_BINARY_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}

_CLAMP_FUNCTIONS = {torch.clamp: ("clamp", False), torch.clip: ("clamp", False),
                    torch.clamp_min: ("min", False), torch.clamp_max: ("max", False),
                    torch.clamp_: ("clamp", True)}
_CLAMP_METHODS = {"clamp": ("clamp", False), "clip": ("clamp", False),
                  "clamp_": ("clamp", True), "clip_": ("clamp", True),
                  "clamp_min": ("min", False), "clamp_max": ("max", False),
                  "clamp_min_": ("min", True), "clamp_max_": ("max", True)}

_VIEW_OPS = {"view", "reshape", "transpose", "permute", "flatten", "squeeze", "unsqueeze",
             "expand", "narrow", "select", "t", "unflatten", "view_as"}


def activation_of(node: Any) -> tuple[str, dict[str, Any]] | None:
    """(name, params) when ``node`` is a canonical activation call, else None."""
    if isinstance(node, fx.Node) and node.op == "call_function":
        name = _CANONICAL_FN.get(node.target)
        if name is not None:
            return name, dict(node.kwargs)
    return None


def is_size_of(node: Any, tensor: fx.Node, dim: int) -> bool:
    """True when ``node`` computes ``tensor.size(dim)`` (or ``tensor.shape[dim]``)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size" and node.args[0] is tensor:
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return d == dim
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == dim:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.args and src.args[0] is tensor:
            shape = src.op == "call_function" and src.target is getattr and src.args[1] == "shape"
            size = src.op == "call_method" and src.target == "size" and len(src.args) == 1
            return shape or size
    return False


def _bind(args: tuple, kwargs: dict, names: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    bound = dict(defaults)
    for name, value in zip(names, args):
        bound[name] = value
    for k, v in kwargs.items():
        if k in names or k in defaults:
            bound[k] = v
    return bound


def _act_params(name: str, args: tuple, kwargs: dict) -> tuple[dict[str, Any], bool]:
    defaults = CAPTURE_FORMS[name].defaults
    names = list(defaults) + ["inplace"]
    bound = _bind(args, kwargs, names, {**defaults, "inplace": False})
    inplace = bool(bound.pop("inplace"))
    return bound, inplace


def _module_act(mod: nn.Module) -> tuple[str, dict[str, Any], bool] | None:
    name = _ACT_MODULES.get(type(mod))  # exact types: a subclass may compute something else
    if name is None:
        return None
    params = {k: getattr(mod, k) for k in CAPTURE_FORMS[name].defaults}
    return name, params, bool(getattr(mod, "inplace", False))


class _Rewriter:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.count = 0

    def replace(self, old: fx.Node, target, args, kwargs, *, mutated: fx.Node | None) -> None:
        if mutated is not None and not self._safe_to_functionalize(old, mutated):
            return
        with self.graph.inserting_after(old):
            new = self.graph.call_function(target, args, kwargs)
        copy_meta(new, old)
        old.replace_all_uses_with(new)
        if mutated is not None:
            # Later readers of the mutated tensor, under any of its names, meant the new value.
            pos = self.order[old]
            for name in _same_tensor(mutated):
                for user in list(name.users):
                    if user is not new and self.order.get(user, -1) > pos:
                        user.replace_input_with(name, new)
        self.order[new] = self.order[old]
        name = old.name
        self.graph.erase_node(old)
        new._rename(name)  # keep the user's node names readable and stable across rewrites
        self.count += 1

    def _safe_to_functionalize(self, node: fx.Node, mutated: fx.Node) -> bool:
        names = _same_tensor(mutated)
        if any(n.op in ("placeholder", "get_attr") for n in names):
            # Mutating an input or a weight in place is a side effect the caller may see.
            return False
        # Writing into a tensor also writes into every view of it and into its base: if any
        # alias other than a name of the tensor itself is read after this op, an out-of-place
        # rewrite would lose that write.
        pos = self.order[node]
        for alias in _aliases(mutated):
            if alias not in names and any(self.order.get(u, -1) > pos for u in alias.users):
                return False
        return True


_VIEW_FUNCTIONS = {torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.narrow, torch.select, torch.t, torch.chunk, torch.split,
                   torch.unbind, torch.movedim, operator.getitem}


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_OPS or node.target in ("chunk", "split", "unbind", "expand_as")
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


_MAY_RETURN_INPUT_METHODS = {"contiguous", "to", "type", "float", "double", "half", "bfloat16",
                              "detach", "type_as", "cpu", "cuda"}
_MAY_RETURN_INPUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                             nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)
_MAY_RETURN_INPUT_FUNCTIONS = {torch.nn.functional.dropout, torch.nn.functional.dropout1d,
                               torch.nn.functional.dropout2d, torch.nn.functional.dropout3d,
                               torch.nn.functional.alpha_dropout, torch.detach}


def _returns_input(node: fx.Node, *, certain: bool = False) -> bool:
    """True when ``node`` may hand back its first argument itself (or a same-shape alias of
    it): in eval mode ``Dropout`` and ``Identity`` do, ``.contiguous()`` of a contiguous tensor
    and a ``.to()`` that changes nothing do, ``.detach()`` shares the storage. ``certain``: a
    conversion only counts when the recorded metadata shows it changed nothing (same shape,
    dtype and strides, no device argument)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        if node.target not in _MAY_RETURN_INPUT_METHODS:
            return False
        if not certain or node.target == "detach":
            return True
        if node.target in ("cpu", "cuda") or any(
                isinstance(a, (str, torch.device, fx.Node))
                for a in (*node.args[1:], *node.kwargs.values())):
            return False
        a, b = tensor_meta(node.args[0]), tensor_meta(node)
        return a is not None and b is not None and (tuple(a.shape), a.dtype, tuple(a.stride)) \
            == (tuple(b.shape), b.dtype, tuple(b.stride))
    if node.op == "call_function":
        if node.target not in _MAY_RETURN_INPUT_FUNCTIONS:
            return False
        if not certain or node.target is torch.detach:
            return True
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return training is False
    if node.op == "call_module":
        owner = node.graph.owning_module
        try:
            mod = owner.get_submodule(node.target) if owner is not None else None
        except AttributeError:
            return False
        return isinstance(mod, _MAY_RETURN_INPUT_MODULES) and not (certain and mod.training
                                                                   and type(mod) is not nn.Identity)
    return False


def _linked(node: fx.Node, follows) -> list[fx.Node]:
    """``node``'s source (followed up ``args[0]`` while ``follows`` holds) and every node reached
    from it down through users that ``follows`` and read it as ``args[0]``."""
    base = node
    while follows(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    out, todo = [], [base]
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.append(n)
        todo.extend(u for u in n.users if follows(u) and u.args and u.args[0] is n)
    return out


def _same_tensor(node: fx.Node) -> list[fx.Node]:
    """``node`` and every other node that may be the same tensor object (``_returns_input``,
    followed to the source and to the users)."""
    return _linked(node, lambda n: _returns_input(n, certain=True))


def _aliases(node: fx.Node) -> list[fx.Node]:
    """Nodes that may share storage with ``node``: its view (or same-tensor) ancestors and their
    view (or same-tensor) descendants."""
    return _linked(node, lambda n: _is_view(n) or _returns_input(n))


def canonicalize(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` into canonical forms in place; returns how many nodes were rewritten."""
    rw = _Rewriter(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            mod = get_attr_value(gm, node.target)
            act = _module_act(mod)
            if act is not None and len(node.args) == 1 and not node.kwargs:
                name, params, inplace = act
                rw.replace(node, CAPTURE_FORMS[name].canonical, (node.args[0],), params,
                           mutated=node.args[0] if inplace else None)
            elif type(mod) is nn.Flatten and len(node.args) == 1:
                _flatten(rw, node, node.args[0], mod.start_dim, mod.end_dim)
        elif node.op in ("call_function", "call_method"):
            _canonicalize_call(rw, node)
    gm.graph.lint()
    gm.recompile()
    return rw.count


def _rank_read(node: fx.Node) -> int | None:
    """The rank ``x.ndim`` / ``x.dim()`` / ``x.ndimension()`` reads, from ``x``'s tensor_meta."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] == "ndim" and not node.kwargs:
        tm = tensor_meta(node.args[0])
    elif node.op == "call_method" and node.target in ("dim", "ndimension") \
            and len(node.args) == 1 and not node.kwargs:
        tm = tensor_meta(node.args[0])
    else:
        return None
    return None if tm is None else len(tm.shape)


def _canonicalize_call(rw: _Rewriter, node: fx.Node) -> None:
    t = node.target
    is_fn = node.op == "call_function"
    rank = _rank_read(node)
    if rank is not None:
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: rank if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: rank if a is node else a)
        rw.graph.erase_node(node)
        rw.count += 1
        return
    act = _ACT_FUNCTIONS.get(t) if is_fn else _ACT_METHODS.get(t)
    if act is not None and node.args:
        name, inplace_form = act
        params, inplace_kw = _act_params(name, node.args[1:], node.kwargs)
        x = node.args[0]
        canonical = CAPTURE_FORMS[name].canonical
        if t is not canonical or inplace_kw or inplace_form or dict(node.kwargs) != params:
            rw.replace(node, canonical, (x,), params,
                       mutated=x if (inplace_kw or inplace_form) else None)
        return
    binary = _BINARY_FUNCTIONS.get(t) if is_fn else _BINARY_METHODS.get(t)
    if binary is not None and len(node.args) == 2:
        name, inplace = binary
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1 or set(node.kwargs) - {"alpha"}:
            return
        a, b = node.args
        if not isinstance(a, fx.Node) or tensor_meta(a) is None:
            return  # ints from size() and friends: leave them
        rw.replace(node, _BINARY_OPS[name], (a, b), {}, mutated=a if inplace else None)
        return
    clamp = _CLAMP_FUNCTIONS.get(t) if is_fn else _CLAMP_METHODS.get(t)
    if clamp is not None and node.args:
        kind, inplace = clamp
        x = node.args[0]
        rest = list(node.args[1:])
        if kind == "clamp":
            lo = rest[0] if rest else node.kwargs.get("min")
            hi = rest[1] if len(rest) > 1 else node.kwargs.get("max")
        elif kind == "min":
            lo, hi = (rest[0] if rest else node.kwargs.get("min")), None
        else:
            lo, hi = None, (rest[0] if rest else node.kwargs.get("max"))
        if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            return
        if t is torch.clamp and not inplace and dict(node.kwargs) == {"min": lo, "max": hi}:
            return
        rw.replace(node, torch.clamp, (x,), {"min": lo, "max": hi}, mutated=x if inplace else None)
        return
    if (is_fn and t is torch.flatten) or (not is_fn and t == "flatten"):
        x = node.args[0]
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if is_fn and dict(node.kwargs) == {"start_dim": start, "end_dim": end} \
                and len(node.args) == 1:
            return
        _flatten(rw, node, x, start, end)
        return
    if (not is_fn and t in ("view", "reshape")) or (is_fn and t is torch.reshape):
        x = node.args[0]
        if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            shape = tuple(node.args[1])
        elif len(node.args) == 2 and isinstance(node.args[1], fx.Node) \
                and node.args[1].meta.get("fxopt_nontensor") != "int":
            return  # x.reshape(y.shape): the argument is the whole shape (a torch.Size)
        elif not is_fn:
            shape = tuple(node.args[1:])
        else:
            return
        if node.kwargs or any(isinstance(s, torch.dtype) for s in shape):
            return  # view(dtype) is a bit cast, not a reshape
        start = _flatten_equivalent(x, shape, node)
        if start is not None:
            _flatten(rw, node, x, start, -1)
        elif not (is_fn and t is torch.reshape and isinstance(node.args[1], tuple)):
            rw.replace(node, torch.reshape, (x, shape), {}, mutated=None)


def _flatten(rw: _Rewriter, node: fx.Node, x, start: int, end: int) -> None:
    tm = tensor_meta(x)
    if tm is not None:
        nd = len(tm.shape)
        start = start + nd if start < 0 else start
        end = end + nd if end < 0 else end
    rw.replace(node, torch.flatten, (x,), {"start_dim": start, "end_dim": end}, mutated=None)


def _flatten_equivalent(x, shape: tuple, node: fx.Node) -> int | None:
    """``k`` when ``x.view(shape)`` is ``torch.flatten(x, k)`` for every batch size."""
    tin, tout = tensor_meta(x), tensor_meta(node)
    if tin is None or tout is None or len(shape) < 1:
        return None
    k = len(shape) - 1
    if len(tin.shape) <= k or shape[-1] != -1 and shape[-1] != tout.shape[-1]:
        return None
    if list(tout.shape) != list(tin.shape[:k]) + [int(torch.tensor(tin.shape[k:]).prod())]:
        return None
    for i, s in enumerate(shape[:-1]):
        if is_size_of(s, x, i):
            continue
        if i > 0 and isinstance(s, int) and s == tin.shape[i]:
            continue
        return None
    return k
