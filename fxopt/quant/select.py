"""Which layers are quantized: the user's choices, the CPU kernels, the sensitivity fallback.

``select_layers`` applies ``QuantConfig.keep_float`` and the first/last-layer policies;
``has_cpu_kernel`` says whether a CPU int8 kernel can run a layer's epilogue (the
``quantized_cpu`` and ``onednn_int8`` columns of the activation table); ``fallback`` measures
each layer's
sensitivity (the SQNR of the simulated model with only that layer quantized) and moves the
most sensitive layers to float until ``min_sqnr_db`` holds or ``max_float_layers`` are float.

    >>> layers, kept = select_layers(find_layers(gm), cfg)
    >>> layers, moved, sensitivity = fallback(gm, layers, grids, weights, batches, float_outs, cfg)
"""
from __future__ import annotations

import math

import torch.fx as fx

from fxopt.infra.progress import progress
from fxopt.ir.activations import ACTIVATIONS
from fxopt.quant.config import QuantConfig
from fxopt.quant.measure import sqnr_of
from fxopt.quant.plan import Layer, make_plan
from fxopt.quant.simulate import SimulatedInt8

__all__ = ["select_layers", "has_cpu_kernel", "sensitivity", "fallback"]


def has_cpu_kernel(layer: Layer) -> bool:
    """Whether ``lower_int8_cpu`` can map ``layer`` onto a CPU int8 kernel (the activation
    table says which: PyTorch's quantized kernels, else oneDNN's with a fused post-op)."""
    return ACTIVATIONS[layer.act].cpu_int8_kernel(layer.kind, layer.residual is not None)


def select_layers(layers: list[Layer], cfg: QuantConfig) -> tuple[list[Layer], list[str]]:
    """The layers to quantize and the labels of those ``cfg`` keeps in float."""
    keep = set()
    for i, layer in enumerate(layers):
        if cfg.keeps_float(layer.path, layer.module_type):
            keep.add(i)
    if layers and cfg.first_layer == "float":
        keep.add(0)
    if layers and cfg.last_layer == "float":
        keep.add(len(layers) - 1)
    return ([l for i, l in enumerate(layers) if i not in keep],
            [layers[i].label for i in sorted(keep)])


def sensitivity(gm, layers, grids, weights, batches, float_outs) -> dict[fx.Node, float]:
    """SQNR (dB) of the simulated model with only each layer quantized, by layer node."""
    out = {}
    for layer in progress(layers, "int8 sensitivity"):
        plan = make_plan(gm, [layer], grids, weights)
        out[layer.node] = sqnr_of(SimulatedInt8(gm, plan), batches, float_outs)
    return out


def fallback(gm, layers, grids, weights, batches, float_outs, cfg) -> tuple[list, list, dict]:
    """Move the most sensitive layers to float until the simulated SQNR reaches
    ``cfg.min_sqnr_db`` (or ``cfg.max_float_layers`` are float). Returns the layers to quantize,
    the (layer, sensitivity dB, model SQNR after) moved to float, and every layer's figure."""
    sens = sensitivity(gm, layers, grids, weights, batches, float_outs)
    order = sorted(layers, key=lambda l: sens[l.node])
    budget = len(layers) if cfg.max_float_layers is None else int(cfg.max_float_layers)
    target = cfg.min_sqnr_db
    chosen, moved = list(layers), []
    sqnr = sqnr_of(SimulatedInt8(gm, make_plan(gm, chosen, grids, weights)), batches, float_outs)
    for layer in order:
        if len(moved) >= budget or (target is not None and sqnr >= target):
            break
        chosen.remove(layer)
        if chosen:
            plan = make_plan(gm, chosen, grids, weights)
            sqnr = sqnr_of(SimulatedInt8(gm, plan), batches, float_outs)
        else:
            sqnr = math.inf
        moved.append((layer, sens[layer.node], sqnr))
    return chosen, moved, sens
