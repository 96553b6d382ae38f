"""Channel rules for the ATen ops a ``torch.export`` capture leaves in the graph.

``capture="export"`` brings most ops back to the torch calls the other rule rows know (conv and
linear modules, ``torch.reshape``, ``operator.add``...); what it keeps as ATen overloads
(``aten.transpose.int``, ``aten.layer_norm.default``, ``aten.scaled_dot_product_attention``, the
``aten.matmul`` and ``aten.softmax`` of a hand-written attention such as Hugging Face's
``attn_implementation="eager"``, GPT-2's ``aten.addmm``, embeddings...) gets rows here. Most
are the same rule as their torch twin, whose argument order they share; four are their own:
``select`` (an integer index along one dim), ``slice`` (a slice along one dim; along the pruned
dim it freezes), ``addmm`` (a linear layer whose weight is stored ``[in, out]``: GPT-2's
``Conv1D``) and ``embedding`` (a table whose columns are channels of their own, like a layer's
output).

    >>> # y = aten.addmm(b, x, W), W: [in, out] -> y: Layout(1, fresh slots); W: {0: in, 1: out}
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir.graph import module_path
from fxopt.prune.nodes import arg, ndim_of, normalize_dim
from fxopt.prune.records import FREE, Layout
from fxopt.prune.rule_table import register_channel_rule
from fxopt.prune.rules_attention import matmul, scaled_dot_product_attention
from fxopt.prune.rules_elementwise import passthrough, reduction_rule
from fxopt.prune.rules_layers import layer_norm_functional, param_target
from fxopt.prune.rules_shapes import expand, reshape, split, transpose
from fxopt.prune.walk import ChannelWalk, Unsupported

__all__ = ["ATEN_UNARY", "aten_unary", "aten_select", "aten_slice", "aten_addmm",
           "aten_embedding"]

aten = torch.ops.aten

# elementwise with one tensor input: the output has the input's layout
ATEN_UNARY = (aten.dropout.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout,
              aten.alias.default, aten.detach_.default, aten.detach.default,
              aten.lift_fresh_copy.default, aten.clone.default, aten.neg.default,
              aten.rsqrt.default, aten.sqrt.default, aten.pow.Tensor_Scalar, aten.cos.default,
              aten.sin.default, aten.gelu.default, aten.silu.default, aten.relu.default,
              aten.tanh.default, aten.sigmoid.default, aten.contiguous.default)

register_channel_rule(aten.transpose.int)(transpose)
register_channel_rule(aten.unsqueeze.default, aten.view.default, aten.reshape.default,
                      aten.squeeze.dim)(reshape)
register_channel_rule(aten.split.Tensor)(split)
register_channel_rule(aten.layer_norm.default)(layer_norm_functional)
register_channel_rule(aten.scaled_dot_product_attention.default)(scaled_dot_product_attention)
register_channel_rule(aten.matmul.default, aten.bmm.default)(matmul)
register_channel_rule(aten.softmax.int, aten._softmax.default)(reduction_rule("along"))


@register_channel_rule(*ATEN_UNARY)
def aten_unary(walk: ChannelWalk, n: fx.Node) -> None:
    passthrough(walk, n, n.args[0])


@register_channel_rule(aten.expand.default)
def aten_expand(walk: ChannelWalk, n: fx.Node) -> None:
    if len(n.args) > 2 or n.kwargs:
        raise Unsupported("implicit expand")
    expand(walk, n)


@register_channel_rule(aten.select.int)
def aten_select(walk: ChannelWalk, n: fx.Node) -> None:
    x = n.args[0]
    lay = walk.layout(x)
    d = normalize_dim(arg(n, 1, "dim"), ndim_of(x))
    if lay.free:
        walk.set(n, FREE)
    elif lay.pdim == d:
        raise Unsupported("integer index into the pruned dim")
    else:
        walk.set(n, Layout(lay.pdim - (lay.pdim > d), lay.vec))


@register_channel_rule(aten.slice.Tensor)
def aten_slice(walk: ChannelWalk, n: fx.Node) -> None:
    x = n.args[0]
    lay = walk.layout(x)
    d = normalize_dim(arg(n, 1, "dim", 0), ndim_of(x))
    if not lay.free and lay.pdim == d:
        raise Unsupported("slice of the pruned dim")
    walk.set(n, lay)


@register_channel_rule(aten.addmm.default)
def aten_addmm(walk: ChannelWalk, n: fx.Node) -> None:
    if n.kwargs:
        raise Unsupported("beta/alpha")
    b, x = param_target(n, 0, "self"), n.args[1]
    w = param_target(n, 2, "mat2")
    if w is None or b is None:
        raise Unsupported("a product with a computed matrix")
    fin, fout = tuple(walk.attr(w).shape)
    owner = module_path(n) or n.name
    vin = walk.channel_vector(n, x, 1, fin)
    out = walk.fresh(n, fout, "linear", owner)
    walk.param(w, 1, out, "weight", owner)
    walk.param(w, 0, vin, "weight", owner)
    walk.param(b, 0, out, "bias", owner)
    walk.set(n, Layout(1, out))
    walk.record_layer(n, out, vin)


@register_channel_rule(aten.embedding.default)
def aten_embedding(walk: ChannelWalk, n: fx.Node) -> None:
    w = param_target(n, 0, "weight")
    if w is None or walk.layout(n.args[1]).pdim is not None:
        raise Unsupported("a computed table")
    dim = tuple(walk.attr(w).shape)[1]
    owner = module_path(n) or n.name
    out = walk.fresh(n, dim, "constant", owner)
    walk.param(w, 1, out, "constant", owner)
    walk.set(n, Layout(ndim_of(n) - 1, out))
