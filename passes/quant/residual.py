"""Residual adds after Linear layers stay in float: ``linear_act(x, residual=r)`` is split
into ``linear_act(x) + r`` before ``quantize_int8`` plans, so the Linear is quantized and the
add is not.

A transformer's residual stream is a poor int8 value: one grid per tensor must cover tokens of
very different scales (a ViT's class token is 10-100x smaller than the patch tokens with
random weights; trained ones carry outlier channels), and the LayerNorm that reads the stream
scales a small token's quantization noise back up. Quantizing the stream at a fused residual
add (``add_int8`` on an own grid) took timm's vit_tiny to 8.4 dB SQNR, with the first block's
``attn.proj`` alone at 9.2 dB; the Linear layers' own inputs (LayerNorm outputs, GELU outputs,
attention outputs) quantize well. A convolution's residual add (ResNets) keeps its int8 add:
PyTorch's kernels fuse it and its channels share one scale.

    >>> split_linear_residuals(gm)      # number of nodes split
"""
from __future__ import annotations

import operator

import torch.fx as fx

from fxopt.ir.graph import copy_meta
from fxopt.ops.fused import FusedLinear

__all__ = ["split_linear_residuals"]


def split_linear_residuals(gm: fx.GraphModule) -> int:
    """Rewrites each ``linear_act`` with a residual and no activation into the layer and a
    float add after it; returns how many."""
    count = 0
    for n in list(gm.graph.nodes):
        v = FusedLinear.match(n)
        if v is None or v.residual is None or v.act != "none":
            continue
        r = v.residual
        v.apply(residual=None)
        with gm.graph.inserting_after(n):
            add = gm.graph.call_function(operator.add, (n, r))
        n.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        copy_meta(add, n)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
