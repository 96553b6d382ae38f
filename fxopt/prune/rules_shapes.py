"""Channel rules for ops that move channels: reshapes, permutes, expand, cat, split, indexing.

These rules make no slots; they carry a layout to the dim where the channels land, or cut it:

- reshape/view/flatten: the reshape factors into independent segments (``segment_of``); the
  channel dim's segment decides where the slots go. A flatten before a Linear maps channel c to
  its H*W input features; a channel shuffle (view, transpose, view) unites the channels that
  share a column; the size of the pruned dim in the shape argument (a literal or one the
  graph computes) becomes a ``Rewrite`` to the kept count;
- permute/transpose/t: the pruned dim moves; ``expand``: a literal size of it is rewritten;
- cat along the pruned dim concatenates the operands' slots (they stay independent); along
  another dim the operands meet element for element, as in an ``add``;
- split/chunk along the pruned dim cut it into pieces (rewritten as ``torch.split`` with the
  kept sizes); ``x[:, a:b]`` slices it; an integer index or advanced indexing into it freezes;
- stack: the operands meet element for element (united) and the pruned dim moves past the new
  dim; unbind along another dim: every piece keeps the layout (the qkv of an attention:
  ``q, k, v = qkv.unbind(0)``), along the pruned dim it freezes; ``expand_as`` is an
  elementwise meeting of its two operands (the output takes ``other``'s shape).

    >>> # y = x.flatten(1), x: [N, 8, 4, 4] with Layout(1, [0..7])
    >>> reshape(walk, node)   # y: Layout(1, [0]*16 + [1]*16 + ... + [7]*16)   ("flatten")
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.ir.graph import tensor_meta
from fxopt.prune.nodes import arg, describe, ndim_of, normalize_dim, segment_of, shape_of
from fxopt.prune.records import FREE, Layout, Rewrite
from fxopt.prune.rule_table import register_channel_rule
from fxopt.prune.rules_elementwise import elementwise
from fxopt.prune.walk import ChannelWalk, Unsupported

__all__ = ["RESHAPE_OPS", "segment_of", "reshape", "reshape_module", "permute", "transpose",
           "matrix_transpose", "expand", "expand_as", "cat", "stack", "split", "unbind",
           "getitem"]

RESHAPE_OPS = (torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
               "view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as",
               "reshape_as")


# -- reshapes -----------------------------------------------------------------------------------
# reshapes whose second argument is the shape (ATen's from a torch.export capture too)
_SHAPE_LIST_OPS = (torch.reshape, "view", "reshape", torch.ops.aten.view.default,
                   torch.ops.aten.reshape.default)


def _shape_entries(n: fx.Node, out_nd: int):
    """The shape argument's entry for each output dim and where it sits (or None, None)."""
    t = n.target
    if t in _SHAPE_LIST_OPS or (n.op == "call_module"):
        if n.op == "call_module":
            return None, None
        if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)):
            return list(n.args[1]), [(1, k) for k in range(len(n.args[1]))]
        if t != torch.reshape and len(n.args) - 1 == out_nd:
            return list(n.args[1:]), [(k + 1,) for k in range(out_nd)]
        return None, None
    if t in (torch.unflatten, "unflatten"):
        dim = normalize_dim(arg(n, 1, "dim"), ndim_of(n.args[0]))
        sizes = arg(n, 2, "sizes")
        entries = [None] * out_nd
        paths: list = [None] * out_nd
        for k, s in enumerate(sizes):
            entries[dim + k] = s
            paths[dim + k] = (2, k)
        return entries, paths
    return None, None


@register_channel_rule(*RESHAPE_OPS)
def reshape(walk: ChannelWalk, n: fx.Node) -> None:
    x = n.args[0]
    lay = walk.layout(x)
    in_shape, out_shape = shape_of(x), shape_of(n)
    if lay.free:
        walk.set(n, FREE)
        return
    if in_shape is None or out_shape is None or 0 in in_shape:
        raise Unsupported("unknown shapes")
    entries, paths = _shape_entries(n, len(out_shape))
    seg = segment_of(in_shape, out_shape, lay.pdim)
    if seg is None:
        raise Unsupported("cannot match the reshape's dims")
    (i0, i1), (o0, o1) = seg
    in_sizes, out_sizes = in_shape[i0:i1], out_shape[o0:o1]
    shape = [1] * (i1 - i0)
    shape[lay.pdim - i0] = len(lay.vec)
    arr = np.broadcast_to(lay.vec.reshape(shape), in_sizes).reshape(out_sizes)
    varying = [k for k in range(o1 - o0) if arr.shape[k] > 1 and
               not (arr == arr.take([0], axis=k)).all()]
    if not varying:
        varying = [k for k in range(o1 - o0) if out_sizes[k] == len(lay.vec)][:1] or [0]

    def rank(k):
        # prefer a dim whose size the graph computes (-1, x.size(0)): no literal to rewrite
        e = entries[o0 + k] if entries is not None else None
        dynamic = isinstance(e, fx.Node) or e == -1
        return (0 if dynamic else 1, -out_sizes[k], k)

    pk = min(varying, key=rank)
    moved = np.moveaxis(arr, pk, 0).reshape(out_sizes[pk], -1)
    if len(varying) > 1:
        # the channels spread over several output dims (a shuffle): each column goes together
        for row in moved:
            walk.unite_all(row)
        walk.event("shuffle", n, moved.ravel())
    elif (i1 - i0) > (o1 - o0) and len(lay.vec) != moved.size:
        walk.event("flatten", n, lay.vec)
    pdim = o0 + pk
    if entries is not None:
        e = entries[pdim]
        # a size the graph computes may be another tensor's (``reshape(B, N, C)`` with C the
        # block's input width, not the attention's): the kept count is a constant, write it
        if (isinstance(e, int) and e != -1) or isinstance(e, fx.Node):
            walk.rewrite(Rewrite("shape", n.name, paths[pdim], vec=moved[:, 0]))
    walk.set(n, Layout(pdim, np.ascontiguousarray(moved[:, 0])))


