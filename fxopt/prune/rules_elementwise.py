"""Channel rules for ops that keep every channel where it is: elementwise, spatial, reductions.

Each op family is one or a few rows of the rule table (``fxopt.prune.rule_table``):

- unary (activations, dropout, casts, ``exp``...): the output has the input's layout;
- n-ary (``+``, ``*``, ``torch.where``...): operands that meet channel for channel are united
  (a residual ``add``, a squeeze-excite ``mul``), so their channels go together; a constant
  operand (a layer-scale ``gamma``) gets slots of its own and shrinks with them; an operand that
  cannot shrink (a model input) freezes the channels it meets;
- spatial (pooling, interpolation, padding): fine unless they act on the pruned dim;
- reductions and softmax-like ops: fine unless they reduce (or normalize) over the channels;
  a sum or a p-norm over them is fine too (a removed channel is a zero in the masked reference:
  it adds nothing), and so is a mean, rewritten as the sum over the kept channels divided by the
  original count (a ``Rewrite("mean")``); max, min, var, softmax over the channels freeze.

A constant operand reached through shape ops (``self.gamma.view(1, -1, 1, 1)``, a class token's
``expand``) gets slots like a bare one: the walk visits that chain again with the constant's
layout (``_constant_chain``).

    >>> # y = a + b, a: Layout(1, [0..7]), b: Layout(1, [8..15])
    >>> residual(walk, node)   # y: Layout(1, [0..7]); slot i united with 8 + i ("residual")

The activations are the capture forms of ``fxopt.ir.activations`` (the one activation table).
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.activations import CAPTURE_FORMS
from fxopt.ir.graph import module_path
from fxopt.prune.nodes import arg, describe, ndim_of, normalize_dim, segment_of, shape_of
from fxopt.prune.records import FREE, Layout, Rewrite
from fxopt.prune.rule_table import register_channel_rule
from fxopt.prune.walk import ChannelWalk, Unsupported

__all__ = ["UNARY_OPS", "UNARY_MODULES", "NARY_OPS", "SPATIAL_OPS", "SPATIAL_MODULES",
           "REDUCTION_OPS", "passthrough",
           "elementwise", "spatial", "reduction", "unary", "unary_module", "nary_rule",
           "spatial_function", "spatial_module", "pad", "roll", "reduction_rule", "normalize",
           "softmax_module"]


def _stochastic_depth() -> tuple:
    try:
        from torchvision.ops import stochastic_depth
        return (stochastic_depth,)
    except Exception:  # noqa: BLE001 - torchvision is optional
        return ()


# -- the op families (rows of the table) --------------------------------------------------------
UNARY_OPS = (
    # functions: dropout, pointwise math, and every activation's canonical call
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.clamp, torch.clip, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    torch.erf, torch.square, torch.reciprocal, torch.sign, operator.neg, F.softplus, F.softsign,
    F.tanhshrink, F.hardshrink, F.softshrink, F.logsigmoid, F.selu, F.celu, F.rrelu,
    F.threshold, torch.nan_to_num, *_stochastic_depth(),
    *(row.canonical for row in CAPTURE_FORMS.values()),
    # Tensor methods
    "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type",
    "type_as", "exp", "log", "abs", "neg", "sqrt", "rsqrt", "sigmoid", "tanh", "relu", "clamp",
    "clip", "square", "reciprocal", "sign", "erf", "cpu", "cuda", "requires_grad_", "nan_to_num",
)
UNARY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softplus, nn.SELU, nn.CELU,
                 *(cls for row in CAPTURE_FORMS.values() for cls in row.modules))
# coupling kind -> the ops whose operands meet channel for channel
NARY_OPS = {
    "residual": (operator.add, operator.sub, torch.add, torch.sub, "add", "sub"),
    "channel-mul": (operator.mul, operator.truediv, torch.mul, torch.div, torch.true_divide,
                    "mul", "div"),
    "elementwise": (operator.pow, torch.pow, torch.maximum, torch.minimum, torch.where, torch.eq,
                    torch.ne, torch.gt, torch.lt, torch.ge, torch.le, torch.lerp, torch.addcmul,
                    torch.addcdiv, "pow", "maximum", "minimum", "masked_fill", "where", "lerp"),
}
SPATIAL_OPS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
               F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d,
               F.lp_pool2d, F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                   nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                   nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
                   nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
                   nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
# "reduce": the reduced dims go away (unless keepdim); "along": softmax-like, the shape stays
# reductions over the channels that the masked reference and the pruned model agree on
_SUMS = (torch.sum, "sum", torch.norm, torch.linalg.vector_norm, "norm")
_MEANS = (torch.mean, "mean")
REDUCTION_OPS = {
    "reduce": (torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
               torch.logsumexp, torch.prod, "mean", "sum", "amax", "amin", "std", "var",
               "logsumexp", "prod"),
    "norm": (torch.norm, torch.linalg.vector_norm, "norm"),
    "along": (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.cumsum,
              "softmax", "log_softmax", "cumsum"),
}


# -- the logic ----------------------------------------------------------------------------------
def passthrough(walk: ChannelWalk, n: fx.Node, x) -> None:
    walk.set(n, walk.layout(x))


# shape ops between a constant and the op that uses it (``gamma.view(1, -1, 1, 1)``)
_CHAIN_OPS = ("view", "reshape", torch.reshape, "expand", "expand_as", "unsqueeze",
              torch.unsqueeze, "contiguous", "to", "float", "type_as")


def _constant_chain(walk: ChannelWalk, a) -> list[fx.Node] | None:
    """``[constant, op, ..., a]`` when ``a`` is a not-yet-seen constant through shape ops."""
    chain: list[fx.Node] = []
    cur = a
    while isinstance(cur, fx.Node) and cur.op != "get_attr":
        if cur.op not in ("call_method", "call_function") or cur.target not in _CHAIN_OPS or \
                len(cur.users) != 1 or not cur.args or not walk.layout(cur).free:
            return None
        chain.append(cur)
        cur = cur.args[0]
    if not chain or not isinstance(cur, fx.Node) or walk.known(cur) or len(cur.users) != 1:
        return None
    return [cur] + chain[::-1]


def _source_dim(c: fx.Node, q: int, size: int) -> int | None:
    """The dim of ``c``'s input that becomes dim ``q`` (of size ``size``) of ``c``."""
    src, out = shape_of(c.args[0]), shape_of(c)
    if src is None or out is None:
        return None
    if c.target in ("expand", "expand_as"):
        d = q - (len(out) - len(src))
        return d if d >= 0 and src[d] == size else None
    if c.target in ("view", "reshape", torch.reshape, "unsqueeze", torch.unsqueeze):
        for d, s in enumerate(src):
            seg = segment_of(src, out, d) if s == size else None
            if seg and seg[1][0] <= q < seg[1][1] and \
                    np.prod(src[seg[0][0]:seg[0][1]]) == np.prod(out[seg[1][0]:seg[1][1]]) \
                    == size and out[q] == size:
                return d
        return None
    return q


