"""What ``lower_to_triton`` says about a graph it lowered: the compute ops still on PyTorch, and
the kernel inputs that are not channels-last (each a layout copy per call).

The convolution and pooling kernels write NHWC, so after a good lowering only the graph's
entry converts; anything else is a copy worth knowing about:

    >>> left_on_pytorch(gm)          # views and shape queries are not counted
    Counter({'MaxPool2d': 1, 'adaptive_avg_pool2d': 1})
    >>> layout_copies(gm)            # the user's names of the kernels that convert an input
    []

``op_name`` and ``user_name`` are how the pass's notes name an op and where it came from.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from fxopt.ir.graph import module_path, tensor_meta
from fxopt.ops.schema import OpSchema, schema_of
from fxopt.ops.triton import TRITON_CONV2D, TRITON_DEPTHWISE_CONV2D
from fxopt.ops.triton_int8 import (TRITON_CONV2D_INT8, TRITON_DEPTHWISE_CONV2D_INT8,
                                   TRITON_GLOBAL_AVG_POOL2D_INT8, TRITON_MAX_POOL2D_INT8)

__all__ = ["layout_copies", "left_on_pytorch", "op_name", "user_name"]

_CONV_KERNELS = (TRITON_CONV2D, TRITON_DEPTHWISE_CONV2D, TRITON_CONV2D_INT8,
                 TRITON_DEPTHWISE_CONV2D_INT8)
_NHWC_KERNELS = _CONV_KERNELS + (TRITON_MAX_POOL2D_INT8, TRITON_GLOBAL_AVG_POOL2D_INT8)
# Ops that move no data (views, shape queries) are not worth naming as "left on PyTorch".
_FREE = {"flatten", "reshape", "view", "getitem", "size", "dim", "unsqueeze", "squeeze",
         "getattr", "contiguous", "to", "type_as", "detach"}


def user_name(n: fx.Node) -> str:
    """The user's name for ``n``: its module path, else the first node it stands for."""
    return module_path(n) or next(iter(n.meta.get("fxopt_from", [])), n.name)


def op_name(n: fx.Node) -> str:
    """What ``n`` calls: a module's type, a method's or an op's name (``conv2d_act``)."""
    t = n.target
    if n.op == "call_module":
        return type(n.graph.owning_module.get_submodule(t)).__name__
    if n.op == "call_method":
        return str(t)
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0] if isinstance(t, torch._ops.OpOverload) else name


def _kernel_of(node) -> OpSchema | None:
    is_call = isinstance(node, fx.Node) and node.op == "call_function"
    return schema_of(node.target) if is_call else None


def _channels_last(node) -> bool:
    """Whether ``node``'s recorded output is NHWC memory (or not 4-D: nothing to convert)."""
    tm = tensor_meta(node)
    if tm is None or len(tm.shape) != 4:
        return True
    t = torch.empty_strided(tuple(tm.shape), tuple(tm.stride), device="meta")
    return t.is_contiguous(memory_format=torch.channels_last)


def layout_copies(gm: fx.GraphModule) -> list[str]:
    """Kernel inputs that are not NHWC (the op converts them on entry: a copy per call)."""
    out = []
    for n in gm.graph.nodes:
        kernel = _kernel_of(n)
        if kernel not in _CONV_KERNELS:
            continue
        v = kernel.view.of(n)
        # Besides the inputs, only the float convolution's residual is counted, as the pass
        # always has (so that the stat compares across versions; the other kernels convert a
        # residual on entry too).
        for src in (v.x, v.residual if kernel is TRITON_CONV2D else None):
            if isinstance(src, fx.Node) and _kernel_of(src) not in _NHWC_KERNELS \
                    and not _channels_last(src):
                out.append(user_name(n))
    return out


def left_on_pytorch(gm: fx.GraphModule) -> Counter:
    """Compute ops still on PyTorch, by op name (views and shape queries not counted)."""
    left: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        if n.op == "call_function" and getattr(schema_of(n.target), "family", None) == "triton":
            continue
        name = op_name(n)
        if name not in _FREE:
            left[name] += 1
    return left
