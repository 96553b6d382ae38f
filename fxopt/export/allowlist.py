"""What a ``.fxopt`` file may call: the allowlist of call targets, by qualified name.

A saved graph names each ``call_function`` target by a qualified name (``torch.relu``,
``torch.ops.fxopt.conv2d_act.default``, ``operator.add``); loading resolves the name here and
nowhere else. The allowlist is built from the running torch, never by importing a name from the
file: ``torch.*`` tensor ops, ``torch.nn.functional.*``, ``torch.ops`` overloads of the aten,
fxopt, quantized, onednn, prims and quantized_decomposed namespaces, public Tensor methods (and
their operator dunders), ``operator.*``, ``math.*`` and a few builtins, less a deny list of
functions with effects beyond their result (file I/O, global defaults, seeds).

``function_name`` names a callable (writing), ``allowed_function`` resolves a name (reading),
``tensor_method_allowed`` says whether a ``call_method`` may name a method, and
``public_name`` whether an attribute name is public.
"""
from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["function_name", "allowed_function", "tensor_method_allowed", "public_name"]

_OP_NAMESPACES = ("aten", "fxopt", "quantized", "onednn", "prims", "quantized_decomposed")
_DENY = {"from_file", "load", "save", "set_default_device", "set_default_dtype",
         "set_default_tensor_type", "set_printoptions", "set_num_threads", "manual_seed", "seed",
         "use_deterministic_algorithms", "set_flush_denormal"}
_OPERATOR_DENY = {"attrgetter", "itemgetter", "methodcaller", "call"}
_BUILTINS = ("getattr", "len", "int", "float", "bool", "abs", "min", "max", "range", "slice",
             "tuple", "list", "round", "divmod", "pow", "sum", "all", "any")
_DUNDERS = {f"__{n}__" for n in (
    "add radd iadd sub rsub isub mul rmul imul truediv rtruediv itruediv floordiv rfloordiv "
    "ifloordiv mod rmod pow rpow matmul rmatmul and rand iand or ror ior xor rxor ixor lshift "
    "rshift neg pos abs invert eq ne lt le gt ge getitem setitem len contains").split()}
_TORCH_EXTRA = ("_assert", "sym_int", "sym_float", "sym_max", "sym_min", "sym_not")

_ALLOWED: dict[str, Any] | None = None
_NAMES: dict[int, str] | None = None


def public_name(name: str) -> bool:
    return not name.startswith("_")


def tensor_method_allowed(name: str) -> bool:
    return (public_name(name) or name in _DUNDERS) and callable(getattr(torch.Tensor, name, None))


def _build_allowlist() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dir(torch._C._VariableFunctions):
        obj = getattr(torch, name, None)
        if not name.startswith("__") and name not in _DENY and callable(obj):
            out[f"torch.{name}"] = obj
    for name in (*torch.functional.__all__, *_TORCH_EXTRA):
        if hasattr(torch, name):
            out[f"torch.{name}"] = getattr(torch, name)
    for name in dir(torch._C._nn):
        obj = getattr(torch._C._nn, name)
        if public_name(name) and callable(obj):
            out[f"torch._C._nn.{name}"] = obj
    for name in dir(F):
        obj = getattr(F, name)
        if public_name(name) and (getattr(obj, "__module__", None) == F.__name__
                              or type(obj).__name__ == "builtin_function_or_method"):
            out[f"torch.nn.functional.{name}"] = obj
    for name in dir(torch.Tensor):
        if tensor_method_allowed(name):
            out[f"torch.Tensor.{name}"] = getattr(torch.Tensor, name)
    for name in dir(operator):
        if public_name(name) and name not in _OPERATOR_DENY:
            out[f"operator.{name}"] = getattr(operator, name)
    for name in dir(math):
        if public_name(name) and callable(getattr(math, name)):
            out[f"math.{name}"] = getattr(math, name)
    for name in _BUILTINS:
        out[f"builtins.{name}"] = getattr(builtins, name)
    from torch.fx import _symbolic_trace  # what concrete_args=None inserts: an assertion
    out["torch.fx._symbolic_trace._assert_is_none"] = _symbolic_trace._assert_is_none
    return out


def _allowlist() -> tuple[dict[str, Any], dict[int, str]]:
    global _ALLOWED, _NAMES
    if _ALLOWED is None:
        from fxopt import ops  # noqa: F401 - the torch.ops.fxopt namespace
        allowed = _build_allowlist()
        names: dict[int, str] = {}
        for name, obj in allowed.items():  # the first (shortest-lived) name wins: torch.* first
            names.setdefault(id(obj), name)
        _ALLOWED, _NAMES = allowed, names
    return _ALLOWED, _NAMES


def _op_name(target) -> str | None:
    """``torch.ops.<ns>.<op>[.<overload>]`` for an op of an allowed namespace, else None."""
    if isinstance(target, torch._ops.OpOverload):
        ns, rest = target.name().split("::", 1)
        op, _, overload = rest.partition(".")
        name = f"torch.ops.{ns}.{op}.{overload or 'default'}"
    elif isinstance(target, torch._ops.OpOverloadPacket):
        ns, op = target._qualified_op_name.split("::", 1)
        name = f"torch.ops.{ns}.{op}"
    else:
        return None
    return name if ns in _OP_NAMESPACES and op not in _DENY else None


def _resolve_op(name: str):
    parts = name.split(".")
    if len(parts) not in (4, 5) or parts[2] not in _OP_NAMESPACES or not all(
            p.isidentifier() and not p.startswith("__") for p in parts[3:]):
        return None
    if parts[3] in _DENY:
        return None
    try:
        obj = getattr(getattr(torch.ops, parts[2]), parts[3])
        if len(parts) == 5:
            obj = getattr(obj, parts[4])
    except (AttributeError, RuntimeError):
        return None
    kind = torch._ops.OpOverload if len(parts) == 5 else torch._ops.OpOverloadPacket
    return obj if isinstance(obj, kind) else None


def function_name(target) -> str | None:
    """The allowlisted qualified name of a call_function target, or None."""
    name = _op_name(target)
    if name is not None:
        return name
    return _allowlist()[1].get(id(target))


def allowed_function(name: str):
    """The callable an allowlisted qualified name stands for, or None (never imports)."""
    if not isinstance(name, str):
        return None
    if name.startswith("torch.ops."):
        return _resolve_op(name)
    return _allowlist()[0].get(name)
