"""``fold_bn``: fold BatchNorm into the convolution or linear layer that feeds it.

In eval mode BatchNorm is a per-channel affine map, so it folds into the layer before it::

    s  = gamma / sqrt(running_var + eps)          (per output channel, in float64)
    W' = W * s                                    (over the output-channel axis of W)
    b' = (b - running_mean) * s + beta

Rules (``RULES``): ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (any groups) or ``Linear`` (2-D
output only: BatchNorm1d on [N, L, C] normalizes L, not the features), or a
``torch.conv1d/2d/3d`` / ``F.linear`` call whose weight and bias are graph constants (rules
``fn_layer_*``: the call is kept, on new folded constants), followed by a
``BatchNorm1d/2d/3d``/``SyncBatchNorm`` module or by ``F.batch_norm`` whose statistics and
affine parameters are graph constants. A flatten between a ``Linear`` and its BN (LeViT's
``LinearNorm``: ``bn(linear(x).flatten(0, 1)).reshape_as(...)``; rules ``*_flat_*``) is kept,
on the folded output, when it leaves a 2-D ``[M, C]`` whose ``C`` is the linear's features:
flatten keeps the memory order, so the BN's channel ``c`` is feature ``c``.
Stride, dilation, groups, padding and padding mode stay
as they were (the folded layer is a copy of the old one with new weight and bias); BN without
affine parameters folds with gamma = 1, beta = 0.

Never silently wrong:
- a layer whose output has another user besides the BN is left alone (folding would change
  what that user sees; a second convolution would cost more than the BN): a note says so.
  Users that read only its shape, rank, dtype or device (``x.shape``, ``x.size(1)``,
  ``getattr(x, "ndim")`` of timm's ``_assert``; ``fxopt.ir.graph.is_shape_read``) are not in
  the way: the folded layer's output has the same ``tensor_meta``, so they read it instead (the
  folded call takes the layer's place in the graph, before them);
- a layer module called at more than one site (pytorch issue 104593, where
  ``torch.fx.experimental.optimization.fuse`` folds one site's BN into every site) is folded
  into a private copy for that site; the note names it and what it costs (the copy's
  parameters: speed is bought with size here). When the last site folds, the folded copy takes
  the module's own path;
- BN in training mode, or without running statistics, is left alone with a note.

An identity branch's BN (RepVGG: ``conv3x3(x) + conv1x1(x) + bn(x)``, each conv's own BN
folded first) folds into the centre tap of a conv summed with it that maps ``x`` to its own
shape (stride 1, dilation 1, odd kernel with padding k // 2, C_in == C_out, groups 1 or C, one
call site): ``W'[c, c, k//2, k//2] += s[c]`` (``[c, 0, ...]`` depthwise) and ``b' += t``, where
``bn(x) = s x + t``, and the add is dropped. The centre tap of such a conv reads ``x`` at the
output's own position, so this is exact; the conv becomes a new module (its old weights are not
written). Stats: ``identity_folded``.

The old layer and BN parameters are deleted: parameters and bytes drop (except for private
copies, above).

    >>> fold_bn(gm, ctx).stats
    {'folded': 20, 'private_copies': 0, 'left': 0}
"""
from __future__ import annotations

import copy
import inspect
import operator
import numbers
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.infra.preconditions import EVAL_MODE
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.infra.rewrite import Builder, Match, Rule, apply_rules, call, module, op
from fxopt.ir.graph import (add_buffer, copy_meta, get_attr_value, is_shape_read,
                            remove_unused_attributes, tensor_meta)
from fxopt.ir.share import copy_sharing_tensors

