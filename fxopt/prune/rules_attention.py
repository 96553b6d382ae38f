"""Channel rules for contractions and attention: matmul, bmm, einsum, scaled_dot_product_attention.

All four are one rule: an einsum. Every operand dim gets a letter; a letter the output keeps is a
*free* index, one it sums over is a *contracted* index. Each operand has at most one pruned dim
(its layout's ``pdim``), so each letter sees the slots of the operands pruned along it:

- the operands that carry a letter with size > 1 meet along it element for element: if all of
  them are pruned along it, their slots are united (``q @ k^T`` over the head dim: removing dim
  ``j`` of ``q`` removes dim ``j`` of ``k``); if one of them is not, the others are frozen (it
  cannot shrink). A size-1 (broadcast) dim meets nothing;
- a contracted letter disappears: a removed channel is zero in every operand of the masked
  reference, so it adds nothing to the sum, and removing it from all of them changes nothing;
- a free letter that carries slots gives the output its layout (a second one is frozen: an
  output has one pruned dim).

``matmul`` is ``...ik,...kj->...ij`` with numpy broadcasting of the batch dims; SDPA is
``q[...le], k[...se], v[...sv] -> [...lv]`` plus a softmax over ``s`` (never pruned: a token
dim) and a mask over ``ls``. SDPA's default scale is ``1/sqrt(E)`` of ``q``'s last dim: when that
dim is pruned, the rule writes the original scale into the call (a ``Rewrite("value")``).
torchvision's ``shifted_window_attention`` (Swin) has a rule of its own (see its doc), and so has
the patch merging between its stages (``_patch_merging_pad``: four strided slices of the stream
concatenated along the channels).

    >>> # a = q @ k.transpose(-2, -1); q, k: Layout(3, [0..63]) (head dims)
    >>> matmul(walk, node)   # q's slot i united with k's; a: FREE (the head dim was summed)
    >>> # o = a @ v; v: Layout(3, [64..127])
    >>> matmul(walk, node)   # o: Layout(3, [64..127])
"""
from __future__ import annotations

import math
import operator
import string

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.ir.graph import module_path
from fxopt.prune.nodes import arg, arg_path, describe, ndim_of, shape_of
from fxopt.prune.records import FREE, Layout, Rewrite
from fxopt.prune.rule_table import register_channel_rule
from fxopt.prune.walk import ChannelWalk, Unsupported

__all__ = ["contract", "parse_einsum", "matmul", "einsum", "scaled_dot_product_attention",
           "shifted_window_attention", "patch_merging_pad"]


def contract(walk: ChannelWalk, n: fx.Node, operands: list, letters: list[str], out: str) -> None:
    """The einsum rule: ``operands[i]`` has one letter per dim in ``letters[i]``; ``out`` the
    output's letters (see the module doc)."""
    shapes = [shape_of(a) if isinstance(a, fx.Node) else None for a in operands]
    if any(s is None or len(s) != len(ls) for s, ls in zip(shapes, letters)):
        raise Unsupported("operand shapes do not match the subscripts")
    lays = [walk.layout(a) for a in operands]
    meets: dict[str, list[int]] = {}  # letter -> operands with a size > 1 dim there
    for i, (shp, ls) in enumerate(zip(shapes, letters)):
        for d, c in enumerate(ls):
            if shp[d] > 1:
                meets.setdefault(c, []).append(i)
    pruned: dict[str, np.ndarray] = {}
    for c, ops in meets.items():
        on = [i for i in ops if not lays[i].free and letters[i][lays[i].pdim] == c]
        if not on:
            continue
        if len(on) < len(ops):  # an operand that cannot shrink along c meets these slots
            for i in on:
                walk.freeze(lays[i], f"contracted with a tensor that cannot shrink at "
                                     f"{describe(n)}")
            continue
        vec = lays[on[0]].vec
        for i in on[1:]:
            if len(lays[i].vec) != len(vec):
                raise Unsupported("operands of different sizes along one index")
            walk.unite(vec, lays[i].vec)
        if len(on) > 1:
            walk.event("elementwise", n, np.concatenate([lays[i].vec for i in on]))
        pruned[c] = vec
    kept = [c for c in out if c in pruned]
    for c in kept[1:]:  # an output has one pruned dim
        walk.freeze_slots(pruned[c], f"a second pruned dim in the output of {describe(n)}")
    if kept:
        walk.set(n, Layout(out.index(kept[0]), pruned[kept[0]]))
    else:
        walk.set(n, FREE)
    return pruned


