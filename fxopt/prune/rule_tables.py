"""Op tables and node helpers shared by the channel rules (``channel_rules`` and its mixins).

The tables sort torch ops into the families the rules treat alike (elementwise, spatial,
reductions, reshapes); the helpers read shapes and arguments off ``fx`` nodes. ``_Unsupported``
is what a rule raises when it cannot reason about a node.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.graph import get_attr_value, module_path, tensor_meta

__all__ = ["_UNARY_FUNCS", "_UNARY_METHODS", "_NARY_FUNCS", "_NARY_METHODS", "_SPATIAL_FUNCS",
           "_SPATIAL_MODULES", "_PASSTHROUGH_MODULES", "_REDUCE_FUNCS", "_REDUCE_METHODS",
           "_RESHAPE_FUNCS", "_RESHAPE_METHODS", "_NONTENSOR_METHODS", "_CONV_FUNCS",
           "_Unsupported", "_Named", "_shape", "_ndim", "_norm_dim", "_arg", "_arg_where",
           "_tensor_nodes", "_describe", "_target_name"]


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


class _Named:
    """A stand-in with a ``name`` for events that belong to a parameter, not a node."""

    def __init__(self, name: str):
        self.name = name

