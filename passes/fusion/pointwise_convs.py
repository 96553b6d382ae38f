"""``pointwise_convs``: Linear layers over a permuted feature map become 1x1 convolutions, and
the permutes go (``target="openvino"``).

ConvNeXt (torchvision's and timm's) runs each block's MLP, and the LayerNorm of each
downsampling layer, on a channels-last view of the feature map::

    y = x.permute(0, 2, 3, 1)                    # N, H, W, C
    y = fc2(gelu(fc1(layer_norm(y)))) * gamma    # each op over the last dim alone
    y = y.permute(0, 3, 1, 2)                    # N, C, H, W

Each op between the two permutes reads and writes along the last dim only, so the NCHW form
computes the same values with the channels on dim 1 and no permutes:

- ``nn.Linear`` (called at this site only) becomes a 1x1 ``nn.Conv2d`` at the same module path,
  its weight viewed as ``[out, in, 1, 1]`` (the same memory, not a copy);
- ``LayerNorm`` over the last dim (``nn.LayerNorm`` or ``F.layer_norm`` with
  ``normalized_shape=(C,)``) is written out along dim 1: ``d = x - mean(x)``,
  ``d * rsqrt(mean(d * d) + eps) * weight + bias``, the weight and bias viewed as ``(C, 1, 1)``;
- an activation (the activation table's canonical calls) stays as it is;
- a product, sum, difference or quotient with a per-channel constant (a graph attribute of
  shape ``(C,)``: timm's layer scale ``gamma``) or a number takes the constant as ``(C, 1, 1)``.

Every value between the permutes must be float32 with one reader (the next op), the chain must
end in the inverse permute, and each tensor it views anew (a Linear's weight and bias, a
LayerNorm's, a constant) must be its own: not tied to another module's, not read by another
node (the view replaces it, so training updates one tensor as before). Anything else is left as
it was. The pass manager checks the result against the graph before it (float rounding: the
written-out LayerNorm sums in another order).

Why, and where: OpenVINO runs each permute as a Transpose or a Reorder and the MLP as
FullyConnected layers on the transposed data; the NCHW form is 1x1 convolutions on the layout
it already has. convnext_tiny at batch 1 on 2 threads (AVX2 EPYC,
``bench/results/cpu-deploy-avx2-2026-12-07-pointwise.md``): int8 35.4 ms against NNCF's 69.3
(fxopt's OpenVINO int8 was 85.4 before, against NNCF's 74.1), float 63.6 against OpenVINO's
default 65.5 (a tie in 15 rounds; a scratch run of torch's ONNX export of both forms, 40
rounds: 66.3 against 74.0 ms). Only ``target="openvino"`` runs it
(``fxopt.pipelines.engine_layout_phase``): on ONNX Runtime the two forms tie (scratch, 30
rounds: 82.1 against 86.2 ms, faster in 14), and on PyTorch's kernels the written-out
LayerNorm is seven kernel calls instead of one.

    >>> pointwise_convs(gm, ctx).stats          # convnext_tiny
    {'linear_to_conv': 36, 'layer_norm': 23, 'permutes': 46}
"""
from __future__ import annotations

import inspect
import operator
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.canonical import activation_of
from fxopt.ir.graph import (get_attr_value, permutation_of, remove_unused_attributes,
                             tensor_meta)

__all__ = ["pointwise_convs", "channel_chains"]

_TO_NHWC = (0, 2, 3, 1)
_TO_NCHW = (0, 3, 1, 2)
_BINARY = {operator.mul, operator.add, operator.sub, operator.truediv,
           torch.mul, torch.add, torch.sub, torch.div}
_LAYER_NORM_PARAMS = list(inspect.signature(F.layer_norm).parameters)


def _permuted(node: fx.Node, perm: tuple[int, ...]) -> bool:
    found = permutation_of(node)
    return found is not None and tuple(found[1]) == perm


def _float32(node: fx.Node) -> bool:
    tm = tensor_meta(node)
    return tm is not None and tm.dtype == torch.float32


