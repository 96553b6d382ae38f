"""Small helpers over ``torch.fx`` graphs that every pass and check shares.

Conventions (DESIGN.md section 3):
- ``node.meta["tensor_meta"]``: shape, dtype, stride of a tensor-valued node.
- ``node.meta["fxopt_path"]``: the user's module path the node came from (``layer3.1.conv2``).
- ``node.meta["fxopt_from"]``: names of the original nodes a rewritten node stands for; the
  last name is the node whose value this node reproduces (the checks compare against it).

    >>> new = graph.call_function(torch.relu, (x,))
    >>> copy_meta(new, old)            # path, provenance and tensor_meta carry over
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

__all__ = [
    "module_path",
    "copy_meta",
    "set_provenance",
    "tensor_meta",
    "get_attr_value",
    "used_attribute_paths",
    "remove_unused_attributes",
    "count_nodes",
    "count_params",
    "count_bytes",
    "add_buffer",
    "tensor_meta_of",
    "is_shape_read",
    "permutation_of",
    "SHAPE_ATTRIBUTES",
]

# Attributes of a tensor that say nothing about its values: a reader of only these sees the same
# thing from any tensor of the same shape, dtype and device (``_assert(x.ndim == 4)``).
SHAPE_ATTRIBUTES = frozenset({"ndim", "shape", "dtype", "device", "is_cuda", "layout"})
_AS_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})  # the shape of their argument
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "get_device", "is_floating_point",
                            "is_complex", "numel"})


def module_path(node: fx.Node) -> str:
    """The user's module path a node came from ("" for the model's own forward)."""
    return node.meta.get("fxopt_path", "")


def tensor_meta(node: Any):
    """The node's ``TensorMetadata`` (shape, dtype, stride, ...) or None."""
    if isinstance(node, fx.Node):
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tm
    return None


def is_shape_read(user: fx.Node, tensor: fx.Node) -> bool:
    """True when ``user`` reads only the shape, rank, dtype or device of ``tensor``
    (``getattr(x, "ndim")``, ``x.shape``, ``x.size(1)``, ``x.dim()``, ``y.reshape_as(x)``),
    never its values: it reads the same from any tensor with the same ``tensor_meta``."""
    if user.op == "call_function" and user.target is getattr and len(user.args) == 2:
        return user.args[0] is tensor and user.args[1] in SHAPE_ATTRIBUTES
    if user.op == "call_method" and user.target in _SHAPE_METHODS and user.args:
        rest = list(user.args[1:]) + list(user.kwargs.values())
        return user.args[0] is tensor and not any(isinstance(a, fx.Node) for a in rest)
    if user.op == "call_method" and user.target in _AS_METHODS and len(user.args) == 2:
        return user.args[1] is tensor and user.args[0] is not tensor  # y.reshape_as(tensor)
    return False