def _chain_slots(walk: ChannelWalk, chain: list[fx.Node], q: int) -> np.ndarray | None:
    """Give the constant of ``chain`` slots along the dim that becomes ``q`` of its last node,
    and visit the chain again so that every node of it carries them; None if none does."""
    size = shape_of(chain[-1])[q]
    dims = [q]
    for c in chain[:0:-1]:
        d = _source_dim(c, dims[-1], size)
        if d is None:
            return None
        dims.append(d)
    const = chain[0]
    slots = walk.fresh(const, size, "constant", const.target)
    walk.param(const.target, dims[-1], slots, "constant", module_path(const) or const.target)
    walk.set(const, Layout(dims[-1], slots))
    for c in chain[1:]:
        walk.visit(c, walk.rules)
    lay = walk.layout(chain[-1])
    if lay.pdim != q or lay.vec is None or not np.array_equal(lay.vec, slots):
        walk.freeze_slots(slots, f"a constant reshaped across the channels at "
                                 f"{describe(chain[-1])}")
        return None
    return slots


def elementwise(walk: ChannelWalk, n: fx.Node, operands: list, kind: str) -> None:
    """Operands broadcast to the output: those that meet along the pruned dim are united."""
    out_shape = shape_of(n)
    if out_shape is None:
        raise Unsupported("no shape")
    nd = len(out_shape)
    nodes = [a for a in operands if isinstance(a, fx.Node) and shape_of(a) is not None]
    pending = [a for a in nodes if a.op == "get_attr" and not walk.known(a)]
    chains = {a: c for a in nodes if a not in pending and walk.rules is not None
              for c in [_constant_chain(walk, a)] if c is not None}
    known = [a for a in nodes if a not in pending and a not in chains]
    pd = None
    for a in known:
        lay = walk.layout(a)
        if not lay.free:
            pd = lay.pdim + nd - ndim_of(a)
            break
    if pd is None:
        walk.set(n, FREE)
        return
    vec = None
    pin = []
    for a in known:
        lay, shp = walk.layout(a), shape_of(a)
        q = pd - (nd - len(shp))
        if not (q >= 0 and shp[q] == out_shape[pd]):
            # broadcast along the pruned dim: this operand is never sliced
            if not lay.free:
                walk.freeze(lay, f"broadcast against the channels of {describe(n)}")
            continue
        if lay.free or lay.pdim != q:
            # every element of it meets a channel of the output: it would have to shrink
            walk.freeze(lay, f"combined with a tensor that cannot shrink at {describe(n)}")
            pin.append(a)
            continue
        if vec is None:
            vec = lay.vec
        else:
            walk.unite(vec, lay.vec)
            walk.event(kind, n, np.concatenate([vec, lay.vec]))
    for a in pending:  # a constant operand (layer scale): give its dim slots of its own
        shp = shape_of(a)
        q = pd - (nd - len(shp))
        if q >= 0 and shp[q] == out_shape[pd] and out_shape[pd] > 1:
            slots = walk.fresh(a, shp[q], "constant", a.target)
            walk.param(a.target, q, slots, "constant", module_path(a) or a.target)
            walk.set(a, Layout(q, slots))
            walk.unite(vec, slots)
            walk.event("constant", n, np.concatenate([vec, slots]))
    for a, chain in chains.items():  # a constant through shape ops: the same, when it maps
        shp = shape_of(a)
        q = pd - (nd - len(shp))
        if not (q >= 0 and shp[q] == out_shape[pd] and out_shape[pd] > 1):
            continue
        slots = _chain_slots(walk, chain, q)
        if slots is None:
            pin.append(a)
            continue
        walk.unite(vec, slots)
        walk.event("constant", n, np.concatenate([vec, slots]))
    if pin:
        walk.freeze_slots(vec, f"combined with {describe(pin[0])}, which cannot shrink, "
                               f"at {describe(n)}")
    walk.set(n, Layout(pd, vec))


