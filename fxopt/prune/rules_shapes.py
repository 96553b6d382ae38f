"""Channel rules for shape and elementwise ops: add/mul, cat, split/chunk, view/flatten, shuffle.

``ShapeRules`` is a mixin of ``fxopt.channel_rules.ChannelRules``: these rules make no slots of
their own (but for constants); they carry a layout through, move its dim, unite the slots of
operands that meet (residuals, channel multiplies), or freeze what they cannot follow.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.fx as fx

from fxopt.ir.graph import module_path, tensor_meta
from fxopt.prune.records import FREE, Layout, Rewrite
from fxopt.prune.rule_tables import _arg, _describe, _ndim, _norm_dim, _shape, _Unsupported

__all__ = ["ShapeRules", "segment_of"]


class ShapeRules:
    """Rules for shape-preserving, elementwise, reshape, cat/split and indexing ops (a mixin)."""

    # -- shape-preserving ops ---------------------------------------------------------------
    def _passthrough(self, n: fx.Node, x) -> None:
        self._set(n, self.layout(x))

    def _elementwise(self, n: fx.Node, operands: list, kind: str) -> None:
        out_shape = _shape(n)
        if out_shape is None:
            raise _Unsupported("no shape")
        nd = len(out_shape)
        nodes = [a for a in operands if isinstance(a, fx.Node) and _shape(a) is not None]
        pending = [a for a in nodes if a.op == "get_attr" and a.name not in self.layouts]
        known = [a for a in nodes if a not in pending]
        pd = None
        for a in known:
            lay = self.layout(a)
            if not lay.free:
                pd = lay.pdim + nd - _ndim(a)
                break
        if pd is None:
            self._set(n, FREE)
            return
        vec = None
        pin = []
        for a in known:
            lay, shp = self.layout(a), _shape(a)
            q = pd - (nd - len(shp))
            if not (q >= 0 and shp[q] == out_shape[pd]):
                # broadcast along the pruned dim: this operand is never sliced
                if not lay.free:
                    self._freeze(lay, f"broadcast against the channels of {_describe(n)}")
                continue
            if lay.free or lay.pdim != q:
                # every element of it meets a channel of the output: it would have to shrink
                self._freeze(lay, f"combined with a tensor that cannot shrink at {_describe(n)}")
                pin.append(a)
                continue
            if vec is None:
                vec = lay.vec
            else:
                self.uf.union_vectors(vec, lay.vec)
                self._event(kind, n, np.concatenate([vec, lay.vec]))
        for a in pending:
            shp = _shape(a)
            q = pd - (nd - len(shp))
            if q >= 0 and shp[q] == out_shape[pd] and out_shape[pd] > 1:
                slots = self._fresh(a, shp[q], "constant", a.target)
                self._param(a.target, q, slots, "constant", module_path(a) or a.target)
                self.layouts[a.name] = Layout(q, slots)
                self.uf.union_vectors(vec, slots)
                self._event("constant", n, np.concatenate([vec, slots]))
        if pin:
            self.uf.freeze(vec, f"combined with {_describe(pin[0])}, which cannot shrink, "
                                f"at {_describe(n)}")
        self._set(n, Layout(pd, vec))

    def _spatial(self, n: fx.Node, x) -> None:
        lay = self.layout(x)
        if not lay.free and lay.pdim >= 2:
            self._freeze(lay, f"spatial op {_describe(n)} on the pruned dim")
            self._set(n, FREE)
        else:
            self._set(n, lay)

    def _pad(self, n: fx.Node) -> None:
        lay = self.layout(n.args[0])
        pad = _arg(n, 1, "pad")
        nd = _ndim(n)
        if not lay.free and (not isinstance(pad, (list, tuple)) or
                             lay.pdim >= nd - len(pad) // 2):
            self._freeze(lay, f"padding of the pruned dim at {_describe(n)}")
            self._set(n, FREE)
        else:
            self._set(n, lay)

    def _reduce(self, n: fx.Node, kind: str, dims=None) -> None:
        x = n.args[0]
        lay = self.layout(x)
        if dims is None:
            dims = _arg(n, 1, "dim", None)
        if lay.free:
            self._set(n, FREE)
            return
        nin = _ndim(x)
        if dims is None:
            dl = list(range(nin))
        elif isinstance(dims, int):
            dl = [_norm_dim(dims, nin)]
        elif isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
            dl = [_norm_dim(d, nin) for d in dims]
        else:
            raise _Unsupported("dims not constant")
        if lay.pdim in dl:
            self._freeze(lay, f"{'reduction' if kind == 'reduce' else 'normalization'} over "
                              f"channels at {_describe(n)}")
            self._set(n, FREE)
            return
        if kind == "reduce" and _ndim(n) < nin:
            self._set(n, Layout(lay.pdim - sum(1 for d in dl if d < lay.pdim), lay.vec))
        else:
            self._set(n, lay)

    def _permute(self, n: fx.Node) -> None:
        x = n.args[0]
        lay = self.layout(x)
        nd = _ndim(x)
        t = n.target
        if t in (torch.transpose, "transpose", torch.swapaxes, "swapaxes"):
            d0 = _norm_dim(_arg(n, 1, "dim0"), nd)
            d1 = _norm_dim(_arg(n, 2, "dim1"), nd)
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        elif t in (torch.t, "t"):
            perm = list(range(nd))[::-1]
        else:
            dims = n.args[1:] if n.op == "call_method" else (_arg(n, 1, "dims"),)
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            if n.op == "call_method" and not dims:
                dims = n.kwargs.get("dims")
            perm = [_norm_dim(d, nd) for d in dims]
        if lay.free:
            self._set(n, FREE)
        else:
            self._set(n, Layout(perm.index(lay.pdim), lay.vec))

    def _expand(self, n: fx.Node) -> None:
        x = n.args[0]
        lay = self.layout(x)
        sizes = n.args[1:]
        base = 1
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes, base = sizes[0], None
        if lay.free:
            self._set(n, FREE)
            return
        out_nd = _ndim(n)
        pd = lay.pdim + out_nd - _ndim(x)
        if len(lay.vec) != _shape(n)[pd]:
            self._freeze(lay, f"expand of the pruned dim at {_describe(n)}")
            self._set(n, FREE)
            return
        entry = sizes[pd]
        if isinstance(entry, int) and entry != -1:
            self.rewrites.append(Rewrite("shape", n.name, (1 + pd,) if base else (1, pd),
                                         vec=lay.vec))
        self._set(n, Layout(pd, lay.vec))

    # -- reshapes ---------------------------------------------------------------------------
    def _reshape(self, n: fx.Node) -> None:
        x = n.args[0]
        lay = self.layout(x)
        in_shape, out_shape = _shape(x), _shape(n)
        if lay.free:
            self._set(n, FREE)
            return
        if in_shape is None or out_shape is None or 0 in in_shape:
            raise _Unsupported("unknown shapes")
        entries, paths = self._shape_entries(n, len(out_shape))
        seg = segment_of(in_shape, out_shape, lay.pdim)
        if seg is None:
            raise _Unsupported("cannot match the reshape's dims")
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
            e = entries[o0 + k] if entries is not None else None
            dynamic = isinstance(e, fx.Node) or e == -1
            return (0 if dynamic else 1, -out_sizes[k], k)

        pk = min(varying, key=rank)
        moved = np.moveaxis(arr, pk, 0).reshape(out_sizes[pk], -1)
        if len(varying) > 1:
            for row in moved:
                self.uf.unite_all(row)
            self._event("shuffle", n, moved.ravel())
        elif (i1 - i0) > (o1 - o0) and len(lay.vec) != moved.size:
            self._event("flatten", n, lay.vec)
        pdim = o0 + pk
        if entries is not None:
            e = entries[pdim]
            if isinstance(e, int) and e != -1:
                self.rewrites.append(Rewrite("shape", n.name, paths[pdim], vec=moved[:, 0]))
        self._set(n, Layout(pdim, np.ascontiguousarray(moved[:, 0])))

    def _shape_entries(self, n: fx.Node, out_nd: int):
        """The shape argument's entry for each output dim (or None when it has none)."""
        t = n.target
        if t in (torch.reshape, "view", "reshape") or (n.op == "call_module"):
            if n.op == "call_module":
                return None, None
            if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)):
                return list(n.args[1]), [(1, k) for k in range(len(n.args[1]))]
            if t != torch.reshape and len(n.args) - 1 == out_nd:
                return list(n.args[1:]), [(k + 1,) for k in range(out_nd)]
            return None, None
        if t in (torch.unflatten, "unflatten"):
            dim = _norm_dim(_arg(n, 1, "dim"), _ndim(n.args[0]))
            sizes = _arg(n, 2, "sizes")
            entries = [None] * out_nd
            paths: list = [None] * out_nd
            for k, s in enumerate(sizes):
                entries[dim + k] = s
                paths[dim + k] = (2, k)
            return entries, paths
        return None, None

    # -- concatenation, splits, indexing ----------------------------------------------------
    def _cat(self, n: fx.Node) -> None:
        tensors = _arg(n, 0, "tensors")
        nd = _ndim(n)
        d = _norm_dim(_arg(n, 1, "dim", 0), nd)
        lays = [self.layout(a) for a in tensors]
        if all(lay.free for lay in lays):
            self._set(n, FREE)
            return
        if all(lay.free or lay.pdim == d for lay in lays):
            vec = np.concatenate([lay.vec if not lay.free else
                                  np.full(_shape(a)[d], -1, dtype=np.int64)
                                  for a, lay in zip(tensors, lays)])
            self._event("concat", n, vec)
            self._set(n, Layout(d, vec))
            return
        # concatenation along a dim that keeps its size: the operands stay aligned elementwise
        self._elementwise(n, list(tensors), "elementwise")

    def _split(self, n: fx.Node) -> None:
        x = n.args[0]
        lay = self.layout(x)
        metas = n.meta.get("tensor_meta")
        if not isinstance(metas, tuple):
            raise _Unsupported("unknown pieces")
        nd = _ndim(x)
        d = _norm_dim(_arg(n, 2, "dim", 0), nd)  # split(x, sizes, dim), chunk(x, n, dim)
        sizes = [tuple(m.shape)[d] for m in metas]
        if lay.free:
            self.tuple_layouts[n.name] = [FREE] * len(metas)
        elif lay.pdim != d:
            self.tuple_layouts[n.name] = [lay] * len(metas)
        else:
            bounds = np.cumsum([0] + sizes)
            pieces = [lay.vec[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
            self.tuple_layouts[n.name] = [Layout(d, p) if (p >= 0).any() else FREE
                                          for p in pieces]
            self.rewrites.append(Rewrite("split", n.name, pieces=pieces, dim=d))
            self._event("split", n, lay.vec)
        self.layouts[n.name] = FREE

    def _getitem(self, n: fx.Node) -> None:
        src, idx = n.args
        if not isinstance(src, fx.Node):
            return
        if src.name in self.tuple_layouts:
            lays = self.tuple_layouts[src.name]
            self._set(n, lays[idx] if isinstance(idx, int) and idx < len(lays) else FREE)
            if not isinstance(idx, int):
                for lay in lays:
                    self._freeze(lay, f"sliced tuple at {_describe(n)}")
            return
        if not hasattr(tensor_meta(src), "shape"):
            return  # indexing a size or a python container
        lay = self.layout(src)
        if lay.free:
            self._set(n, FREE)
            return
        items = idx if isinstance(idx, tuple) else (idx,)
        nd = _ndim(src)
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
                        raise _Unsupported("strided or computed slice of the pruned dim")
                    start, stop, _ = it.indices(len(lay.vec))
                    pd_out = dim_out
                    rewrite = Rewrite("slice", n.name, (1, k) if isinstance(idx, tuple) else (1,),
                                      vec=lay.vec, start=start, stop=stop)
                dim_in += 1
                dim_out += 1
            elif isinstance(it, int):
                if dim_in == lay.pdim:
                    raise _Unsupported("integer index into the pruned dim")
                dim_in += 1
            else:
                raise _Unsupported("advanced indexing")
        if dim_in <= lay.pdim and pd_out is None:
            pd_out = dim_out + lay.pdim - dim_in
        if rewrite is not None:
            self.rewrites.append(rewrite)
            vec = lay.vec[rewrite.start:rewrite.stop]
            self._event("slice", n, lay.vec)
        else:
            vec = lay.vec
        self._set(n, Layout(pd_out, vec))


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
