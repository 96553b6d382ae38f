"""The physical side of pruning: smaller tensors, fixed-up modules and arguments, and the
masked reference the result must equal.

``apply_removal(gm, analysis, removed)`` slices every parameter and buffer the channel analysis
tied to a removed unit (``index_select``: new, smaller, contiguous tensors; the old ones are
dropped), updates module attributes (``out_channels``, ``groups``, ``num_features``, ...) and node
arguments that spell a channel count (a reshape's literal size, a chunk's pieces, a slice, a
``layer_norm``'s ``normalized_shape``, a functional conv's ``groups``).

``masked_reference(gm, analysis, removed)`` is the original graph with every tensor that carries
a removed channel masked to zero right after it is computed (``masked_fill``, so a 0/0 in a
removed channel cannot leak). A LayerNorm over the channels computes its statistics over the
kept channels only: that is what normalizing the remaining channels means, and it is what the
pruned LayerNorm computes.

``check_shapes(gm, analysis, removed, inputs)`` runs the pruned graph and returns the first node
whose shape is not the original one with the removed channels taken out (or that fails).
"""
from __future__ import annotations

import copy
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.ir.graph import add_buffer, copy_meta, get_attr_value, tensor_meta
from fxopt.prune.channels import ChannelAnalysis
from fxopt.prune.records import Rewrite

__all__ = ["apply_removal", "masked_reference", "check_shapes", "masked_layer_norm", "fork"]


