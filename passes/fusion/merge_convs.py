"""``merge_convs``: two convolutions of the same input, summed, become one convolution.

A convolution is linear in its weights, so ``conv_a(x) + conv_b(x)`` is one convolution of ``x``
when both read the same input positions at the same output position::

    W = W_a + pad(W_b)          (W_b zero-padded to W_a's kernel, centred where it reads)
    b = b_a + b_b

This is RepVGG's "structural re-parameterization" (``conv3x3(x) + conv1x1(x) + bn(x)``, each
branch's BatchNorm folded first by ``fold_bn``, the identity's into the 3x3 centre tap) and
the same for ACNet/DBB-style branches (``3x3 + 1x3 + 3x1``), done on the graph: half the
convolutions of a RepVGG, each one as costly as the 3x3 alone.

When (``_mergeable``): two ``nn.Conv2d`` modules (or ``Conv1d``/``Conv3d``), each called at this
site only, with this add as their only reader, on the same input node; the same in and out
channels, groups, stride, dilation, dtype and ``padding_mode="zeros"``; the smaller kernel fits
in the larger one at an offset where every tap reads what the larger kernel's tap there reads:
``offset = (p_a - p_b) / dilation`` a whole number, ``0 <= offset <= k_a - k_b`` per dim; and
both outputs of one shape (``tensor_meta``). The add is ``operator.add`` or ``torch.add``
without ``alpha``. A sum of three or more such convolutions merges pair by pair.

Never silently wrong: the merged convolution is a new module (the user's weights are not
written; the old modules are deleted from fxopt's copy); its weights are summed in float64 and
rounded once; a conv with another reader, called at another site, or on padding it does not
share is left alone. The pass manager checks the result against the graph before it (float
rounding: one sum of products instead of two plus an add).

    >>> merge_convs(gm, ctx).stats
    {'merged': 17}
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.infra.preconditions import EVAL_MODE
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.graph import get_attr_value, remove_unused_attributes, tensor_meta
from fxopt.ir.share import copy_sharing_tensors
from fxopt.passes.fusion.fold_bn import CONV_TYPES

__all__ = ["merge_convs", "kernel_offset"]


def _conv_call(gm: fx.GraphModule, node, add: fx.Node, sites: Counter):
    """(module, input) when ``node`` calls a plain conv module called at no other site, read
    only by ``add``."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.args) != 1 \
            or node.kwargs or set(node.users) != {add} or sites[node.target] != 1:
        return None
    conv = get_attr_value(gm, node.target)
    if type(conv) not in CONV_TYPES or conv.padding_mode != "zeros" \
            or not isinstance(conv.padding, tuple):  # "same"/"valid" strings: left alone
        return None
    return conv, node.args[0]


def kernel_offset(a: nn.Module, b: nn.Module) -> tuple[int, ...] | None:
    """Where ``b``'s kernel sits inside ``a``'s so that every tap of ``b`` reads the input
    position ``a``'s tap there reads (same stride and dilation): per dim
    ``(p_a - p_b) / dilation``, within ``[0, k_a - k_b]``; None when it does not fit."""
    off = []
    for ka, kb, pa, pb, d in zip(a.kernel_size, b.kernel_size, a.padding, b.padding,
                                 a.dilation):
        shift, rest = divmod(pa - pb, d)
        if rest or not 0 <= shift <= ka - kb:
            return None
        off.append(shift)
    return tuple(off)


def _same_settings(a: nn.Module, b: nn.Module) -> bool:
    return (type(a) is type(b) and a.in_channels == b.in_channels
            and a.out_channels == b.out_channels and a.groups == b.groups
            and tuple(a.stride) == tuple(b.stride) and tuple(a.dilation) == tuple(b.dilation)
            and a.weight.dtype == b.weight.dtype and a.weight.device == b.weight.device)


def _merged(big: nn.Module, small: nn.Module, off: tuple[int, ...]) -> nn.Module:
    """A new conv: ``big``'s settings, ``W_big + pad(W_small)``, ``b_big + b_small``."""
    w = big.weight.detach().double().clone()
    window = (slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in
                                                zip(off, small.kernel_size))
    w[window] += small.weight.detach().double()
    biases = [c.bias.detach().double() for c in (big, small) if c.bias is not None]
    grad = big.weight.requires_grad or small.weight.requires_grad
    merged = copy_sharing_tensors(big)  # settings; weight and bias replaced below
    merged.weight = nn.Parameter(w.to(big.weight.dtype), requires_grad=grad)
    merged.bias = None if not biases else nn.Parameter(sum(biases).to(big.weight.dtype),
                                                       requires_grad=grad)
    return merged


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (operator.add, torch.add) \
        and len(node.args) == 2 and not node.kwargs


def _merge_one(gm: fx.GraphModule, add: fx.Node, sites: Counter) -> bool:
    calls = [_conv_call(gm, a, add, sites) for a in add.args]
    if any(c is None for c in calls) or add.args[0] is add.args[1]:
        return False
    (ca, xa), (cb, xb) = calls
    if xa is not xb or not _same_settings(ca, cb):
        return False
    ma, mb = tensor_meta(add.args[0]), tensor_meta(add.args[1])
    if ma is None or mb is None or tuple(ma.shape) != tuple(mb.shape):
        return False
    na, nb = add.args
    if all(x >= y for x, y in zip(cb.kernel_size, ca.kernel_size)) and \
            tuple(cb.kernel_size) != tuple(ca.kernel_size):
        (ca, na), (cb, nb) = (cb, nb), (ca, na)  # the larger kernel holds the smaller
    off = kernel_offset(ca, cb)
    if off is None:
        return False
    parent, _, leaf = na.target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, _merged(ca, cb, off))
    # the merged conv stands for both convs and the add (provenance for reports and checks)
    na.meta["fxopt_from"] = [f for n in (na, nb, add)
                             for f in n.meta.get("fxopt_from", [n.name])]
    if "tensor_meta" in add.meta:
        na.meta["tensor_meta"] = add.meta["tensor_meta"]
    add.replace_all_uses_with(na)
    gm.graph.erase_node(add)
    gm.graph.erase_node(nb)
    return True


@register_pass("merge_convs", requires=(EVAL_MODE,), reference="exact", after=("fold_bn",))
def merge_convs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Merge convolutions of the same input whose outputs are summed into one convolution
    (RepVGG's 3x3 + 1x1 branches after fold_bn)."""
    merged, changed = 0, True
    while changed:  # a sum of three merges pair by pair
        changed = False
        sites = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        for node in list(gm.graph.nodes):
            if _is_add(node) and _merge_one(gm, node, sites):
                merged += 1
                changed = True
    if merged:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        remove_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
    notes = [f"{merged} pair(s) of convolutions of the same input, summed, merged into one "
             f"(RepVGG-style branches)"] if merged else []
    return PassResult(gm, modified=merged > 0, stats={"merged": merged}, notes=notes)