@register_channel_rule(nn.Flatten)
def reshape_module(walk: ChannelWalk, n: fx.Node) -> None:
    walk.module_call(n)
    reshape(walk, n)


# -- permutes and expand ------------------------------------------------------------------------
def _move(walk: ChannelWalk, n: fx.Node, lay: Layout, perm: list[int]) -> None:
    if lay.free:
        walk.set(n, FREE)
    else:
        walk.set(n, Layout(perm.index(lay.pdim), lay.vec))


@register_channel_rule(torch.permute, "permute")
def permute(walk: ChannelWalk, n: fx.Node) -> None:
    x = n.args[0]
    lay, nd = walk.layout(x), ndim_of(x)
    dims = n.args[1:] if n.op == "call_method" else (arg(n, 1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if n.op == "call_method" and not dims:
        dims = n.kwargs.get("dims")
    _move(walk, n, lay, [normalize_dim(d, nd) for d in dims])


@register_channel_rule(torch.transpose, "transpose", torch.swapaxes, "swapaxes")
def transpose(walk: ChannelWalk, n: fx.Node) -> None:
    x = n.args[0]
    lay, nd = walk.layout(x), ndim_of(x)
    d0 = normalize_dim(arg(n, 1, "dim0"), nd)
    d1 = normalize_dim(arg(n, 2, "dim1"), nd)
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    _move(walk, n, lay, perm)


@register_channel_rule(torch.t, "t")
def matrix_transpose(walk: ChannelWalk, n: fx.Node) -> None:
    x = n.args[0]
    lay, nd = walk.layout(x), ndim_of(x)
    _move(walk, n, lay, list(range(nd))[::-1])


@register_channel_rule("expand")
def expand(walk: ChannelWalk, n: fx.Node) -> None:
    x = n.args[0]
    lay = walk.layout(x)
    sizes = n.args[1:]
    base = 1
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes, base = sizes[0], None
    if lay.free:
        walk.set(n, FREE)
        return
    out_nd = ndim_of(n)
    pd = lay.pdim + out_nd - ndim_of(x)
    if len(lay.vec) != shape_of(n)[pd]:
        walk.freeze(lay, f"expand of the pruned dim at {describe(n)}")
        walk.set(n, FREE)
        return
    entry = sizes[pd]
    if isinstance(entry, int) and entry != -1:
        walk.rewrite(Rewrite("shape", n.name, (1 + pd,) if base else (1, pd), vec=lay.vec))
    walk.set(n, Layout(pd, lay.vec))


@register_channel_rule("expand_as")
def expand_as(walk: ChannelWalk, n: fx.Node) -> None:
    # only other's shape is read, but it must shrink with x: the same meeting as an add
    elementwise(walk, n, [n.args[0], arg(n, 1, "other")], "channel-mul")


# -- concatenation, splits, indexing ------------------------------------------------------------
@register_channel_rule(torch.cat, torch.concat, torch.concatenate)
def cat(walk: ChannelWalk, n: fx.Node) -> None:
    tensors = arg(n, 0, "tensors")
    nd = ndim_of(n)
    d = normalize_dim(arg(n, 1, "dim", 0), nd)
    lays = [walk.layout(a) for a in tensors]
    if all(lay.free for lay in lays):
        walk.set(n, FREE)
        return
    if all(lay.free or lay.pdim == d for lay in lays):
        vec = np.concatenate([lay.vec if not lay.free else
                              np.full(shape_of(a)[d], -1, dtype=np.int64)
                              for a, lay in zip(tensors, lays)])
        walk.event("concat", n, vec)
        walk.set(n, Layout(d, vec))
        return
    # concatenation along a dim that keeps its size: the operands stay aligned elementwise
    elementwise(walk, n, list(tensors), "elementwise")


@register_channel_rule(torch.stack)
def stack(walk: ChannelWalk, n: fx.Node) -> None:
    tensors = list(arg(n, 0, "tensors"))
    nd = ndim_of(n)
    d = normalize_dim(arg(n, 1, "dim", 0), nd)
    lays = [walk.layout(a) for a in tensors]
    live = [lay for lay in lays if not lay.free]
    if not live:
        walk.set(n, FREE)
        return
    pd = live[0].pdim
    if len(live) < len(lays) or any(lay.pdim != pd for lay in live):
        for lay in live:
            walk.freeze(lay, f"stacked with a tensor that cannot shrink at {describe(n)}")
        walk.set(n, FREE)
        return
    for lay in live[1:]:
        walk.unite(live[0].vec, lay.vec)
    walk.event("elementwise", n, np.concatenate([lay.vec for lay in live]))
    walk.set(n, Layout(pd if pd < d else pd + 1, live[0].vec))


@register_channel_rule(torch.unbind, "unbind")
def unbind(walk: ChannelWalk, n: fx.Node) -> None:
    x = n.args[0]
    lay = walk.layout(x)
    metas = n.meta.get("tensor_meta")
    if not isinstance(metas, tuple):
        raise Unsupported("unknown pieces")
    d = normalize_dim(arg(n, 1, "dim", 0), ndim_of(x))
    if lay.free:
        walk.set_pieces(n, [FREE] * len(metas))
    elif lay.pdim == d:
        raise Unsupported("unbind along the pruned dim")
    else:
        walk.set_pieces(n, [Layout(lay.pdim - (lay.pdim > d), lay.vec)] * len(metas))


@register_channel_rule(torch.split, torch.chunk, "split", "chunk")
def split(walk: ChannelWalk, n: fx.Node) -> None:
    x = n.args[0]
    lay = walk.layout(x)
    metas = n.meta.get("tensor_meta")
    if not isinstance(metas, tuple):
        raise Unsupported("unknown pieces")
    nd = ndim_of(x)
    d = normalize_dim(arg(n, 2, "dim", 0), nd)  # split(x, sizes, dim), chunk(x, n, dim)
    sizes = [tuple(m.shape)[d] for m in metas]
    if lay.free:
        walk.set_pieces(n, [FREE] * len(metas))
    elif lay.pdim != d:
        walk.set_pieces(n, [lay] * len(metas))
    else:
        bounds = np.cumsum([0] + sizes)
        pieces = [lay.vec[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
        walk.set_pieces(n, [Layout(d, p) if (p >= 0).any() else FREE for p in pieces])
        walk.rewrite(Rewrite("split", n.name, pieces=pieces, dim=d))
        walk.event("split", n, lay.vec)


@register_channel_rule(operator.getitem, any_value=True)
def getitem(walk: ChannelWalk, n: fx.Node) -> None:
    src, idx = n.args
    if not isinstance(src, fx.Node):
        return
    lays = walk.pieces(src)
    if lays is not None:  # an item of a split or chunk
        walk.set(n, lays[idx] if isinstance(idx, int) and idx < len(lays) else FREE)
        if not isinstance(idx, int):
            for lay in lays:
                walk.freeze(lay, f"sliced tuple at {describe(n)}")
        return
    if not hasattr(tensor_meta(src), "shape"):
        return  # indexing a size or a python container
    lay = walk.layout(src)
    if lay.free:
        walk.set(n, FREE)
        return
    items = idx if isinstance(idx, tuple) else (idx,)
    nd = ndim_of(src)
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    dim_in, dim_out, pd_out = 0, 0, None
    rewrite = None
    for k, it in enumerate(items):
        if it is Ellipsis:
            skip = nd - n_real
            if dim_in <= lay.pdim < dim_in + skip:
                pd_out = dim_out + lay.pdim - dim_in
            dim_in += skip
            dim_out += skip
        elif it is None:
            dim_out += 1
        elif isinstance(it, slice):
            if dim_in == lay.pdim:
                if any(isinstance(v, fx.Node) for v in (it.start, it.stop, it.step)) or \
                        it.step not in (None, 1):
                    raise Unsupported("strided or computed slice of the pruned dim")
                start, stop, _ = it.indices(len(lay.vec))
                pd_out = dim_out
                rewrite = Rewrite("slice", n.name, (1, k) if isinstance(idx, tuple) else (1,),
                                  vec=lay.vec, start=start, stop=stop)
            dim_in += 1
            dim_out += 1
        elif isinstance(it, int):
            if dim_in == lay.pdim:
                raise Unsupported("integer index into the pruned dim")
            dim_in += 1
        else:
            raise Unsupported("advanced indexing")
    if dim_in <= lay.pdim and pd_out is None:
        pd_out = dim_out + lay.pdim - dim_in
    if rewrite is not None:
        walk.rewrite(rewrite)
        vec = lay.vec[rewrite.start:rewrite.stop]
        walk.event("slice", n, lay.vec)
    else:
        vec = lay.vec
    walk.set(n, Layout(pd_out, vec))
