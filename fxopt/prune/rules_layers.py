"""Channel rules for layers: conv, linear and the norms, as modules and as functional calls.

A conv or linear layer is where channels are born: its output gets fresh slots (a new space),
its weight is indexed by them along dim 0 and by its input's slots along dim 1, and its MACs are
recorded. A grouped or depthwise conv unites inputs and outputs group by group (a whole group
goes or stays). BatchNorm, InstanceNorm and PReLU scale each channel: their tensors shrink with
the input's slots. A LayerNorm over the channels (channels-last) shrinks too and is renormalized
over the kept channels in the reference; a GroupNorm unites the channels of each of its groups.

    >>> # y = conv(x): x has slots [0..3] on dim 1; conv has 8 output channels
    >>> conv_module(walk, node)   # y: Layout(1, [4..11]); conv.weight: {0: [4..11], 1: [0..3]}

Rows: ``nn.modules.conv._ConvNd``, ``F.conv1d/2d/3d``, ``nn.Linear``, ``F.linear``,
``_BatchNorm``/``_InstanceNorm``, ``F.batch_norm``, ``nn.LayerNorm``, ``F.layer_norm``,
``nn.GroupNorm``, ``F.group_norm``, ``nn.Embedding``, ``nn.PReLU``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.graph import module_path
from fxopt.prune.nodes import arg, arg_path, describe, ndim_of
from fxopt.prune.records import Layout, Rewrite
from fxopt.prune.rule_table import register_channel_rule
from fxopt.prune.walk import ChannelWalk, Unsupported

__all__ = ["conv", "linear", "per_channel", "layer_norm", "group_norm", "param_target",
           "conv_module", "conv_functional", "linear_module", "linear_functional",
           "batch_norm_module", "batch_norm_functional", "layer_norm_module",
           "layer_norm_functional", "group_norm_module", "group_norm_functional",
           "embedding_module", "prelu_module"]


def param_target(n: fx.Node, pos: int, name: str) -> str | None:
    """The attribute path of a functional call's weight argument (None when not given)."""
    a = arg(n, pos, name)
    if a is None:
        return None
    if not isinstance(a, fx.Node) or a.op != "get_attr" or len(a.users) != 1:
        raise Unsupported(f"its {name} is computed, or shared with another op")
    return a.target


# -- the layer logic, shared by the module and functional forms ---------------------------------
def conv(walk: ChannelWalk, n, x, cin, cout, groups, transposed, wpath, bpath, owner) -> None:
    vin = walk.channel_vector(n, x, 1, cin)
    out = walk.fresh(n, cout, "conv", owner)
    if transposed:
        if groups != 1:
            raise Unsupported("grouped transposed convolution")
        walk.param(wpath, 0, vin, "weight", owner)
        walk.param(wpath, 1, out, "weight", owner)
    else:
        walk.param(wpath, 0, out, "weight", owner)
        if groups == 1:
            walk.param(wpath, 1, vin, "weight", owner)
        else:
            a, b = cin // groups, cout // groups
            for j in range(groups):
                blk = np.concatenate([vin[j * a:(j + 1) * a], out[j * b:(j + 1) * b]])
                if (vin[j * a:(j + 1) * a] < 0).any():
                    walk.freeze_slots(blk, f"grouped conv {describe(n)} reads a model input")
                walk.unite_all(blk)
            walk.event("depthwise" if a == 1 and b == 1 else "grouped", n,
                       np.concatenate([vin, out]))
    if bpath is not None:
        walk.param(bpath, 0, out, "bias", owner)
    walk.set(n, Layout(1, out))
    walk.record_layer(n, out, vin if groups == 1 else None)


def linear(walk: ChannelWalk, n, x, fin, fout, wpath, bpath, owner) -> None:
    nd = ndim_of(n)
    lay = walk.layout(x)
    if not lay.free and lay.pdim != nd - 1:
        walk.freeze(lay, f"{describe(n)} is applied along another dim")
        vin = np.full(fin, -1, dtype=np.int64)
    else:
        vin = walk.channel_vector(n, x, nd - 1, fin)
    out = walk.fresh(n, fout, "linear", owner)
    walk.param(wpath, 0, out, "weight", owner)
    walk.param(wpath, 1, vin, "weight", owner)
    if bpath is not None:
        walk.param(bpath, 0, out, "bias", owner)
    walk.set(n, Layout(nd - 1, out))
    walk.record_layer(n, out, vin)