def permutation_of(node: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """``(x, p)`` when ``node`` is ``x.permute(p)`` (``torch.permute(x, p)``, ``x.permute(*p)``),
    a transpose or ``t()`` of a tensor ``x`` with ``tensor_meta``; ``p`` holds each output dim's
    input dim, in ``0..ndim-1``. None for anything else (keyword arguments included)."""
    if not node.args or not isinstance(node.args[0], fx.Node) or node.kwargs \
            or tensor_meta(node.args[0]) is None:
        return None
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and node.target in (torch.permute, torch.transpose, torch.t):
        name = node.target.__name__
    else:
        return None
    x, rest = node.args[0], node.args[1:]
    nd = len(tensor_meta(x).shape)

    def is_int(a) -> bool:
        return isinstance(a, int) and not isinstance(a, bool)

    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if len(dims) != nd or not all(is_int(d) for d in dims):
            return None
        perm = [d % nd for d in dims]
        return (x, perm) if sorted(perm) == list(range(nd)) else None
    if name in ("transpose", "t"):
        if name == "t":
            if nd > 2 or rest:
                return None
            a, b = (0, 1) if nd == 2 else (0, 0)
        elif len(rest) == 2 and all(is_int(d) for d in rest) and nd > 0:
            a, b = rest[0] % nd, rest[1] % nd
        else:
            return None
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
        return x, perm
    return None


def tensor_meta_of(value: torch.Tensor):
    """The ``TensorMetadata`` of a tensor value, as shape propagation records it (the one
    place fxopt calls torch.fx's private helper)."""
    return _extract_tensor_metadata(value)


def copy_meta(new: fx.Node, old: fx.Node, *, with_tensor_meta: bool = True) -> fx.Node:
    """Give ``new`` the path, provenance (and tensor_meta) of ``old``, which it replaces."""
    for key in ("fxopt_path", "nn_module_stack", "stack_trace"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    new.meta["fxopt_from"] = list(old.meta.get("fxopt_from", [old.name]))
    if with_tensor_meta and "tensor_meta" in old.meta:
        new.meta["tensor_meta"] = old.meta["tensor_meta"]
    return new


def set_provenance(new: fx.Node, olds: Iterable[fx.Node]) -> fx.Node:
    """Record that ``new`` stands for ``olds`` (in order; the last one's value is reproduced)."""
    names: list[str] = []
    for o in olds:
        for n in o.meta.get("fxopt_from", [o.name]):
            if n not in names:
                names.append(n)
    olds = list(olds)
    new.meta["fxopt_from"] = names
    if olds and "fxopt_path" in olds[-1].meta:
        new.meta.setdefault("fxopt_path", olds[-1].meta["fxopt_path"])
    return new


def get_attr_value(gm: torch.nn.Module, target: str):
    """Resolve a dotted attribute path on ``gm``; raises AttributeError when it is missing."""
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def used_attribute_paths(gm: fx.GraphModule) -> tuple[set[str], set[str]]:
    """(get_attr targets, call_module targets) that the graph uses."""
    attrs, mods = set(), set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            attrs.add(n.target)
        elif n.op == "call_module":
            mods.add(n.target)
    return attrs, mods


def _covered(name: str, attrs: set[str], mods: set[str]) -> bool:
    if name in attrs:
        return True
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in mods or prefix in attrs:
            return True
    return False


def unused_tensors(gm: fx.GraphModule) -> list[str]:
    """Qualified names of parameters and buffers that no node reads."""
    attrs, mods = used_attribute_paths(gm)
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    return [n for n in names if not _covered(n, attrs, mods)]


def remove_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters, buffers and submodules that no node uses; returns how many tensors went.

    Memory really drops: nothing keeps a reference to the deleted tensors.
    """
    removed = 0
    for name in unused_tensors(gm):
        owner_path, _, leaf = name.rpartition(".")
        owner = get_attr_value(gm, owner_path) if owner_path else gm
        if leaf in owner._parameters:
            del owner._parameters[leaf]
            removed += 1
        elif leaf in owner._buffers:
            del owner._buffers[leaf]
            removed += 1
    gm.delete_all_unused_submodules()
    # Plain tensor attributes set with setattr (not registered) that nothing reads.
    attrs, _ = used_attribute_paths(gm)
    for key in [k for k, v in vars(gm).items() if isinstance(v, torch.Tensor)]:
        if key not in attrs:
            delattr(gm, key)
            removed += 1
    return removed


def add_buffer(gm: fx.GraphModule, prefix: str, value: torch.Tensor) -> str:
    """Register ``value`` as a new buffer on ``gm`` under a fresh name; returns the name."""
    i = 0
    while hasattr(gm, f"{prefix}{i}"):
        i += 1
    name = f"{prefix}{i}"
    gm.register_buffer(name, value)
    return name


def count_nodes(gm: fx.GraphModule) -> int:
    """Nodes that compute something: calls of functions, methods and modules.

    Placeholders, the output and ``get_attr`` reads are not counted: a fused op reads its
    weights through ``get_attr`` where the module it replaced held them, and that is no extra
    work.
    """
    return sum(1 for n in gm.graph.nodes if n.op.startswith("call_"))


def packed_weights(module: torch.nn.Module):
    """The weight and bias tensors inside PyTorch's prepacked quantized parameters
    (``torch.ops.quantized.conv2d_prepack`` / ``linear_prepack`` results held as attributes,
    which ``parameters()`` and ``buffers()`` do not list)."""
    for m in module.modules():
        for value in vars(m).values():
            if not isinstance(value, torch.ScriptObject):
                continue
            try:
                kind = value._type().qualified_name()
            except Exception:  # noqa: BLE001 - any other script object
                continue
            if "Conv" in kind and "PackedParams" in kind:
                w, b = torch.ops.quantized.conv2d_unpack(value)
            elif "LinearPackedParams" in kind:
                w, b = torch.ops.quantized.linear_unpack(value)
            else:
                continue
            yield w.int_repr() if w.is_quantized else w
            if b is not None:
                yield b


def _unique_tensors(module: torch.nn.Module):
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()) + list(packed_weights(module)):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def count_params(module: torch.nn.Module) -> int:
    """Weight elements held by the model: parameters and floating-point buffers.

    Buffers count because passes turn parameters into buffers (constant folding, fused weights);
    integer bookkeeping buffers (``num_batches_tracked``) do not.
    """
    total = 0
    for t in _unique_tensors(module):
        if isinstance(t, torch.nn.Parameter) or t.is_floating_point() or t.dtype == torch.int8:
            total += t.numel()
    return total


def count_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (what saving the model costs, roughly)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(module))
