"""The same-grid roles: float calls that keep an int8 value int8, one row per role.

A row (:class:`SameGridRole`) says how the float call is recognised, the int8 IR op it becomes
and its arguments, whether that op takes the grid (``on_grid``) or writes a grid of its own
(``own_grid``, observed at calibration), and whether the simulation runs the op on the codes
(``exact_on_codes``). The planner (``fxopt.quant.plan``) gives a call the role of the first row
that matches it when its input is int8; the rewrite (``passes/quant/rewrite.py``) and the
simulation (``fxopt.quant.simulate``) read the row. A new same-grid int8 op is a row here.

    >>> pass_kind(gm, node)          # "maxpool", "avgpool", "flatten", "move", ... or None
    >>> SAME_GRID["avgpool"].own_grid
    True
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.activations import ACTIVATIONS
from fxopt.ops.int8 import (ACTIVATION_INT8, AVG_POOL2D_INT8, AVGPOOL_INT8, MAXPOOL_INT8,
                            UPSAMPLE_NEAREST2D_INT8)
from fxopt.ops.schema import OpSchema

__all__ = ["SameGridRole", "SAME_GRID", "same_grid_role", "pass_kind", "called_module", "calls",
           "is_4d", "maxpool_args", "avg_pool2d_args", "upsample_nearest_args",
           "OWN_GRID_ACTIVATION", "activation_args"]


# -- ops that keep a value int8: one row per role ---------------------------------------------
@dataclass(frozen=True)
class SameGridRole:
    """A float op that maps an int8 value onto its own grid, and the int8 IR op it becomes.

    ``match(gm, n)`` recognises the float call (its first argument is the value); ``args(gm,
    n)`` gives the int8 op's arguments other than the codes ``q`` (and the grid, when
    ``on_grid``: ``scale``, ``zp``, ``qmin``, ``qmax``, for an op that rounds or names its
    grid). ``op=None`` re-issues the same call on the codes (reshapes); ``passthrough`` hands
    the codes on (``nn.Identity``). ``exact_on_codes``: the simulation runs the op's reference
    on the codes, as the int8 op computes it (an average whose float form would round
    differently), rather than the float op. ``own_grid``: the output is requantized onto a
    grid of its own, observed at calibration (the op takes it as ``y_scale`` / ``y_zp``), not
    its input's. ``count`` names the rewrite's counter (a new name is a new counter). The
    rewrite (``passes/quant/rewrite.py``) and the simulation (``fxopt.quant.simulate``) read
    the row; a new same-grid int8 op is a row here."""

    name: str
    match: Callable[[fx.GraphModule, fx.Node], bool]
    op: OpSchema | None = None
    args: Callable[[fx.GraphModule, fx.Node], dict] = lambda gm, n: {}
    on_grid: bool = False
    exact_on_codes: bool = False
    passthrough: bool = False
    own_grid: bool = False
    count: str = "pool"


SAME_GRID: dict[str, SameGridRole] = {}


def same_grid_role(name: str, match, **kw) -> SameGridRole:
    """Registers a :class:`SameGridRole` (a name is declared once)."""
    if name in SAME_GRID:
        raise ValueError(f"same-grid role {name!r} is declared twice")
    SAME_GRID[name] = row = SameGridRole(name, match, **kw)
    return row


def called_module(gm: fx.GraphModule, n: fx.Node, cls) -> nn.Module | None:
    """The ``cls`` module a one-argument ``call_module`` node calls, else None."""
    if n.op != "call_module" or len(n.args) != 1:
        return None
    m = gm.get_submodule(n.target)
    return m if isinstance(m, cls) else None


def calls(n: fx.Node, *targets) -> bool:
    """Whether ``n`` calls one of the functions ``targets``."""
    return n.op == "call_function" and n.target in targets


def _pair(v) -> list:
    return list(v) * (2 // len(v)) if isinstance(v, (tuple, list)) else [v, v]


def _named(n: fx.Node, names: tuple, defaults: dict) -> dict:
    """A builtin functional's arguments by name (``F.max_pool2d`` and ``F.avg_pool2d`` are
    declared ``(*args, **kwargs)``: name their parameters here)."""
    a = dict(defaults)
    a.update(zip(names, n.args))
    a.update(n.kwargs)
    return a


def maxpool_args(gm: fx.GraphModule, n: fx.Node) -> dict:
    """``max_pool2d_int8``'s arguments of an ``nn.MaxPool2d`` or ``F.max_pool2d`` call (sizes
    as pairs; the stride defaults to the kernel)."""
    m = called_module(gm, n, nn.MaxPool2d)
    if m is not None:
        a = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                 dilation=m.dilation, ceil_mode=m.ceil_mode)
    else:
        a = _named(n, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                   {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False})
    k = _pair(a["kernel_size"])
    s = k if a["stride"] in (None, [], ()) else _pair(a["stride"])
    return dict(kernel_size=k, stride=s, padding=_pair(a["padding"]),
                dilation=_pair(a["dilation"]), ceil_mode=bool(a["ceil_mode"]))


def avg_pool2d_args(gm: fx.GraphModule, n: fx.Node) -> dict:
    """``avg_pool2d_int8``'s arguments of an ``nn.AvgPool2d`` or ``F.avg_pool2d`` call, and its
    ``divisor_override`` (sizes as pairs; the stride defaults to the kernel)."""
    m = called_module(gm, n, nn.AvgPool2d)
    if m is not None:
        a = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                 ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                 divisor_override=m.divisor_override)
    else:
        a = _named(n, ("input", "kernel_size", "stride", "padding", "ceil_mode",
                       "count_include_pad", "divisor_override"),
                   dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                        divisor_override=None))
    k = _pair(a["kernel_size"])
    s = k if a["stride"] in (None, [], ()) else _pair(a["stride"])
    return dict(kernel_size=k, stride=s, padding=_pair(a["padding"]),
                ceil_mode=bool(a["ceil_mode"]), count_include_pad=bool(a["count_include_pad"]),
                divisor_override=a["divisor_override"])


def _adaptive_size(gm: fx.GraphModule, n: fx.Node) -> dict:
    m = called_module(gm, n, nn.AdaptiveAvgPool2d)
    if m is not None:
        size = m.output_size
    else:
        size = n.args[1] if len(n.args) > 1 else n.kwargs["output_size"]
    if isinstance(size, int):
        size = (size, size)
    tm = n.meta.get("tensor_meta")
    return {"output_size": [int(s) if s is not None else int(tm.shape[-2 + i])
                            for i, s in enumerate(size)]}


same_grid_role(
    "maxpool",
    lambda gm, n: ((m := called_module(gm, n, nn.MaxPool2d)) is not None and not m.return_indices)
    or (calls(n, F.max_pool2d) and not n.kwargs.get("return_indices", False)),
    op=MAXPOOL_INT8, args=maxpool_args)
same_grid_role(
    # adaptive (the global pool before a classifier): requantized onto its own observed grid.
    # Every adaptive pool, not only 1x1: its windows average many values (a DenseNet's or
    # ResNet's 7x7 plane), and the observer fits the pooled distribution, never worse than the
    # input's grid for it; windowed 2x2 pooling (avg_pool2d) keeps its input's range
    "avgpool",
    lambda gm, n: called_module(gm, n, nn.AdaptiveAvgPool2d) is not None
    or calls(n, F.adaptive_avg_pool2d),
    op=AVGPOOL_INT8, args=_adaptive_size, on_grid=True, own_grid=True)
same_grid_role(
    # a divisor_override is not an average: it stays float
    "avg_pool2d",
    lambda gm, n: (called_module(gm, n, nn.AvgPool2d) is not None or calls(n, F.avg_pool2d))
    and avg_pool2d_args(gm, n)["divisor_override"] is None,
    op=AVG_POOL2D_INT8, on_grid=True, exact_on_codes=True,
    args=lambda gm, n: {k: v for k, v in avg_pool2d_args(gm, n).items()
                        if k != "divisor_override"})


def _interpolate_args(gm: fx.GraphModule, n: fx.Node) -> dict | None:
    """``F.interpolate``'s arguments of an ``nn.Upsample`` call (``nn.UpsamplingNearest2d``
    too) or an ``F.interpolate`` one, else None."""
    m = called_module(gm, n, nn.Upsample)
    if m is not None:
        return dict(size=m.size, scale_factor=m.scale_factor, mode=m.mode,
                    align_corners=m.align_corners,
                    recompute_scale_factor=m.recompute_scale_factor)
    if not calls(n, F.interpolate):
        return None
    return _named(n, ("input", "size", "scale_factor", "mode", "align_corners",
                      "recompute_scale_factor", "antialias"),
                  dict(size=None, scale_factor=None, mode="nearest", align_corners=None,
                       recompute_scale_factor=None, antialias=False))


def is_4d(n: fx.Node) -> bool:
    """Whether ``n``'s value is 4-D (from its ``tensor_meta``)."""
    return len(getattr(n.meta.get("tensor_meta"), "shape", ())) == 4