def parse_einsum(equation: str, ndims: list[int]) -> tuple[list[str], str]:
    """The operands' letters and the output's for ``equation`` (``...`` expanded)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        raise Unsupported("the equation does not match the operands")
    used = set(eq) - set(".,->")
    spare = [c for c in string.ascii_letters if c not in used]
    ell = max((nd - len(s.replace("...", "")) for s, nd in zip(ins, ndims) if "..." in s),
              default=0)
    batch = "".join(spare[:ell])
    letters = []
    for s, nd in zip(ins, ndims):
        if "..." in s:
            k = nd - len(s.replace("...", ""))
            s = s.replace("...", batch[ell - k:])
        letters.append(s)
    if not arrow:  # implicit output: the letters seen once, sorted, after the broadcast dims
        counts = {c: sum(s.count(c) for s in ins) for c in used}
        rhs = "..." + "".join(sorted(c for c, k in counts.items() if k == 1))
    rhs = rhs.replace("...", batch)
    if any(len(set(s)) != len(s) for s in letters):
        raise Unsupported("a repeated index (a trace or diagonal)")
    return letters, rhs


def _matmul_letters(nda: int, ndb: int) -> tuple[list[str], str]:
    if nda < 2 or ndb < 2:
        raise Unsupported("matmul of a vector")
    nb = max(nda, ndb) - 2
    batch = string.ascii_uppercase[:nb]
    return [batch[nb - (nda - 2):] + "ik", batch[nb - (ndb - 2):] + "kj"], batch + "ij"


@register_channel_rule(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
def matmul(walk: ChannelWalk, n: fx.Node) -> None:
    a, b = n.args[0], n.args[1]
    letters, out = _matmul_letters(ndim_of(a), ndim_of(b))
    contract(walk, n, [a, b], letters, out)


@register_channel_rule(torch.einsum)
def einsum(walk: ChannelWalk, n: fx.Node) -> None:
    eq, *ops = n.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or not all(isinstance(a, fx.Node) for a in ops):
        raise Unsupported("sublist form or non-tensor operands")
    letters, out = parse_einsum(eq, [ndim_of(a) for a in ops])
    contract(walk, n, ops, letters, out)


@register_channel_rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(walk: ChannelWalk, n: fx.Node) -> None:
    q, k, v = n.args[0], n.args[1], n.args[2]
    mask = arg(n, 3, "attn_mask")
    if arg(n, 7, "enable_gqa", False):
        raise Unsupported("grouped-query attention")
    nq, nk, nv = ndim_of(q), ndim_of(k), ndim_of(v)
    if min(nq, nk, nv) < 2:
        raise Unsupported("unknown shapes")
    nb = max(nq, nk, nv) - 2
    batch = string.ascii_uppercase[:nb]

    def lead(nd):
        return batch[nb - (nd - 2):]

    operands, letters = [q, k, v], [lead(nq) + "le", lead(nk) + "se", lead(nv) + "sv"]
    if isinstance(mask, fx.Node) and shape_of(mask) is not None:  # else None or a constant
        nm = ndim_of(mask)
        operands.append(mask)
        letters.append(batch[max(nb - (nm - 2), 0):] + "ls"[max(2 - nm, 0):])
    pruned = contract(walk, n, operands, letters, batch + "lv")
    if any(c in pruned for c in "ls"):  # tokens: the softmax runs over them
        for c in "ls":
            if c in pruned:
                walk.freeze_slots(pruned[c], f"softmax over the pruned dim at {describe(n)}")
        walk.set(n, FREE)
    if "e" in pruned and arg(n, 6, "scale") is None:
        walk.rewrite(Rewrite("value", n.name, ("scale",) if len(n.args) <= 6 else
                             arg_path(n, 6, "scale"), value=1.0 / math.sqrt(shape_of(q)[-1])))


def _swin(name: str) -> tuple:
    """``(torchvision.models.swin_transformer.<name>,)``, or ``()`` without torchvision."""
    try:
        from torchvision.models import swin_transformer
        return (getattr(swin_transformer, name),)
    except Exception:  # noqa: BLE001 - torchvision is optional
        return ()


def shifted_window_attention(walk: ChannelWalk, n: fx.Node) -> None:
    """torchvision's Swin attention: its head dim is ``C // num_heads`` of the input width C.

    The inner width must shrink with the stream, by whole head dims: stream channel
    ``h * d + j`` goes with head dim ``j`` of every head in q, k, v (one unit: ``num_heads``
    stream channels and head dim ``j`` everywhere). The reference zeroes the removed qkv rows
    (they are inside the call); Swin-V1's scale ``d ** -0.5`` follows the pruned ``d``, so the
    kept q rows are rescaled by ``sqrt(d' / d)`` (a ``Rewrite("scale_rows")``).
    """
    from fxopt.prune.rules_layers import param_target  # layers rows: one level up

    x, heads = n.args[0], arg(n, 5, "num_heads")
    wq, wp = param_target(n, 1, "qkv_weight"), param_target(n, 2, "proj_weight")
    bq, bp = param_target(n, 9, "qkv_bias"), param_target(n, 10, "proj_bias")
    c = shape_of(x)[-1]
    if wq is None or wp is None or not isinstance(heads, int) or c % heads:
        raise Unsupported("")
    d = c // heads
    vin = walk.channel_vector(n, x, ndim_of(x) - 1, c)
    if (vin < 0).any():
        walk.freeze_slots(vin, f"the width of {describe(n)} is tied to a channel that stays")
        raise Unsupported("its input width cannot shrink")
    for j in range(d):  # stream channels of one head dim go together
        walk.unite_all(vin[j::d])
    owner = module_path(n) or n.name
    rows = np.concatenate([vin] * 3)
    walk.param(wq, 0, rows, "weight", owner)
    walk.param(wq, 1, vin, "weight", owner)
    walk.param(wp, 1, vin, "weight", owner)
    if bq is not None:
        walk.param(bq, 0, rows, "bias", owner)
    out = walk.fresh(n, tuple(walk.attr(wp).shape)[0], "linear", owner)
    walk.param(wp, 0, out, "weight", owner)
    if bp is not None:
        walk.param(bp, 0, out, "bias", owner)
    for p in (wq, bq):
        if p is not None:
            walk.zero_in_reference(p)
    if arg(n, 11, "logit_scale") is None:  # V1: q * d ** -0.5
        for p in (wq, bq):
            if p is not None:
                walk.rewrite(Rewrite("scale_rows", n.name, vec=vin, value=p))
    walk.event("attention", n, np.concatenate([vin, out]))
    walk.set(n, Layout(ndim_of(n) - 1, out))
    walk.record_layer(n, out, vin)


for _fn in _swin("shifted_window_attention"):
    register_channel_rule(_fn)(shifted_window_attention)


def patch_merging_pad(walk: ChannelWalk, n: fx.Node) -> None:
    """torchvision's Swin patch merging: ``x[..., H, W, C] -> [..., H/2, W/2, 4C]``, the four
    strided 2x2 slices of ``x`` concatenated along the channels (``x0, x1, x2, x3``). Output
    channel ``k * C + c`` is input channel ``c`` for every ``k``: the input's slots, four times
    (the LayerNorm and the reduction Linear after it read each stream channel four times). Any
    other layout of the input (pruned along a spatial dim) is not this op's business: frozen."""
    x = n.args[0] if n.args else n.kwargs.get("x")
    lay = walk.layout(x)
    if lay.free:
        walk.set(n, FREE)
        return
    if lay.pdim != ndim_of(x) - 1 or ndim_of(n) != ndim_of(x):
        raise Unsupported("")
    vec = np.concatenate([lay.vec] * 4)
    walk.event("concat", n, vec)
    walk.set(n, Layout(ndim_of(n) - 1, vec))


for _fn in _swin("_patch_merging_pad"):
    register_channel_rule(_fn)(patch_merging_pad)
