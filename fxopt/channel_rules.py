"""Propagation rules of the channel analysis: how each op moves, unites, cuts or freezes slots.

``ChannelRules`` is mixed into ``fxopt.channels.ChannelAnalysis``; it walks the graph once, in
order, and for every node sets its ``Layout`` (``self.layouts``), records the weights each slot
indexes (``self.params``), the arguments that spell a channel count (``self.rewrites``) and the
conv/linear MACs (``self.mac_nodes``). A rule that meets something it cannot reason about raises
``_Unsupported``: the walk then freezes every slot the node reads (``_unknown``).

Adding an op: put it in a table below when it behaves like one already there (elementwise,
spatial, reduction, reshape), or give it a method and a branch in ``_visit``.
"""
from __future__ import annotations

import operator
from typing import Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .canonical import activation_of
from .channel_records import FREE, Layout, MacNode, Rewrite, Space
from .graph_utils import get_attr_value, module_path, tensor_meta

__all__ = ["ChannelRules", "segment_of"]

# -- op tables --------------------------------------------------------------------------------
def _stochastic_depth():
    try:
        from torchvision.ops import stochastic_depth
        return stochastic_depth
    except Exception:  # noqa: BLE001 - torchvision is optional
        return None


_UNARY_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                F.feature_alpha_dropout, torch.clamp, torch.clip, torch.exp, torch.log,
                torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.erf, torch.square,
                torch.reciprocal, torch.sign, operator.neg, F.softplus, F.softsign, F.tanhshrink,
                F.hardshrink, F.softshrink, F.logsigmoid, F.selu, F.celu, F.rrelu, F.threshold,
                torch.nan_to_num}
_SD = _stochastic_depth()
if _SD is not None:
    _UNARY_FUNCS.add(_SD)
_UNARY_METHODS = {"contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to",
                  "type", "type_as", "exp", "log", "abs", "neg", "sqrt", "rsqrt", "sigmoid",
                  "tanh", "relu", "clamp", "clip", "square", "reciprocal", "sign", "erf",
                  "cpu", "cuda", "requires_grad_", "nan_to_num"}
_NARY_FUNCS = {operator.add: "residual", operator.sub: "residual", operator.mul: "channel-mul",
               operator.truediv: "channel-mul", operator.pow: "elementwise",
               torch.add: "residual", torch.sub: "residual", torch.mul: "channel-mul",
               torch.div: "channel-mul", torch.true_divide: "channel-mul",
               torch.pow: "elementwise", torch.maximum: "elementwise",
               torch.minimum: "elementwise", torch.where: "elementwise",
               torch.eq: "elementwise", torch.ne: "elementwise", torch.gt: "elementwise",
               torch.lt: "elementwise", torch.ge: "elementwise", torch.le: "elementwise",
               torch.lerp: "elementwise", torch.addcmul: "elementwise",
               torch.addcdiv: "elementwise"}
_NARY_METHODS = {"add": "residual", "sub": "residual", "mul": "channel-mul",
                 "div": "channel-mul", "pow": "elementwise", "maximum": "elementwise",
                 "minimum": "elementwise", "masked_fill": "elementwise", "where": "elementwise",
                 "lerp": "elementwise"}
_SPATIAL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                  F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                  F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                  F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample,
                  F.upsample_nearest, F.upsample_bilinear}
_SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                    nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
                    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
                    nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
_PASSTHROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                        nn.AlphaDropout, nn.FeatureAlphaDropout, nn.ReLU, nn.ReLU6,
                        nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
                        nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
                        nn.SELU, nn.CELU)
_REDUCE_FUNCS = {torch.mean: "reduce", torch.sum: "reduce", torch.amax: "reduce",
                 torch.amin: "reduce", torch.std: "reduce", torch.var: "reduce",
                 torch.logsumexp: "reduce", torch.prod: "reduce", F.softmax: "along",
                 F.log_softmax: "along", torch.softmax: "along", torch.log_softmax: "along",
                 torch.cumsum: "along", F.normalize: "along"}
