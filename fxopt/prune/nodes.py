"""Reading ``fx`` nodes for the channel rules: shapes, arguments by position or name, names.

The rules see a node as torch.fx records it: positional ``args`` where the user wrote them
positionally, ``kwargs`` otherwise. ``arg`` reads one argument either way and ``arg_path`` says
where it sits, which is what a ``Rewrite`` needs to change it later::

    >>> # y = torch.cat([a, b], dim=1)  ->  node.args == ([a, b],), node.kwargs == {"dim": 1}
    >>> arg(node, 1, "dim", 0), arg_path(node, 1, "dim")
    (1, ('dim',))
    >>> describe(node), op_name(node, gm)
    ("'cat'", 'torch.cat')

fxopt's own ops are read through their schema views (``fxopt.ops``), never through these.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx

from fxopt.ir.graph import get_attr_value, module_path, tensor_meta

__all__ = ["shape_of", "ndim_of", "normalize_dim", "arg", "arg_path", "tensor_inputs",
           "describe", "op_name", "segment_of"]


def shape_of(node: Any) -> tuple | None:
    """The node's tensor shape (None for non-tensor values and tuples)."""
    tm = tensor_meta(node)
    return tuple(tm.shape) if tm is not None else None


def ndim_of(node: Any) -> int:
    s = shape_of(node)
    return len(s) if s is not None else 0


def normalize_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def arg(node: fx.Node, pos: int, name: str, default=None):
    """The argument at position ``pos`` if given positionally, else keyword ``name``."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def arg_path(node: fx.Node, pos: int, name: str) -> tuple:
    """Where ``arg(node, pos, name)`` sits: ``(pos,)`` in ``args`` or ``(name,)`` in kwargs."""
    return (pos,) if len(node.args) > pos else (name,)


def tensor_inputs(args) -> list[fx.Node]:
    """Every node in a (nested) argument structure, in order."""
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def describe(node: fx.Node) -> str:
    """How a reason names a node: its name and the user's module path (``'add_3' (layer2.1)``)."""
    path = module_path(node)
    return f"'{node.name}'" + (f" ({path})" if path else "")


def op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """What a node calls, as users spell it: ``Conv2d``, ``Tensor.roll``, ``F.pad``."""
    if node.op == "call_module":
        return type(get_attr_value(gm, node.target)).__name__
    t = node.target
    if isinstance(t, str):
        return f"Tensor.{t}"
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", str(t))
    return f"{mod.replace('torch._C._nn', 'F').replace('torch.nn.functional', 'F')}.{name}" \
        if mod else name


def segment_of(a: Sequence[int], b: Sequence[int], dim: int):
    """The dims ``(i0, i1), (o0, o1)`` of a reshape from shape ``a`` to ``b`` that hold ``a[dim]``.

    Walks both shapes with running products, the way a reshape factors into independent
    segments (``[N, C, H, W] -> [N, C*H*W]``: ``[N]->[N]`` and ``[C, H, W]->[C*H*W]``).
    """
    i = j = 0
    while i < len(a):
        si, sj = i, j
        if j >= len(b):
            return None
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                j += 1
            else:
                return None
        if si <= dim < i:
            return (si, i), (sj, j)
    return None