def per_channel(walk: ChannelWalk, n, x, dim: int, paths: Sequence[str], owner: str) -> None:
    """BatchNorm-like: parameters indexed by the channels along ``dim``."""
    lay = walk.layout(x)
    if not lay.free and lay.pdim == dim:
        for p in paths:
            role = "stat" if p.endswith(("running_mean", "running_var")) else (
                "bn_weight" if p.endswith("weight") else "bias")
            walk.param(p, 0, lay.vec, role, owner)
    walk.set(n, lay)


def layer_norm(walk: ChannelWalk, n, x, normalized_shape, w, b, pos) -> None:
    lay = walk.layout(x)
    nd = ndim_of(n)
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if lay.free or lay.pdim < nd - len(ns):
        walk.set(n, lay)  # normalizes over dims that keep their size
        return
    if len(ns) != 1:
        walk.freeze(lay, f"LayerNorm {describe(n)} normalizes over channels and more")
        walk.set(n, lay)
        return
    owner = module_path(n) or n.name
    for p, role in ((w, "norm_weight"), (b, "bias")):
        if p is not None:
            walk.param(p, 0, lay.vec, role, owner)
    walk.norm_over_channels(n, nd - 1)
    walk.event("norm", n, lay.vec)
    if pos is not None:
        walk.rewrite(Rewrite("norm_shape", n.name, pos, vec=lay.vec))
    walk.set(n, lay)


def group_norm(walk: ChannelWalk, n, x, num_groups, w, b, pos) -> None:
    lay = walk.layout(x)
    if lay.free:
        walk.set(n, lay)
        return
    if lay.pdim != 1 or not isinstance(num_groups, int):
        walk.freeze(lay, f"GroupNorm {describe(n)} over a dim that shrinks")
        walk.set(n, lay)
        return
    c = len(lay.vec)
    blk = c // num_groups
    for j in range(num_groups):
        walk.unite_all(lay.vec[j * blk:(j + 1) * blk])
    owner = module_path(n) or n.name
    for p, role in ((w, "norm_weight"), (b, "bias")):
        if p is not None:
            walk.param(p, 0, lay.vec, role, owner)
    walk.event("norm", n, lay.vec)
    if pos is not None:
        walk.rewrite(Rewrite("groups", n.name, pos, vec=lay.vec, block=blk))
    walk.set(n, lay)


# -- the rows -----------------------------------------------------------------------------------
@register_channel_rule(nn.modules.conv._ConvNd)
def conv_module(walk: ChannelWalk, n: fx.Node) -> None:
    mod, x = walk.module_call(n)
    path = n.target
    conv(walk, n, x, mod.in_channels, mod.out_channels, mod.groups, mod.transposed,
         f"{path}.weight", f"{path}.bias" if mod.bias is not None else None, path)
    walk.fix_module(path, "conv", n)