def spatial(walk: ChannelWalk, n: fx.Node, x) -> None:
    lay = walk.layout(x)
    if not lay.free and lay.pdim >= 2:
        walk.freeze(lay, f"spatial op {describe(n)} on the pruned dim")
        walk.set(n, FREE)
    else:
        walk.set(n, lay)


def _zero_neutral(n: fx.Node) -> bool:
    """A reduction where zeros add nothing: a sum, or a norm with p > 0."""
    if n.target not in _SUMS:
        return False
    if n.target in (torch.sum, "sum"):
        return True
    p = arg(n, 1, "ord" if n.target is torch.linalg.vector_norm else "p", 2)
    return p in (None, "fro") or (isinstance(p, (int, float)) and p > 0)


def reduction(walk: ChannelWalk, n: fx.Node, kind: str, dims=None) -> None:
    """``kind``: "reduce" (the dims go), "norm" (``x.norm(p, dim)``) or "along" (softmax-like);
    ``dims`` default: arg 1 ("norm": arg 2)."""
    x = n.args[0]
    lay = walk.layout(x)
    if dims is None:
        dims = arg(n, 2, "dim", None) if kind == "norm" else arg(n, 1, "dim", None)
        kind = "reduce" if kind == "norm" else kind
    if lay.free:
        walk.set(n, FREE)
        return
    nin = ndim_of(x)
    if dims is None:
        dl = list(range(nin))
    elif isinstance(dims, int):
        dl = [normalize_dim(dims, nin)]
    elif isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
        dl = [normalize_dim(d, nin) for d in dims]
    else:
        raise Unsupported("dims not constant")
    if lay.pdim in dl and kind == "reduce" and (_zero_neutral(n) or n.target in _MEANS):
        if n.target in _MEANS:
            shp = shape_of(x)
            walk.rewrite(Rewrite("mean", n.name, dim=lay.pdim,
                                 value=int(np.prod([shp[d] for d in dl]))))
        walk.event("reduce", n, lay.vec)
        walk.set(n, FREE)
        return
    if lay.pdim in dl:
        walk.freeze(lay, f"{'reduction' if kind == 'reduce' else 'normalization'} over "
                         f"channels at {describe(n)}")
        walk.set(n, FREE)
        return
    if kind == "reduce" and ndim_of(n) < nin:
        walk.set(n, Layout(lay.pdim - sum(1 for d in dl if d < lay.pdim), lay.vec))
    else:
        walk.set(n, lay)