def fork(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with its own graph that shares ``gm``'s modules and tensors.

    Copying every weight would double the memory of a big model for nothing: the pruner
    replaces what it changes (``_own`` a module before touching it), the rest stays shared.
    """
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    new.train(False)  # the containers fx creates are fresh modules, in training mode
    return new


def _own(gm: nn.Module, original: nn.Module | None, path: str) -> nn.Module:
    """The module at ``path`` in ``gm``, copied first if it is shared with ``original``."""
    mod = get_attr_value(gm, path) if path else gm
    if original is None or not path:
        return mod
    try:
        shared = get_attr_value(original, path) is mod
    except AttributeError:
        shared = False
    if not shared:
        return mod
    clone = copy.copy(mod)
    clone._parameters = dict(mod._parameters)
    clone._buffers = dict(mod._buffers)
    clone._modules = dict(mod._modules)
    parent_path, _, leaf = path.rpartition(".")
    parent = _own(gm, original, parent_path)
    parent._modules[leaf] = clone
    return clone


def _set_tensor(gm: nn.Module, path: str, new: torch.Tensor, original=None) -> None:
    owner_path, _, leaf = path.rpartition(".")
    owner = _own(gm, original, owner_path)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = new
    else:
        setattr(owner, leaf, new)


def _keep_index(analysis: ChannelAnalysis, vec: np.ndarray, removed) -> torch.Tensor | None:
    mask = analysis.removed_mask(vec, removed)
    if not mask.any():
        return None
    return torch.from_numpy(np.nonzero(~mask)[0].astype(np.int64))


def _slice_params(gm, analysis: ChannelAnalysis, removed, original=None) -> int:
    changed = 0
    for path, dims in analysis.params.items():
        t = get_attr_value(gm, path)
        new = None
        for dim, vec in dims.items():
            keep = _keep_index(analysis, vec, removed)
            if keep is not None:
                src = t.detach() if new is None else new
                new = src.index_select(dim, keep.to(src.device))
        if new is not None:
            _set_tensor(gm, path, new.contiguous(), original)
            changed += 1
    return changed


def _kept_of_node(analysis: ChannelAnalysis, name: str, removed) -> int | None:
    lay = analysis.layouts.get(name)
    if lay is None or lay.free:
        return None
    return analysis.kept_count(lay.vec, removed)


def _fix_modules(gm, analysis: ChannelAnalysis, removed, original=None) -> None:
    for path, (kind, node_name) in analysis.module_fixes.items():
        mod = _own(gm, original, path)
        if kind == "conv":
            w = mod.weight
            if mod.transposed:
                mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
            else:
                if mod.groups > 1:
                    per_group = mod.out_channels // mod.groups
                    mod.groups = w.shape[0] // per_group
                mod.out_channels = w.shape[0]
                mod.in_channels = w.shape[1] * mod.groups
        elif kind == "linear":
            mod.out_features, mod.in_features = mod.weight.shape
        elif kind == "prelu":
            mod.num_parameters = mod.weight.shape[0]
        elif kind == "embedding":
            mod.embedding_dim = mod.weight.shape[1]
        else:
            node = next((n for n in gm.graph.nodes if n.name == node_name), None)
            src = node.args[0] if node is not None else None
            kept = _kept_of_node(analysis, src.name, removed) if isinstance(src, fx.Node) else None
            if kept is None:
                continue
            if kind == "bn":
                if getattr(analysis.layouts.get(src.name), "pdim", None) == 1:
                    mod.num_features = kept
            elif kind == "layer_norm" and node_name in analysis.norm_nodes:
                mod.normalized_shape = (kept,)
            elif kind == "group_norm":
                per_group = mod.num_channels // mod.num_groups
                mod.num_channels = kept
                mod.num_groups = kept // per_group


def _get_arg(node: fx.Node, pos: tuple):
    head, rest = pos[0], pos[1:]
    val = node.args[head] if isinstance(head, int) else node.kwargs[head]
    for k in rest:
        val = val[k]
    return val


def _set_arg(node: fx.Node, pos: tuple, value) -> None:
    head, rest = pos[0], pos[1:]

    def replace(container, path, v):
        if not path:
            return v
        items = list(container)
        items[path[0]] = replace(items[path[0]], path[1:], v)
        return type(container)(items) if isinstance(container, tuple) else items

    if isinstance(head, int):
        args = list(node.args)
        args[head] = replace(args[head], rest, value)
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[head] = replace(kwargs[head], rest, value) if rest else value
        node.kwargs = kwargs


def _apply_rewrite(gm: fx.GraphModule, node: fx.Node, rw: Rewrite, analysis, removed,
                   original=None) -> None:
    if rw.kind == "shape":
        _set_arg(node, rw.pos, analysis.kept_count(rw.vec, removed))
    elif rw.kind == "norm_shape":
        _set_arg(node, rw.pos, (analysis.kept_count(rw.vec, removed),))
    elif rw.kind == "groups":
        _set_arg(node, rw.pos, analysis.kept_count(rw.vec, removed) // rw.block)
    elif rw.kind == "slice":
        old = _get_arg(node, rw.pos)
        mask = analysis.removed_mask(rw.vec, removed)
        start = int((~mask[:rw.start]).sum())
        stop = int((~mask[:rw.stop]).sum())
        _set_arg(node, rw.pos, slice(start if old.start is not None else None,
                                     stop if old.stop is not None else None, old.step))
    elif rw.kind == "value":
        _set_arg(node, rw.pos, rw.value)
    elif rw.kind == "mean":
        _mean_as_sum(gm, node, rw.value)
    elif rw.kind == "scale_rows":  # Swin-V1's q * d ** -0.5: keep the original scale
        kept = analysis.kept_count(rw.vec, removed)
        if kept < len(rw.vec):
            t = get_attr_value(gm, rw.value).detach().clone()
            t[:kept] *= (kept / len(rw.vec)) ** 0.5
            _set_tensor(gm, rw.value, t, original)
    elif rw.kind == "split":
        sizes = [analysis.kept_count(p, removed) for p in rw.pieces]
        g = gm.graph
        with g.inserting_before(node):
            new = g.call_function(torch.split, (node.args[0], sizes), {"dim": rw.dim})
        copy_meta(new, node)
        node.replace_all_uses_with(new)
        name = node.name
        g.erase_node(node)
        new._rename(name)
    else:
        raise ValueError(f"unknown rewrite {rw.kind}")


def _mean_as_sum(gm: fx.GraphModule, node: fx.Node, count: int) -> None:
    """``x.mean(dims)`` over a pruned dim -> ``x.sum(dims) / count`` (the original count)."""
    g = gm.graph
    x, dims = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    with g.inserting_before(node):
        total = g.call_function(torch.sum, (x,) if dims is None else (x, dims),
                                {} if dims is None else {"keepdim": keepdim})
        new = g.call_function(operator.truediv, (total, float(count)))
    copy_meta(total, node)
    copy_meta(new, node)
    node.replace_all_uses_with(new)
    name = node.name
    g.erase_node(node)
    new._rename(name)


def apply_removal(gm: fx.GraphModule, analysis: ChannelAnalysis, removed,
                  original: fx.GraphModule | None = None) -> int:
    """Remove the units ``removed`` (union-find roots) from ``gm`` in place; returns how many
    tensors were sliced.

    ``original``: a module ``gm`` shares submodules with (see ``fork``); those are copied
    before they change, so ``original`` stays as it was.
    """
    sliced = _slice_params(gm, analysis, removed, original)
    _fix_modules(gm, analysis, removed, original)
    by_name = {n.name: n for n in gm.graph.nodes}
    for rw in analysis.rewrites:
        node = by_name.get(rw.node)
        if node is not None:
            _apply_rewrite(gm, node, rw, analysis, removed, original)
    gm.graph.lint()
    gm.recompile()
    return sliced


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.shapes: dict[str, tuple] = {}
        self.failed: str | None = None

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception:
            self.failed = n.name
            raise
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        return out


def check_shapes(gm: fx.GraphModule, analysis: ChannelAnalysis, removed,
                 inputs: tuple) -> tuple[str, str] | None:
    """(node name, problem) of the first node the removal broke, or None when all is consistent."""
    expected: dict[str, tuple] = {}
    for n in analysis.gm.graph.nodes:
        tm = tensor_meta(n)
        if tm is None or n.op == "get_attr":
            continue  # weights are checked by the ops that read them
        shape = list(tm.shape)
        lay = analysis.layouts.get(n.name)
        if lay is not None and not lay.free:
            shape[lay.pdim] = analysis.kept_count(lay.vec, removed)
        expected[n.name] = tuple(shape)
    rec = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            rec.run(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure names the node that failed
        return rec.failed or "", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for n in gm.graph.nodes:
        got, want = rec.shapes.get(n.name), expected.get(n.name)
        if got is not None and want is not None and got != want:
            return n.name, f"shape {got}, expected {want}"
    return None


def masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, weight, bias, eps: float):
    """LayerNorm over the last dim, with statistics over the positions where ``keep`` is True."""
    k = keep.to(x.dtype)
    count = k.sum()
    mean = (x * k).sum(-1, keepdim=True) / count
    var = (((x - mean) * k) ** 2).sum(-1, keepdim=True) / count
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def masked_reference(gm: fx.GraphModule, analysis: ChannelAnalysis, removed) -> fx.GraphModule:
    """A copy of ``gm`` with every removed channel masked to zero where it is computed."""
    ref = fork(gm)  # shares the weights: the reference only adds masks and reads
    g = ref.graph
    first = next(iter(list(gm.parameters()) + list(gm.buffers())), None)
    device = first.device if first is not None else torch.device("cpu")
    by_name = {n.name: n for n in g.nodes}

    def keep_vector(lay):
        return ~analysis.removed_mask(lay.vec, removed)

    # 1. LayerNorms over the channels: statistics over the kept channels. Their inputs' names
    # are read first: a LayerNorm of a LayerNorm reads a replaced node, whose new name may not
    # be the old one (fx keeps an erased node's name taken: ``_rename`` then gives ``ln_1``).
    src_names = {name: by_name[name].args[0].name for name in analysis.norm_nodes
                 if name in by_name}
    for name, dim in analysis.norm_nodes.items():
        node = by_name.get(name)
        if node is None:
            continue
        src = node.args[0]
        lay = analysis.layouts.get(src_names[name])
        if lay is None or lay.free:
            continue
        keep = keep_vector(lay)
        if keep.all():
            continue
        if node.op == "call_module":
            mod = get_attr_value(ref, node.target)
            w = f"{node.target}.weight" if mod.weight is not None else None
            b = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
            eps = mod.eps
        else:
            w_node = node.kwargs.get("weight", node.args[2] if len(node.args) > 2 else None)
            b_node = node.kwargs.get("bias", node.args[3] if len(node.args) > 3 else None)
            w = w_node.target if isinstance(w_node, fx.Node) else None
            b = b_node.target if isinstance(b_node, fx.Node) else None
            eps = node.kwargs.get("eps", node.args[4] if len(node.args) > 4 else 1e-5)
        with g.inserting_before(node):
            kname = add_buffer(ref, "_fxopt_keep", torch.from_numpy(keep.copy()).to(device))
            k = g.get_attr(kname)
            wn = g.get_attr(w) if w else None
            bn = g.get_attr(b) if b else None
            new = g.call_function(masked_layer_norm, (src, k, wn, bn, eps))
        copy_meta(new, node)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        new._rename(name)
        by_name[name] = new
    # 2. every tensor that carries a removed channel: zero it where it is computed
    for name, lay in analysis.layouts.items():
        node = by_name.get(name)
        if node is None or lay.free or node.op == "placeholder":
            continue
        drop = analysis.removed_mask(lay.vec, removed)
        if not drop.any():
            continue
        shape = [1] * len(tensor_meta(node).shape)
        shape[lay.pdim] = len(drop)
        mname = add_buffer(ref, "_fxopt_mask",
                           torch.from_numpy(drop.copy()).reshape(shape).to(device))
        with g.inserting_after(node):
            m = g.get_attr(mname)
        with g.inserting_after(m):
            masked = g.call_method("masked_fill", (node, m, 0))
        masked.meta["tensor_meta"] = node.meta.get("tensor_meta")
        node.replace_all_uses_with(masked, delete_user_cb=lambda u: u is not masked)
    # 3. weights read inside one call (Swin's qkv): zeroed at the removed slots
    for path in analysis.walk.zeroed:
        t = get_attr_value(ref, path).detach().clone()
        for dim, vec in analysis.params.get(path, {}).items():
            drop = analysis.removed_mask(vec, removed)
            if drop.any():
                idx = torch.from_numpy(np.nonzero(drop)[0]).to(t.device)
                t.index_fill_(dim, idx, 0)
        _set_tensor(ref, path, t, gm)
    # parameters the masked LayerNorms no longer read through their modules
    g.lint()
    ref.recompile()
    return ref