def _upsample_nearest(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A 2-D nearest-neighbour interpolation with a size or a scale factor. A recomputed scale
    factor (``recompute_scale_factor=True``: the size is derived, then the scale dropped) stays
    float."""
    a = _interpolate_args(gm, n)
    return a is not None and a["mode"] == "nearest" and not a["recompute_scale_factor"] \
        and (a["size"] is None) != (a["scale_factor"] is None) and is_4d(n.args[0])


def upsample_nearest_args(gm: fx.GraphModule, n: fx.Node) -> dict:
    """``upsample_nearest2d_int8``'s ``output_size`` and ``scale_factors`` (one of them None)
    of an ``nn.Upsample`` or ``F.interpolate`` call; a size may be a value of the graph
    (``x.shape[-2:]``, FPN's)."""
    a = _interpolate_args(gm, n)
    size, factor = a["size"], a["scale_factor"]
    if isinstance(size, int):
        size = [size, size]
    elif isinstance(size, (tuple, list)):
        size = list(size)
    if factor is not None:
        factor = [float(f) for f in _pair(factor)]
    return dict(output_size=size, scale_factors=factor)


same_grid_role("upsample_nearest2d", _upsample_nearest, op=UPSAMPLE_NEAREST2D_INT8,
               args=upsample_nearest_args, on_grid=True, count="upsample")
same_grid_role("identity", lambda gm, n: called_module(gm, n, nn.Identity) is not None,
               passthrough=True, count="")
same_grid_role(
    "flatten",
    lambda gm, n: called_module(gm, n, nn.Flatten) is not None
    or calls(n, torch.flatten, torch.reshape)
    or (n.op == "call_method" and n.target in ("flatten", "reshape", "view")),
    count="")

# An activation call marked by the pass that split it off its layer
# (``passes/quant/split_act.py``, target="onnxruntime": the engine's int8 kernels fuse no such
# activation): its output is requantized onto a grid of its own, so what reads it (a gate's
# product, the next layer) reads int8, as ONNX Runtime's QLinearSigmoid / QLinearMul do.
OWN_GRID_ACTIVATION = "fxopt_own_grid_activation"  # node.meta key
_BY_CANONICAL = {r.canonical: r for r in ACTIVATIONS.values() if r.canonical is not None}


def activation_args(gm: fx.GraphModule, n: fx.Node) -> dict:
    """``activation_int8``'s ``act`` and ``act_args`` for a canonical activation call."""
    row = _BY_CANONICAL[n.target]
    values = {**row.defaults, **dict(zip(row.params, n.args[1:])), **n.kwargs}
    return dict(act=row.name, act_args=[float(values[k]) for k in row.params])


same_grid_role(
    "activation",
    lambda gm, n: bool(n.meta.get(OWN_GRID_ACTIVATION)) and n.op == "call_function"
    and n.target in _BY_CANONICAL,
    op=ACTIVATION_INT8, args=activation_args, on_grid=True, own_grid=True, count="activation")

# Calls that move values without changing them (the same call on the codes keeps the grid):
# ShuffleNet's channel shuffle (view, transpose, contiguous, view) and its chunk into two
# branches. A split's tuple is int8 only when every reader takes one piece (``operator.getitem``);
# ``fxopt.export.qdq_state.CODE_MOVES`` is the exporter's table of the same calls.
_MOVES = (torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, operator.getitem)
_MOVE_METHODS = ("contiguous", "transpose", "permute", "squeeze", "unsqueeze")
_SPLITS = (torch.chunk, torch.split, torch.unbind)
_SPLIT_METHODS = ("chunk", "split", "unbind")


def _moves_values(gm: fx.GraphModule, n: fx.Node) -> bool:
    if calls(n, *_MOVES) or (n.op == "call_method" and n.target in _MOVE_METHODS):
        return True
    split = calls(n, *_SPLITS) or (n.op == "call_method" and n.target in _SPLIT_METHODS)
    return split and bool(n.users) and all(calls(u, operator.getitem) for u in n.users)


same_grid_role("move", _moves_values, count="")


def pass_kind(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """The :data:`SAME_GRID` role of ``n`` (``"maxpool"``, ``"avgpool"`` (adaptive),
    ``"avg_pool2d"``, ``"identity"``, ``"flatten"``, ``"move"``, ...): ``n`` maps its first
    argument onto the same grid (max pooling, reshapes and moves exactly; average pooling with
    one rounding); None otherwise."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return None
    return next((r.name for r in SAME_GRID.values() if r.match(gm, n)), None)