_REDUCE_METHODS = {"mean": "reduce", "sum": "reduce", "amax": "reduce", "amin": "reduce",
                   "std": "reduce", "var": "reduce", "logsumexp": "reduce", "prod": "reduce",
                   "softmax": "along", "log_softmax": "along", "cumsum": "along"}
_RESHAPE_FUNCS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten",
                    "view_as", "reshape_as"}
_NONTENSOR_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "element_size",
                      "is_contiguous", "stride", "get_device", "is_floating_point"}
_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


class _Unsupported(Exception):
    pass


def _shape(node) -> tuple | None:
    tm = tensor_meta(node)
    return tuple(tm.shape) if tm is not None else None


def _ndim(node) -> int:
    s = _shape(node)
    return len(s) if s is not None else 0


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg(n: fx.Node, pos: int, name: str, default=None):
    if len(n.args) > pos:
        return n.args[pos]
    return n.kwargs.get(name, default)


def _arg_where(n: fx.Node, pos: int, name: str) -> tuple:
    return (pos,) if len(n.args) > pos else (name,)


def _tensor_nodes(args) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def _describe(n: fx.Node) -> str:
    path = module_path(n)
    return f"'{n.name}'" + (f" ({path})" if path else "")


def _target_name(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "call_module":
        return type(get_attr_value(gm, n.target)).__name__
    t = n.target
    if isinstance(t, str):
        return f"Tensor.{t}"
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", str(t))
    return f"{mod.replace('torch._C._nn', 'F').replace('torch.nn.functional', 'F')}.{name}" \
        if mod else name



class ChannelRules:
    """The op-by-op rules (a mixin: the state lives in ``ChannelAnalysis``)."""

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

    def _param_node(self, n: fx.Node, pos: int, name: str) -> str | None:
        a = _arg(n, pos, name)
        if a is None:
            return None
        if not isinstance(a, fx.Node) or a.op != "get_attr" or len(a.users) != 1:
            raise _Unsupported(f"its {name} is computed, or shared with another op")
        return a.target

    # -- layers ---------------------------------------------------------------------------
    def _conv(self, n, x, cin, cout, groups, transposed, wpath, bpath, owner) -> None:
        vin = self._channel_vector(n, x, 1, cin)
        out = self._fresh(n, cout, "conv", owner)
        if transposed:
            if groups != 1:
                raise _Unsupported("grouped transposed convolution")
            self._param(wpath, 0, vin, "weight", owner)
            self._param(wpath, 1, out, "weight", owner)
        else:
            self._param(wpath, 0, out, "weight", owner)
            if groups == 1:
                self._param(wpath, 1, vin, "weight", owner)
            else:
                a, b = cin // groups, cout // groups
                for j in range(groups):
                    blk = np.concatenate([vin[j * a:(j + 1) * a], out[j * b:(j + 1) * b]])
                    if (vin[j * a:(j + 1) * a] < 0).any():
                        self.uf.freeze(blk, f"grouped conv {_describe(n)} reads a model input")
                    self.uf.unite_all(blk)
                self._event("depthwise" if a == 1 and b == 1 else "grouped", n,
                            np.concatenate([vin, out]))
        if bpath is not None:
            self._param(bpath, 0, out, "bias", owner)
        self._set(n, Layout(1, out))
        self.mac_nodes.append(MacNode(n.name, self._macs(n), out,
                                      vin if groups == 1 else None))

    def _linear(self, n, x, fin, fout, wpath, bpath, owner) -> None:
        nd = _ndim(n)
        lay = self.layout(x)
        if not lay.free and lay.pdim != nd - 1:
            self._freeze(lay, f"{_describe(n)} is applied along another dim")
            vin = np.full(fin, -1, dtype=np.int64)
        else:
            vin = self._channel_vector(n, x, nd - 1, fin)
        out = self._fresh(n, fout, "linear", owner)
        self._param(wpath, 0, out, "weight", owner)
        self._param(wpath, 1, vin, "weight", owner)
        if bpath is not None:
            self._param(bpath, 0, out, "bias", owner)
        self._set(n, Layout(nd - 1, out))
        self.mac_nodes.append(MacNode(n.name, self._macs(n), out, vin))

    def _conv_functional(self, n: fx.Node) -> None:
        w = self._param_node(n, 1, "weight")
        b = self._param_node(n, 2, "bias")
        groups = _arg(n, 6, "groups", 1)
        if w is None or not isinstance(groups, int):
            raise _Unsupported("")
        ws = tuple(get_attr_value(self.gm, w).shape)
        cout, cin = ws[0], ws[1] * groups
        self._conv(n, n.args[0], cin, cout, groups, False, w, b, module_path(n) or n.name)
        if groups > 1:
            self.rewrites.append(Rewrite("groups", n.name, _arg_where(n, 6, "groups"),
                                         vec=self.layouts[n.name].vec, block=cout // groups))

    def _linear_functional(self, n: fx.Node) -> None:
        w = self._param_node(n, 1, "weight")
        b = self._param_node(n, 2, "bias")
        if w is None:
            raise _Unsupported("")
        fout, fin = tuple(get_attr_value(self.gm, w).shape)
        self._linear(n, n.args[0], fin, fout, w, b, module_path(n) or n.name)

    def _per_channel(self, n, x, dim: int, paths: Sequence[str], owner: str) -> None:
        """BatchNorm-like: parameters indexed by the channels along ``dim``."""
        lay = self.layout(x)
        if not lay.free and lay.pdim == dim:
            for p in paths:
                role = "stat" if p.endswith(("running_mean", "running_var")) else (
                    "bn_weight" if p.endswith("weight") else "bias")
                self._param(p, 0, lay.vec, role, owner)
        self._set(n, lay)

    def _batch_norm_functional(self, n: fx.Node) -> None:
        names = [self._param_node(n, i, k) for i, k in
                 ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
        self._per_channel(n, n.args[0], 1, [p for p in names if p], module_path(n) or n.name)

    def _layer_norm(self, n, x, normalized_shape, w, b, pos) -> None:
        lay = self.layout(x)
        nd = _ndim(n)
        ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if lay.free or lay.pdim < nd - len(ns):
            self._set(n, lay)  # normalizes over dims that keep their size
            return
        if len(ns) != 1:
            self._freeze(lay, f"LayerNorm {_describe(n)} normalizes over channels and more")
            self._set(n, lay)
            return
        owner = module_path(n) or n.name
        for p, role in ((w, "norm_weight"), (b, "bias")):
            if p is not None:
                self._param(p, 0, lay.vec, role, owner)
        self.norm_nodes[n.name] = nd - 1
        self._event("norm", n, lay.vec)
        if pos is not None:
            self.rewrites.append(Rewrite("norm_shape", n.name, pos, vec=lay.vec))
        self._set(n, lay)

    def _group_norm(self, n, x, num_groups, w, b, pos) -> None:
        lay = self.layout(x)
        if lay.free:
            self._set(n, lay)
            return
        if lay.pdim != 1 or not isinstance(num_groups, int):
            self._freeze(lay, f"GroupNorm {_describe(n)} over a dim that shrinks")
            self._set(n, lay)
            return
        c = len(lay.vec)
        blk = c // num_groups
        for j in range(num_groups):
            self.uf.unite_all(lay.vec[j * blk:(j + 1) * blk])
        owner = module_path(n) or n.name
        for p, role in ((w, "norm_weight"), (b, "bias")):
            if p is not None:
                self._param(p, 0, lay.vec, role, owner)
        self._event("norm", n, lay.vec)
        if pos is not None:
            self.rewrites.append(Rewrite("groups", n.name, pos, vec=lay.vec, block=blk))
        self._set(n, lay)

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

    # -- finishing --------------------------------------------------------------------------
    def _macs(self, n: fx.Node) -> int:
        from .metrics import node_macs

        try:
            return int(node_macs(n, self.gm))
        except Exception:  # noqa: BLE001 - MACs are an estimate; a missing shape counts 0
            return 0


class _Named:
    """A stand-in with a ``name`` for events that belong to a parameter, not a node."""

    def __init__(self, name: str):
        self.name = name


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