# -- the rows -----------------------------------------------------------------------------------
@register_channel_rule(*UNARY_OPS)
def unary(walk: ChannelWalk, n: fx.Node) -> None:
    passthrough(walk, n, n.args[0])


@register_channel_rule(*UNARY_MODULES)
def unary_module(walk: ChannelWalk, n: fx.Node) -> None:
    _mod, x = walk.module_call(n)
    passthrough(walk, n, x)


def nary_rule(kind: str):
    """The rule of an n-ary op whose operands' channels couple as ``kind``."""
    def rule(walk: ChannelWalk, n: fx.Node) -> None:
        elementwise(walk, n, list(n.args) + list(n.kwargs.values()), kind)

    rule.__name__ = rule.__qualname__ = kind.replace("-", "_")
    return rule


for _kind, _targets in NARY_OPS.items():
    register_channel_rule(*_targets)(nary_rule(_kind))


@register_channel_rule(*SPATIAL_OPS)
def spatial_function(walk: ChannelWalk, n: fx.Node) -> None:
    spatial(walk, n, n.args[0])


@register_channel_rule(*SPATIAL_MODULES)
def spatial_module(walk: ChannelWalk, n: fx.Node) -> None:
    mod, x = walk.module_call(n)
    if getattr(mod, "return_indices", False):
        raise Unsupported("pooling that returns indices")
    spatial(walk, n, x)


@register_channel_rule(torch.roll, "roll")
def roll(walk: ChannelWalk, n: fx.Node) -> None:
    lay = walk.layout(n.args[0])
    dims = arg(n, 2, "dims", None)
    dims = (dims,) if isinstance(dims, int) else dims
    if not lay.free and (not isinstance(dims, (list, tuple)) or
                         lay.pdim in [normalize_dim(d, ndim_of(n)) for d in dims]):
        walk.freeze(lay, f"roll of the pruned dim at {describe(n)}")
        walk.set(n, FREE)
    else:
        walk.set(n, lay)


@register_channel_rule(F.pad)
def pad(walk: ChannelWalk, n: fx.Node) -> None:
    lay = walk.layout(n.args[0])
    amounts = arg(n, 1, "pad")
    nd = ndim_of(n)
    if not lay.free and (not isinstance(amounts, (list, tuple)) or
                         (lay.pdim >= nd - len(amounts) // 2 and
                          tuple(amounts[2 * (nd - 1 - lay.pdim):][:2]) != (0, 0))):
        walk.freeze(lay, f"padding of the pruned dim at {describe(n)}")
        walk.set(n, FREE)
    else:
        walk.set(n, lay)


def reduction_rule(kind: str):
    """The rule of a reduction (``kind`` "reduce") or a softmax-like op ("along")."""
    def rule(walk: ChannelWalk, n: fx.Node) -> None:
        reduction(walk, n, kind)

    rule.__name__ = rule.__qualname__ = kind
    return rule


for _kind, _targets in REDUCTION_OPS.items():
    register_channel_rule(*_targets)(reduction_rule(_kind))


@register_channel_rule(F.normalize)
def normalize(walk: ChannelWalk, n: fx.Node) -> None:
    reduction(walk, n, "along", dims=arg(n, 2, "dim", 1))


@register_channel_rule(nn.Softmax, nn.LogSoftmax)
def softmax_module(walk: ChannelWalk, n: fx.Node) -> None:
    mod, _x = walk.module_call(n)
    reduction(walk, n, "along", dims=mod.dim)