@register_channel_rule(F.conv1d, F.conv2d, F.conv3d)
def conv_functional(walk: ChannelWalk, n: fx.Node) -> None:
    w = param_target(n, 1, "weight")
    b = param_target(n, 2, "bias")
    groups = arg(n, 6, "groups", 1)
    if w is None or not isinstance(groups, int):
        raise Unsupported("")
    ws = tuple(walk.attr(w).shape)
    cout, cin = ws[0], ws[1] * groups
    conv(walk, n, n.args[0], cin, cout, groups, False, w, b, module_path(n) or n.name)
    if groups > 1:
        walk.rewrite(Rewrite("groups", n.name, arg_path(n, 6, "groups"),
                             vec=walk.layout(n).vec, block=cout // groups))


@register_channel_rule(nn.Linear)
def linear_module(walk: ChannelWalk, n: fx.Node) -> None:
    mod, x = walk.module_call(n)
    path = n.target
    linear(walk, n, x, mod.in_features, mod.out_features, f"{path}.weight",
           f"{path}.bias" if mod.bias is not None else None, path)
    walk.fix_module(path, "linear", n)


@register_channel_rule(F.linear)
def linear_functional(walk: ChannelWalk, n: fx.Node) -> None:
    w = param_target(n, 1, "weight")
    b = param_target(n, 2, "bias")
    if w is None:
        raise Unsupported("")
    fout, fin = tuple(walk.attr(w).shape)
    linear(walk, n, n.args[0], fin, fout, w, b, module_path(n) or n.name)


@register_channel_rule(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def batch_norm_module(walk: ChannelWalk, n: fx.Node) -> None:
    mod, x = walk.module_call(n)
    path = n.target
    names = [f"{path}.{k}" for k in ("weight", "bias", "running_mean", "running_var")
             if getattr(mod, k, None) is not None]
    per_channel(walk, n, x, 1, names, path)
    walk.fix_module(path, "bn", n)


@register_channel_rule(F.batch_norm)
def batch_norm_functional(walk: ChannelWalk, n: fx.Node) -> None:
    names = [param_target(n, i, k) for i, k in
             ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    per_channel(walk, n, n.args[0], 1, [p for p in names if p], module_path(n) or n.name)


def _affine_params(n: fx.Node, mod: nn.Module) -> tuple[str | None, str | None]:
    """The attribute paths of a norm module's weight and bias (None where it has none)."""
    w = f"{n.target}.weight" if getattr(mod, "weight", None) is not None else None
    b = f"{n.target}.bias" if getattr(mod, "bias", None) is not None else None
    return w, b


@register_channel_rule(nn.LayerNorm)
def layer_norm_module(walk: ChannelWalk, n: fx.Node) -> None:
    mod, x = walk.module_call(n)
    layer_norm(walk, n, x, mod.normalized_shape, *_affine_params(n, mod), None)
    walk.fix_module(n.target, "layer_norm", n)


@register_channel_rule(F.layer_norm)
def layer_norm_functional(walk: ChannelWalk, n: fx.Node) -> None:
    layer_norm(walk, n, n.args[0], arg(n, 1, "normalized_shape"), param_target(n, 2, "weight"),
               param_target(n, 3, "bias"), arg_path(n, 1, "normalized_shape"))


@register_channel_rule(nn.GroupNorm)
def group_norm_module(walk: ChannelWalk, n: fx.Node) -> None:
    mod, x = walk.module_call(n)
    group_norm(walk, n, x, mod.num_groups, *_affine_params(n, mod), None)
    walk.fix_module(n.target, "group_norm", n)


@register_channel_rule(F.group_norm)
def group_norm_functional(walk: ChannelWalk, n: fx.Node) -> None:
    group_norm(walk, n, n.args[0], arg(n, 1, "num_groups"), param_target(n, 2, "weight"),
               param_target(n, 3, "bias"), arg_path(n, 1, "num_groups"))


@register_channel_rule(nn.Embedding)
def embedding_module(walk: ChannelWalk, n: fx.Node) -> None:
    """A lookup table: its columns are channels of their own (the start of a token stream)."""
    mod, idx = walk.module_call(n)
    if not walk.layout(idx).free:
        raise Unsupported("indices that carry channels")
    out = walk.fresh(n, mod.embedding_dim, "constant", n.target)
    walk.param(f"{n.target}.weight", 1, out, "constant", n.target)
    walk.fix_module(n.target, "embedding", n)
    walk.set(n, Layout(ndim_of(n) - 1, out))


@register_channel_rule(nn.PReLU)
def prelu_module(walk: ChannelWalk, n: fx.Node) -> None:
    mod, x = walk.module_call(n)
    if mod.num_parameters == 1:
        walk.set(n, walk.layout(x))  # one slope for all channels: a plain activation
    else:
        per_channel(walk, n, x, 1, [f"{n.target}.weight"], n.target)
        walk.fix_module(n.target, "prelu", n)