def _layer_norm_args(gm: fx.GraphModule, node: fx.Node, channels: int):
    """(weight, bias, eps) of a LayerNorm over the last dim of ``channels`` (tensors or None),
    or None when ``node`` is not one."""
    if node.op == "call_module":
        ln = get_attr_value(gm, node.target)
        if type(ln) is not nn.LayerNorm or len(node.args) != 1 or node.kwargs \
                or tuple(ln.normalized_shape) != (channels,):
            return None
        return ln.weight, ln.bias, ln.eps
    if node.op != "call_function" or node.target is not F.layer_norm:
        return None
    bound = dict(zip(_LAYER_NORM_PARAMS, node.args))
    if set(bound) & set(node.kwargs):
        return None
    bound.update(node.kwargs)
    shape = bound.get("normalized_shape")
    if not isinstance(shape, (list, tuple)) or tuple(shape) != (channels,):
        return None
    params = []
    for key in ("weight", "bias"):
        value = bound.get(key)
        if value is not None and not (isinstance(value, fx.Node) and value.op == "get_attr"):
            return None  # a weight the graph computes: left alone
        params.append(None if value is None else get_attr_value(gm, value.target))
    eps = bound.get("eps", 1e-5)
    return (*params, eps) if isinstance(eps, (int, float)) else None


def _storages(gm: fx.GraphModule) -> Counter:
    """How many of ``gm``'s tensors (parameters and buffers, tied ones counted per name, and
    plain tensor attributes) sit on each storage."""
    tensors = [t for _, t in gm.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in gm.named_buffers(remove_duplicate=False)]
    for m in gm.modules():
        tensors += [v for k, v in vars(m).items()
                    if isinstance(v, torch.Tensor) and k not in ("_parameters", "_buffers")]
    return Counter(t.untyped_storage().data_ptr() for t in tensors)


def _own(tensors, storages: Counter) -> bool:
    """Each tensor (None skipped) is the only one on its storage: viewing it anew and dropping
    it leaves one tensor there, as before."""
    return all(t is None or storages[t.untyped_storage().data_ptr()] == 1 for t in tensors)


def _read_once(node: fx.Node) -> bool:
    """``node``'s ``get_attr`` arguments are read by ``node`` alone."""
    return all(a.op != "get_attr" or len(a.users) == 1 for a in node.all_input_nodes)


def _step(gm: fx.GraphModule, node: fx.Node, cur: fx.Node, channels: int, sites: Counter,
          storages: Counter):
    """``(kind, data, channels after)`` when ``node`` reads ``cur`` (NHWC, ``channels`` on the
    last dim) along the last dim only, else None. A module must be called here only, with no
    ``get_attr`` of its tensors elsewhere (``sites`` counts both)."""
    if node.op == "call_module" and node.args == (cur,) and not node.kwargs:
        layer = get_attr_value(gm, node.target)
        if type(layer) is nn.Linear and layer.in_features == channels \
                and sites[node.target] == 1 and _own((layer.weight, layer.bias), storages):
            return "linear", layer, layer.out_features
    norm = _layer_norm_args(gm, node, channels)
    if norm is not None and node.args[0] is cur and _own(norm[:2], storages) \
            and _read_once(node) and (node.op != "call_module" or sites[node.target] == 1):
        return "layer_norm", norm, channels
    if activation_of(node) is not None and node.args[:1] == (cur,) \
            and not any(isinstance(a, fx.Node) for a in (*node.args[1:],
                                                          *node.kwargs.values())):
        return "act", None, channels
    if node.op == "call_function" and node.target in _BINARY and len(node.args) == 2 \
            and not node.kwargs and cur in node.args and node.args[0] is not node.args[1]:
        other = node.args[1] if node.args[0] is cur else node.args[0]
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return "const", None, channels
        if isinstance(other, fx.Node) and other.op == "get_attr" and len(other.users) == 1:
            value = get_attr_value(gm, other.target)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == (channels,) \
                    and _own((value,), storages):
                return "const", other, channels
    return None


