"""Bias correction: each quantized layer's bias absorbs the mean error its int8 form makes.

Rounding weights to int8 moves each output channel's mean: ``sum_k (w_q - w) x_k`` does not
average to zero when the inputs have a non-zero mean (post-ReLU activations, image channels),
and a clipped input grid shifts it too. Over a deep network these shifts add up (NNCF's *fast
bias correction* and ORT's static quantizer correct them). For every layer, on the
calibration batches, with the float model's input ``x`` of the layer::

    e_c = mean over batch and positions of ( layer(x; W) - layer(fq(x); fq(W)) )[c]
    bias_c += e_c

``layer(fq(x); fq(W))`` is the layer as the int8 IR computes it before its bias (input on its
grid, weights on their per-channel grid), so the correction covers the weights' rounding and
the input grid's clipping. The corrected bias is the layer's bias in the plan
(``Layer.bias``), which both the simulation and the rewrite read: the IR and its reference
agree on it by construction. A layer without a bias gets one. ``make_plan`` then rounds every
int8 layer's bias onto its int32 accumulator grid (``on_accumulator_grid``), as int8 kernels
add it: a corrected bias is arbitrary in float, and ONNX Runtime rounded it there itself.

    >>> corrections = bias_corrections(gm, layers, grids, weights, batches)
    >>> layers = with_corrected_bias(layers, corrections)
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.infra.progress import progress
from fxopt.quant.plan import Layer, make_plan

__all__ = ["bias_corrections", "with_corrected_bias", "layer_output"]


def layer_output(layer: Layer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's convolution / matrix product of ``x`` by ``w``, without bias, residual or
    activation."""
    if layer.kind == "conv2d":
        stride, padding, dilation, groups = layer.conv
        return F.conv2d(x, w, None, list(stride), list(padding), list(dilation), groups)
    return F.linear(x, w)


def _channel_sum(y: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """Per output channel sums of ``y`` (channels: dim 1 of a conv output, the last dim of a
    linear one) and the number of values summed per channel."""
    if kind == "conv2d":
        return y.double().sum(dim=[d for d in range(y.dim()) if d != 1]), y.numel() // y.shape[1]
    return y.double().reshape(-1, y.shape[-1]).sum(dim=0), y.numel() // y.shape[-1]


class _Collect(fx.Interpreter):
    """Runs the float graph; at each layer sums the float output less the quantized one."""

    def __init__(self, gm, layers: dict, grids: dict, weights: dict, sums: dict):
        super().__init__(gm)
        self.layers, self.grids, self.weights, self.sums = layers, grids, weights, sums

    def run_node(self, n):
        layer = self.layers.get(n)
        if layer is not None:
            x = self.env[layer.x].float()
            # the layer's fake-quantized weights, made here and dropped after: all layers' at
            # once were one more float copy of the model (issue 15)
            fq_w = self.weights[n].fake_quantize(layer.weight)
            err = layer_output(layer, x, layer.weight) - \
                layer_output(layer, self.grids[n].fake_quantize(x), fq_w)
            del fq_w
            s, count = _channel_sum(err, layer.kind)
            total, seen = self.sums.get(n, (0.0, 0))
            self.sums[n] = (total + s, seen + count)
        return super().run_node(n)


def bias_corrections(gm: fx.GraphModule, layers: list[Layer], grids: dict, weights: dict,
                     batches: list[tuple]) -> dict[fx.Node, torch.Tensor]:
    """The mean per-channel error ``e`` of each layer's int8 form on ``batches`` (see the
    module doc), by layer node: add it to the bias."""
    plan = make_plan(gm, layers, grids, weights)  # the input grids as the plan resolves them
    by_node = {l.node: l for l in layers}
    in_grids = {l.node: plan.grid(l.x) for l in layers}
    sums: dict = {}
    collect = _Collect(gm, by_node, in_grids, weights, sums)
    with torch.no_grad():
        for args in progress(batches, "bias correction"):
            collect.run(*args)
    return {n: (total / max(seen, 1)).float() for n, (total, seen) in sums.items()}


def with_corrected_bias(layers: list[Layer],
                        corrections: dict[fx.Node, torch.Tensor]) -> list[Layer]:
    """``layers`` with each bias plus its correction (a zero bias where there was none)."""
    out = []
    for l in layers:
        e = corrections.get(l.node)
        if e is None:
            out.append(l)
            continue
        bias = torch.zeros(l.weight.shape[0]) if l.bias is None else l.bias.float()
        out.append(replace(l, bias=(bias + e).to(l.weight.dtype)))
    return out