__all__ = ["fold_bn", "RULES", "fold_weights", "LAYER_TYPES", "CONV_TYPES", "BN_TYPES"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = CONV_TYPES + TRANSPOSED_TYPES + (nn.Linear,)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

_layer = module("layer", *LAYER_TYPES)
_bn_module = module("bn", *BN_TYPES)
# conv/linear calls whose weight and bias are graph constants (torch.export's inlined leaves,
# timm's computed weights once folded): folded into new constants
_layer_fn = call("layer", torch.conv1d, torch.conv2d, torch.conv3d, F.linear)
_bn_function = call("bn", F.batch_norm)
_flat = op("flat", torch.flatten, "flatten", nn.Flatten)
_BN_SIGNATURE = inspect.signature(F.batch_norm)


@dataclass
class BNStats:
    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    eps: float
    label: str  # the BN's module path or node name, for notes


def _affine(bn: BNStats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` in float64 with ``bn(x) = s * x + t`` per channel (eval mode)."""
    scale = torch.rsqrt(bn.var.detach().to(torch.float64) + bn.eps)
    if bn.gamma is not None:
        scale = scale * bn.gamma.detach().to(torch.float64)
    shift = -bn.mean.detach().to(torch.float64) * scale
    if bn.beta is not None:
        shift = shift + bn.beta.detach().to(torch.float64)
    return scale, shift


def fold_weights(weight: torch.Tensor, bias: torch.Tensor | None, bn: BNStats, *,
                 transposed: bool = False, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of a layer with ``weight``/``bias`` followed by ``bn``, in the weight's dtype.

    Output channels are axis 0 of a conv or linear weight [C_out, C_in/g, *k]; a transposed
    conv weight is [C_in, C_out/g, *k], so its output channel ``c`` is group ``c // (C_out/g)``,
    column ``c % (C_out/g)``.
    """
    # Per-channel factors in float64; the weight itself is scaled in (at least) float32: one
    # rounding of the product either way, and a tenth of the time on big models.
    scale, shift = _affine(bn)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work)
    scale_w = scale.to(work)
    k = (1,) * (w.dim() - 2)
    if transposed:
        c_in, c_out_g = w.shape[0], w.shape[1]
        w = (w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])
             * scale_w.reshape(groups, 1, c_out_g, *k)).reshape(weight.shape)
    else:
        w = w * scale_w.reshape(-1, *((1,) * (w.dim() - 1)))
    b = shift if bias is None else bias.detach().to(torch.float64) * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def _constant(gm: fx.GraphModule, arg) -> tuple[bool, torch.Tensor | None]:
    """(ok, value) for an F.batch_norm argument that must be a graph constant or None."""
    if arg is None:
        return True, None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = get_attr_value(gm, arg.target)
        if isinstance(value, torch.Tensor):
            return True, value
    return False, None


def _bn_stats(m: Match) -> BNStats | str:
    """The BN's statistics, or why it cannot be folded."""
    node = m.nodes["bn"]
    if node.op == "call_module":
        bn = m.module("bn")
        label = f"BatchNorm '{node.target}'"
        if len(node.args) != 1 or node.kwargs:
            return f"{label} is called with extra arguments: left alone"
        if bn.training:
            return f"{label} is in training mode (it normalizes with batch statistics): left alone"
        if bn.running_mean is None or bn.running_var is None:
            return (f"{label} has no running statistics (track_running_stats=False), so it "
                    f"normalizes with batch statistics: left alone")
        affine = bn.affine
        return BNStats(bn.running_mean, bn.running_var, bn.weight if affine else None,
                       bn.bias if affine else None, float(bn.eps), node.target)
    label = f"F.batch_norm '{node.name}'"
    try:
        bound = _BN_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return f"{label} has arguments fxopt cannot read: left alone"
    bound.apply_defaults()
    a = bound.arguments
    if a["training"] is not False:
        return f"{label} runs in training mode (training={a['training']}): left alone"
    if not isinstance(a["eps"], numbers.Real) or isinstance(a["eps"], bool):
        return f"{label}: eps is not a constant: left alone"
    if not isinstance(a["momentum"], (numbers.Real, type(None))):
        return f"{label}: momentum is not a constant: left alone"
    values = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        ok, values[key] = _constant(m.gm, a[key])
        if not ok:
            return f"{label}: {key} is computed in the graph, not a constant: left alone"
    if values["running_mean"] is None or values["running_var"] is None:
        return f"{label} has no running statistics: left alone"
    return BNStats(values["running_mean"], values["running_var"], values["weight"], values["bias"],
                   float(a["eps"]), node.name)


def _fn_weights(m: Match) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """(weight, bias) values of a functional conv/linear whose weight and bias are graph
    constants, or why not."""
    node = m.nodes["layer"]
    names = ("input", "weight", "bias")
    a = {"bias": None, **dict(zip(names, node.args)), **node.kwargs}
    if len(node.args) < 2 or set(node.kwargs) - {"bias", "stride", "padding", "dilation",
                                                 "groups"}:
        return f"'{node.name}' has arguments fxopt cannot read"
    values = []
    for key in ("weight", "bias"):
        ok, value = _constant(m.gm, a[key])
        if not ok or (key == "weight" and value is None):
            return f"'{node.name}': its {key} is computed in the graph, not a constant"
        values.append(value)
    return values[0], values[1]


def _check(m: Match) -> bool:
    layer_node, bn_node = m.nodes["layer"], m.nodes["bn"]
    stats = _bn_stats(m)
    if isinstance(stats, str):
        return m.reject(stats)
    if layer_node.op == "call_function":
        found = _fn_weights(m)
        if isinstance(found, str):
            return m.reject(f"{found}: '{stats.label}' left unfolded")
        m.data["fn_weights"] = found
        is_linear = layer_node.target is F.linear
    else:
        is_linear = isinstance(m.module("layer"), nn.Linear)
    where = layer_node.target if layer_node.op == "call_module" else layer_node.name
    flat = m.nodes.get("flat")
    for value in (layer_node, flat) if flat is not None else (layer_node,):
        others = [u.name for u in value.users
                  if u not in (bn_node, flat) and not is_shape_read(u, value)]
        if others:
            return m.reject(f"'{value.name}' output is also used by {', '.join(others)}: "
                            f"'{stats.label}' left unfolded (folding would change what they "
                            f"see)")
    tm = tensor_meta(layer_node)
    if tm is None or not tm.dtype.is_floating_point:
        return m.reject(f"'{where}' has no floating-point output metadata: "
                        f"'{stats.label}' left unfolded")
    if flat is not None:
        flat_tm = tensor_meta(flat)
        if not is_linear or flat_tm is None or len(flat_tm.shape) != 2 or \
                flat_tm.shape[1] != tm.shape[-1]:
            return m.reject(f"'{stats.label}' after '{where}' and flatten '{flat.name}': only "
                            f"a Linear flattened to [M, features] folds: left unfolded")
        tm = flat_tm
    elif is_linear and len(tm.shape) != 2:
        return m.reject(f"'{stats.label}' after Linear '{where}' on a "
                        f"{len(tm.shape)}-D output normalizes dim 1, not the features: left "
                        f"unfolded")
    channels = tm.shape[1]
    if stats.mean.numel() != channels or stats.var.numel() != channels or any(
            t is not None and t.numel() != channels for t in (stats.gamma, stats.beta)):
        return m.reject(f"'{stats.label}' statistics do not match the {channels} channels of "
                        f"'{where}': left unfolded")
    m.data["stats"] = stats
    return True


def _call_sites(gm: fx.GraphModule, layer: nn.Module, path: str) -> int:
    """How many graph nodes use ``layer`` (calls of it, reads of its attributes)."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and get_attr_value(gm, node.target) is layer:
            n += 1
        elif node.op == "get_attr" and (node.target == path or node.target.startswith(path + ".")):
            n += 1
    return n


def _folded_copy(layer: nn.Module, stats: BNStats) -> nn.Module:
    transposed = isinstance(layer, TRANSPOSED_TYPES)
    groups = getattr(layer, "groups", 1)
    w, b = fold_weights(layer.weight, layer.bias, stats, transposed=transposed, groups=groups)
    requires_grad = layer.weight.requires_grad
    weight = nn.Parameter(w, requires_grad=requires_grad)
    bias = nn.Parameter(b, requires_grad=requires_grad)
    # A copy keeps every setting (stride, padding, padding_mode, output_padding, ...); the memo
    # hands it the new tensors in place of the old ones, which are never copied.
    memo = {id(layer.weight): weight}
    if layer.bias is not None:
        memo[id(layer.bias)] = bias
    new = copy.deepcopy(layer, memo)
    new.bias = bias
    return new


def _replace_fn(m: Match, b: Builder) -> fx.Node:
    """A functional conv/linear with constant weight and bias: the same call on new folded
    constants."""
    layer_node = m.nodes["layer"]
    weight, bias = m.data["fn_weights"]
    stats: BNStats = m.data["stats"]
    groups = layer_node.kwargs.get("groups", layer_node.args[6] if len(layer_node.args) > 6
                                   else 1)
    w, bias_new = fold_weights(weight, bias, stats, groups=groups)
    prefix = (layer_node.args[1].target.replace(".", "_") if isinstance(
        layer_node.args[1], fx.Node) else layer_node.name) + "_bn"
    w_node = b.get_attr(add_buffer(m.gm, prefix, w))
    b_node = b.get_attr(add_buffer(m.gm, prefix, bias_new))
    kwargs = {k: v for k, v in layer_node.kwargs.items() if k != "bias"}
    args = (layer_node.args[0], w_node, b_node) + tuple(layer_node.args[3:])
    new = b.call_function(layer_node.target, args, kwargs, name=f"{layer_node.name}_bn")
    _move_readers(m, new)
    return new


def _move_readers(m: Match, new: fx.Node) -> None:
    """The layer's shape reads (checked) read the folded output, so it moves up to them."""
    layer_node = m.nodes["layer"]
    readers = [u for u in layer_node.users if u not in (m.nodes["bn"], m.nodes.get("flat"))]
    if readers:
        layer_node.append(new)
        for user in readers:
            user.replace_input_with(layer_node, new)


def _replace(m: Match, b: Builder) -> fx.Node:
    layer_node = m.nodes["layer"]
    if layer_node.op == "call_function":
        return _replace_fn(m, b)
    layer = m.module("layer")
    stats: BNStats = m.data["stats"]
    folded = _folded_copy(layer, stats)
    path = layer_node.target
    if _call_sites(m.gm, layer, path) == 1:
        target = b.add_module(path, folded, replace=True)
    else:
        leaf = stats.label.rpartition(".")[2]
        target = b.add_module(f"{path}_{leaf}", folded)
        b.tally("private_copies")
        extra = sum(p.numel() for p in folded.parameters())
        b.note(f"'{path}' is used at more than one site: folded '{stats.label}' into a private "
               f"copy '{target}' for the call '{layer_node.name}' ({extra} more parameters, "
               f"one BN less)")
    new = b.call_module(target, layer_node.args, layer_node.kwargs, name=f"{layer_node.name}_bn")
    _move_readers(m, new)
    return new


def _replace_flat(m: Match, b: Builder) -> fx.Node:
    """Linear, flatten, BN: the folded linear, then the same flatten on its output."""
    layer_node, flat = m.nodes["layer"], m.nodes["flat"]
    new_layer = copy_meta(_replace(m, b), layer_node)
    args = (new_layer,) + tuple(flat.args[1:])
    make = {"call_function": b.call_function, "call_method": b.call_method,
            "call_module": b.call_module}[flat.op]
    return make(flat.target, args, flat.kwargs)


RULES = [
    Rule("layer_bn", lambda x: _bn_module(_layer(x)), _replace, _check, allow_external_users=True),
    Rule("layer_batch_norm", lambda x: _bn_function(_layer(x)), _replace, _check,
         allow_external_users=True),
    Rule("fn_layer_bn", lambda x: _bn_module(_layer_fn(x)), _replace, _check,
         allow_external_users=True),
    Rule("fn_layer_batch_norm", lambda x: _bn_function(_layer_fn(x)), _replace, _check,
         allow_external_users=True),
    Rule("layer_flat_bn", lambda x: _bn_module(_flat(_layer(x))), _replace_flat, _check,
         allow_external_users=True),
    Rule("layer_flat_batch_norm", lambda x: _bn_function(_flat(_layer(x))), _replace_flat,
         _check, allow_external_users=True),
    Rule("fn_layer_flat_bn", lambda x: _bn_module(_flat(_layer_fn(x))), _replace_flat, _check,
         allow_external_users=True),
    Rule("fn_layer_flat_batch_norm", lambda x: _bn_function(_flat(_layer_fn(x))), _replace_flat,
         _check, allow_external_users=True),
]


# -- an identity branch's BN beside a conv of the same input (RepVGG) --------------------------
def _sum_terms(node: fx.Node) -> list[fx.Node]:
    """The terms of a sum of single-reader ``operator.add`` nodes (``node`` itself if not one)."""
    if node.op == "call_function" and node.target is operator.add and len(node.args) == 2 \
            and not node.kwargs and len(node.users) == 1 \
            and all(isinstance(a, fx.Node) for a in node.args):
        return _sum_terms(node.args[0]) + _sum_terms(node.args[1])
    return [node]


def _same_map_conv(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> nn.Conv2d | None:
    """The ``nn.Conv2d`` of ``node`` if it maps ``x`` (its only argument) to a tensor of x's own
    shape whose centre tap reads channel ``c`` for output ``c``: stride 1, dilation 1, odd
    kernel with zero padding k // 2, C_in == C_out, groups 1 or C; called at this site only."""
    if node.op != "call_module" or node.args != (x,) or node.kwargs or len(node.users) != 1:
        return None
    conv = get_attr_value(gm, node.target)
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        return None
    k = tuple(conv.kernel_size)
    if conv.in_channels != conv.out_channels or conv.groups not in (1, conv.in_channels) \
            or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) \
            or any(d % 2 == 0 for d in k) or tuple(conv.padding) != tuple(d // 2 for d in k):
        return None
    sites = sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes)
    xm, ym = tensor_meta(x), tensor_meta(node)
    if sites != 1 or xm is None or ym is None or tuple(xm.shape) != tuple(ym.shape):
        return None
    return conv


def _fold_identity_bns(gm: fx.GraphModule) -> tuple[int, list[str]]:
    """``conv(x) + ... + bn(x)`` -> ``conv'(x) + ...``: an eval BatchNorm of a value that a
    conv of the same map also reads, the two summed (RepVGG's identity branch), folds into the
    conv's centre tap: ``W'[c, c or 0, k//2, k//2] += s[c]``, ``b' = b + t`` (``bn(x) = s x + t``;
    exact: the centre tap of a stride-1 same-padded conv reads ``x`` at the output's own
    position). The conv becomes a new module (the old weights are not written)."""
    count, notes = 0, []
    for bn_node in list(gm.graph.nodes):
        is_bn = (bn_node.op == "call_module"
                 and isinstance(get_attr_value(gm, bn_node.target), BN_TYPES)) \
            or (bn_node.op == "call_function" and bn_node.target is F.batch_norm)
        if not is_bn or not bn_node.args or not isinstance(bn_node.args[0], fx.Node) \
                or len(bn_node.users) != 1:
            continue
        x, add = bn_node.args[0], next(iter(bn_node.users))
        if not (add.op == "call_function" and add.target is operator.add and len(add.args) == 2
                and not add.kwargs and bn_node in add.args):
            continue
        other = add.args[1] if add.args[0] is bn_node else add.args[0]
        if not isinstance(other, fx.Node) or other is bn_node:
            continue
        conv_node = next((t for t in _sum_terms(other) if _same_map_conv(gm, t, x) is not None),
                         None)
        if conv_node is None:
            continue
        stats = _bn_stats(Match(None, gm, bn_node, {"bn": bn_node}, {"bn"}))
        if isinstance(stats, str):
            notes.append(stats)
            continue
        conv = get_attr_value(gm, conv_node.target)
        scale, shift = _affine(stats)
        w = conv.weight.detach().double().clone()
        c = torch.arange(conv.out_channels)
        cy, cx = (d // 2 for d in conv.kernel_size)
        w[c, 0 if conv.groups > 1 else c, cy, cx] += scale
        bias = shift if conv.bias is None else conv.bias.detach().double() + shift
        folded = copy_sharing_tensors(conv)  # settings; weight and bias replaced below
        folded.weight = nn.Parameter(w.to(conv.weight.dtype),
                                     requires_grad=conv.weight.requires_grad)
        folded.bias = nn.Parameter(bias.to(conv.weight.dtype),
                                   requires_grad=conv.weight.requires_grad)
        parent, _, leaf = conv_node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, folded)
        add.replace_all_uses_with(other)
        gm.graph.erase_node(add)
        gm.graph.erase_node(bn_node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        remove_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
        notes.append(f"{count} identity-branch BatchNorm(s) folded into the centre tap of the "
                     f"conv summed with them (RepVGG)")
    return count, notes


@register_pass("fold_bn", requires=(EVAL_MODE,), reference="exact")
def fold_bn(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fold BatchNorm (module or F.batch_norm) into the conv, transposed conv or linear before
    it."""
    result = apply_rules(gm, RULES)
    identity, identity_notes = _fold_identity_bns(gm)
    stats = {"folded": result.count, "private_copies": result.tallies.get("private_copies", 0),
             "left": len(result.rejected)}
    if identity:
        stats["identity_folded"] = identity
    return PassResult(gm, modified=result.count > 0 or identity > 0, stats=stats,
                      notes=list(result.notes) + identity_notes)
