"""Propagation rules of the channel analysis: how each op moves, unites, cuts or freezes slots.

``ChannelRules`` is mixed into ``fxopt.channels.ChannelAnalysis``; it walks the graph once, in
order, and for every node sets its ``Layout`` (``self.layouts``), records the weights each slot
indexes (``self.params``), the arguments that spell a channel count (``self.rewrites``) and the
conv/linear MACs (``self.mac_nodes``). A rule that meets something it cannot reason about raises
``_Unsupported``: the walk then freezes every slot the node reads (``_unknown``).

The rules live in two mixins: ``LayerRules`` (``channel_rules_layers``: conv, linear, norms)
and ``ShapeRules`` (``channel_rules_shapes``: elementwise, cat, split, reshapes, indexing); this
module keeps the slot bookkeeping and the dispatch. Adding an op: put it in a table in
``channel_rule_tables`` when it behaves like one already there (elementwise, spatial,
reduction, reshape), or give it a method in a mixin and a branch in ``_visit``.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.canonical import activation_of
from fxopt.ir.graph import get_attr_value, module_path, tensor_meta
from fxopt.prune.records import FREE, Layout, Space
from fxopt.prune.rule_tables import (
    _CONV_FUNCS,
    _NARY_FUNCS,
    _NARY_METHODS,
    _PASSTHROUGH_MODULES,
    _REDUCE_FUNCS,
    _REDUCE_METHODS,
    _RESHAPE_FUNCS,
    _RESHAPE_METHODS,
    _SPATIAL_FUNCS,
    _SPATIAL_MODULES,
    _UNARY_FUNCS,
    _UNARY_METHODS,
    _arg,
    _arg_where,
    _describe,
    _Named,
    _target_name,
    _tensor_nodes,
    _Unsupported,
)
from fxopt.prune.rules_layers import LayerRules
from fxopt.prune.rules_shapes import ShapeRules, segment_of

__all__ = ["ChannelRules", "segment_of"]


class ChannelRules(LayerRules, ShapeRules):
    """The op-by-op rules (a mixin: the state lives in ``ChannelAnalysis``).

    This class holds the slot bookkeeping and the dispatch (``_visit``, ``_module``); the rules
    themselves live in ``LayerRules`` (``channel_rules_layers``) and ``ShapeRules``
    (``channel_rules_shapes``), the op tables in ``channel_rule_tables``.
    """

    # -- slots and layouts ----------------------------------------------------------------
    def _fresh(self, n: fx.Node, size: int, kind: str, path: str | None = None) -> np.ndarray:
        slots = self.uf.new(size)
        self.spaces.append(Space(len(self.spaces), kind, n.name,
                                 path if path is not None else (module_path(n) or n.name),
                                 size, int(slots[0]) if size else len(self.uf.parent)))
        return slots

    def layout(self, a) -> Layout:
        if not isinstance(a, fx.Node):
            return FREE
        return self.layouts.get(a.name, FREE)

    def _set(self, n: fx.Node, lay: Layout) -> None:
        if lay.pdim is not None and (lay.vec is None or not (lay.vec >= 0).any()):
            lay = FREE
        self.layouts[n.name] = lay

    def _freeze(self, lay: Layout, reason: str) -> None:
        if lay is not None and lay.vec is not None:
            self.uf.freeze(lay.vec, reason)

    def _freeze_args(self, args, reason: str) -> None:
        for a in _tensor_nodes(args):
            self._freeze(self.layout(a), reason)
            for lay in self.tuple_layouts.get(a.name, ()):
                self._freeze(lay, reason)

    def _event(self, kind: str, n: fx.Node, slots: np.ndarray) -> None:
        slots = np.asarray(slots)
        slots = slots[slots >= 0]
        if len(slots):
            self.events.append((kind, n.name, slots))

    def _param(self, path: str, dim: int, vec: np.ndarray, role: str, owner: str) -> None:
        dims = self.params.setdefault(path, {})
        self.param_roles.setdefault(path, role)
        self.param_owner.setdefault(path, owner)
        if dim in dims:
            old = dims[dim]
            if len(old) != len(vec):
                raise _Unsupported(f"parameter '{path}' is used with {len(old)} and {len(vec)} "
                                   f"channels along dim {dim}")
            self.uf.union_vectors(old, vec)
            self._event("shared", _Named(path), vec)
        else:
            dims[dim] = vec

    def _channel_vector(self, n: fx.Node, x, dim: int, size: int) -> np.ndarray:
        """Slots of ``x`` along ``dim`` (which ``n`` reads as channels); -1s if none can go."""
        lay = self.layout(x)
        if lay.free:
            return np.full(size, -1, dtype=np.int64)
        if lay.pdim != dim or len(lay.vec) != size:
            self._freeze(lay, f"{_describe(n)} reads channels along another dim")
            return np.full(size, -1, dtype=np.int64)
        return lay.vec

    # -- the walk -------------------------------------------------------------------------
    def _run(self) -> None:
        for n in self.gm.graph.nodes:
            try:
                self._visit(n)
            except _Unsupported as e:
                self._unknown(n, str(e))
            except Exception as e:  # noqa: BLE001 - a rule that trips freezes, never raises
                self._unknown(n, f"the analysis failed here ({type(e).__name__}: {e})")

    def _unknown(self, n: fx.Node, why: str = "") -> None:
        name = _target_name(n, self.gm) if n.op in ("call_module", "call_function",
                                                    "call_method") else n.op
        self.unknown_ops[name] = self.unknown_ops.get(name, 0) + 1
        reason = f"unsupported op {name} at {_describe(n)}" + (f": {why}" if why else "")
        self._freeze_args((n.args, n.kwargs), reason)
        for sp in self.spaces:  # slots a rule made for this node before it gave up
            if sp.node == n.name:
                self.uf.freeze(np.arange(sp.start, sp.start + sp.size), reason)
        self.layouts[n.name] = FREE
        if isinstance(tensor_meta(n), tuple) or isinstance(n.meta.get("tensor_meta"), tuple):
            self.tuple_layouts[n.name] = [FREE] * len(n.meta["tensor_meta"])

    def _visit(self, n: fx.Node) -> None:
        if n.op == "placeholder":
            self.layouts[n.name] = FREE
            return
        if n.op == "get_attr":
            return  # a constant gets slots when an elementwise op needs them (_elementwise)
        if n.op == "output":
            self._freeze_args(n.args, "reaches the model output")
            return
        meta = n.meta.get("tensor_meta")
        if n.op == "call_module":
            self._module(n, get_attr_value(self.gm, n.target))
            return
        t = n.target
        is_fn = n.op == "call_function"
        if t is operator.getitem:
            self._getitem(n)
            return
        if meta is None or (not hasattr(meta, "shape") and not isinstance(meta, tuple)):
            # sizes, dims, python numbers: computed at run time from the (pruned) shapes; a
            # value that must not change with them shows up in the pruner's shape check
            return
        if activation_of(n) is not None or (is_fn and t in _UNARY_FUNCS) or \
                (not is_fn and t in _UNARY_METHODS):
            self._passthrough(n, n.args[0])
        elif is_fn and t in _NARY_FUNCS or not is_fn and t in _NARY_METHODS:
            kind = _NARY_FUNCS[t] if is_fn else _NARY_METHODS[t]
            self._elementwise(n, list(n.args) + list(n.kwargs.values()), kind)
        elif is_fn and t in _SPATIAL_FUNCS:
            self._spatial(n, n.args[0])
        elif is_fn and t is F.pad:
            self._pad(n)
        elif is_fn and t in _REDUCE_FUNCS or not is_fn and t in _REDUCE_METHODS:
            self._reduce(n, _REDUCE_FUNCS[t] if is_fn else _REDUCE_METHODS[t],
                         dims=_arg(n, 2, "dim", 1) if t is F.normalize else None)
        elif is_fn and t in _RESHAPE_FUNCS or not is_fn and t in _RESHAPE_METHODS:
            self._reshape(n)
        elif (is_fn and t in (torch.permute, torch.transpose, torch.swapaxes, torch.t)) or \
                (not is_fn and t in ("permute", "transpose", "swapaxes", "t")):
            self._permute(n)
        elif not is_fn and t == "expand":
            self._expand(n)
        elif is_fn and t in (torch.cat, torch.concat, torch.concatenate):
            self._cat(n)
        elif is_fn and t in (torch.split, torch.chunk) or not is_fn and t in ("split", "chunk"):
            self._split(n)
        elif is_fn and t in _CONV_FUNCS:
            self._conv_functional(n)
        elif is_fn and t is F.linear:
            self._linear_functional(n)
        elif is_fn and t is F.layer_norm:
            self._layer_norm(n, n.args[0], _arg(n, 1, "normalized_shape"),
                             self._param_node(n, 2, "weight"), self._param_node(n, 3, "bias"),
                             _arg_where(n, 1, "normalized_shape"))
        elif is_fn and t is F.group_norm:
            self._group_norm(n, n.args[0], _arg(n, 1, "num_groups"),
                             self._param_node(n, 2, "weight"), self._param_node(n, 3, "bias"),
                             _arg_where(n, 1, "num_groups"))
        elif is_fn and t is F.batch_norm:
            self._batch_norm_functional(n)
        else:
            raise _Unsupported("")

    # -- modules --------------------------------------------------------------------------
    def _module(self, n: fx.Node, mod: nn.Module) -> None:
        path = n.target
        x = n.args[0] if n.args else None
        if len(n.args) != 1 or n.kwargs:
            raise _Unsupported("called with several inputs")
        if isinstance(mod, nn.modules.conv._ConvNd):
            self._conv(n, x, mod.in_channels, mod.out_channels, mod.groups, mod.transposed,
                       f"{path}.weight", f"{path}.bias" if mod.bias is not None else None, path)
            self.module_fixes[path] = ("conv", n.name)
        elif isinstance(mod, nn.Linear):
            self._linear(n, x, mod.in_features, mod.out_features, f"{path}.weight",
                         f"{path}.bias" if mod.bias is not None else None, path)
            self.module_fixes[path] = ("linear", n.name)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) or \
                isinstance(mod, nn.modules.instancenorm._InstanceNorm):
            names = [f"{path}.{k}" for k in ("weight", "bias", "running_mean", "running_var")
                     if getattr(mod, k, None) is not None]
            self._per_channel(n, x, 1, names, path)
            self.module_fixes[path] = ("bn", n.name)
        elif isinstance(mod, nn.LayerNorm):
            w = f"{path}.weight" if mod.weight is not None else None
            b = f"{path}.bias" if getattr(mod, "bias", None) is not None else None
            self._layer_norm(n, x, mod.normalized_shape, w, b, None)
            self.module_fixes[path] = ("layer_norm", n.name)
        elif isinstance(mod, nn.GroupNorm):
            w = f"{path}.weight" if mod.weight is not None else None
            b = f"{path}.bias" if mod.bias is not None else None
            self._group_norm(n, x, mod.num_groups, w, b, None)
            self.module_fixes[path] = ("group_norm", n.name)
        elif isinstance(mod, nn.PReLU):
            if mod.num_parameters == 1:
                self._passthrough(n, x)
            else:
                self._per_channel(n, x, 1, [f"{path}.weight"], path)
                self.module_fixes[path] = ("prelu", n.name)
        elif isinstance(mod, _PASSTHROUGH_MODULES):
            self._passthrough(n, x)
        elif isinstance(mod, _SPATIAL_MODULES):
            if getattr(mod, "return_indices", False):
                raise _Unsupported("pooling that returns indices")
            self._spatial(n, x)
        elif isinstance(mod, nn.Flatten):
            self._reshape(n)
        elif isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            self._reduce(n, "along", dims=mod.dim)
        else:
            raise _Unsupported("")