def channel_chains(gm: fx.GraphModule) -> list[tuple[fx.Node, list, fx.Node]]:
    """``(first permute, steps, inverse permute)`` for every chain the pass rewrites: a
    ``permute(0, 2, 3, 1)`` of a 4-D value, ops that read one value along its last dim (each
    value read by the next op only), then ``permute(0, 3, 1, 2)``. ``steps``: ``(node, kind,
    data)``."""
    # a module's calls, and reads of its tensors by get_attr (``fc.weight`` counts for ``fc``)
    sites = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    sites.update(n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr")
    storages = _storages(gm)
    chains = []
    for first in gm.graph.nodes:
        if not _permuted(first, _TO_NHWC):  # of a 4-D value: the perm has its rank
            continue
        cur, channels, steps = first, tensor_meta(first.args[0]).shape[1], []
        while len(cur.users) == 1 and _float32(cur):
            node = next(iter(cur.users))
            if _permuted(node, _TO_NCHW) and node.args[0] is cur:
                if steps:
                    chains.append((first, steps, node))
                break
            found = _step(gm, node, cur, channels, sites, storages)
            if found is None:
                break
            kind, data, channels = found
            steps.append((node, kind, data))
            cur = node
    return chains


def _param(gm: fx.GraphModule, stem: str, value: torch.Tensor) -> str:
    """``value`` viewed as ``(C, 1, 1)``, registered on ``gm`` under a fresh name (a parameter
    where ``value`` is one: training reaches it)."""
    view = value.detach().view(-1, 1, 1)
    name, i = stem.replace(".", "_"), 0
    while hasattr(gm, name if i == 0 else f"{name}_{i}"):
        i += 1
    name = name if i == 0 else f"{name}_{i}"
    if isinstance(value, nn.Parameter):
        gm.register_parameter(name, nn.Parameter(view, requires_grad=value.requires_grad))
    else:
        gm.register_buffer(name, view)
    return name


def _conv(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 ``nn.Conv2d`` computing ``linear`` along dim 1, on ``linear``'s own memory."""
    w = linear.weight
    conv = nn.utils.skip_init(nn.Conv2d, linear.in_features, linear.out_features, 1,
                              bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    conv.weight = nn.Parameter(w.detach().view(*w.shape, 1, 1), requires_grad=w.requires_grad)
    if linear.bias is not None:
        conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
    return conv.train(linear.training)


def _layer_norm(gm: fx.GraphModule, node: fx.Node, x: fx.Node, norm) -> fx.Node:
    """LayerNorm along dim 1 of ``x``, written out before ``node``."""
    weight, bias, eps = norm
    stem = node.target if node.op == "call_module" else node.name
    g = gm.graph
    with g.inserting_before(node):
        mean = g.call_function(torch.mean, (x,), {"dim": 1, "keepdim": True})
        d = g.call_function(operator.sub, (x, mean))
        var = g.call_function(torch.mean, (g.call_function(operator.mul, (d, d)),),
                              {"dim": 1, "keepdim": True})
        y = g.call_function(operator.mul, (d, g.call_function(
            torch.rsqrt, (g.call_function(operator.add, (var, float(eps))),))))
        if weight is not None:
            y = g.call_function(operator.mul, (y, g.get_attr(_param(gm, f"{stem}.weight",
                                                                       weight))))
        if bias is not None:
            y = g.call_function(operator.add, (y, g.get_attr(_param(gm, f"{stem}.bias", bias))))
    return y


def _rewrite(gm: fx.GraphModule, first: fx.Node, steps: list, last: fx.Node,
             counts: Counter) -> None:
    prev, cur = first, first.args[0]  # the value each step read, and what it reads now
    for node, kind, data in steps:
        if kind == "layer_norm":
            new = _layer_norm(gm, node, cur, data)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            prev = cur = new
            counts["layer_norm"] += 1
            continue
        if kind == "linear":
            parent, _, leaf = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, _conv(data))
            counts["linear_to_conv"] += 1
        elif kind == "const" and data is not None:  # a (C,) tensor, read as (C, 1, 1)
            with gm.graph.inserting_before(node):
                wide = gm.graph.get_attr(_param(gm, data.target, get_attr_value(gm, data.target)))
            node.replace_input_with(data, wide)
        node.replace_input_with(prev, cur)
        prev = cur = node
    last.replace_all_uses_with(cur)
    gm.graph.erase_node(last)
    counts["permutes"] += 1
    if not first.users:
        gm.graph.erase_node(first)
        counts["permutes"] += 1


@register_pass("pointwise_convs", after=("fold_bn",), before=("fuse_act",))
def pointwise_convs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """OpenVINO: Linear layers (and LayerNorms, activations, per-channel constants) between a
    permute to channels-last and its inverse become 1x1 convolutions on NCHW; the permutes go."""
    counts: Counter = Counter()
    for first, steps, last in channel_chains(gm):
        _rewrite(gm, first, steps, last, counts)
    if counts:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        remove_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(counts), stats=dict(counts), shapes_changed=bool(counts))
