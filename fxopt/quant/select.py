"""Which layers are quantized: the user's choices, the CPU kernels, the sensitivity fallback.

``select_layers`` applies ``QuantConfig.keep_float`` and the first/last-layer policies;
``has_cpu_kernel`` says whether a CPU int8 kernel can run a layer's epilogue (the
``quantized_cpu`` and ``onednn_int8`` columns of the activation table); ``fallback`` measures
each layer's
sensitivity (the SQNR of the simulated model with only that layer quantized) and moves the
most sensitive layers to float until ``min_sqnr_db`` holds or ``max_float_layers`` are float
(under ``min_sqnr_db="auto"``: the costliest noise per MAC first, within a quarter of the
MACs).

    >>> layers, kept = select_layers(find_layers(gm), cfg)
    >>> layers, moved, sensitivity = fallback(gm, layers, grids, weights, batches, float_outs, cfg)
"""
from __future__ import annotations

import math

import torch.fx as fx

from fxopt.infra.progress import progress
from fxopt.ir.activations import ACTIVATIONS
from fxopt.ir.metrics import node_macs
from fxopt.quant.config import QuantConfig
from fxopt.quant.measure import sqnr_of
from fxopt.quant.plan import Layer, make_plan
from fxopt.quant.simulate import SimulatedInt8

__all__ = ["select_layers", "has_cpu_kernel", "sensitivity", "fallback"]

# under a MAC budget, a layer at least this many dB over the target alone stays int8
NEGLIGIBLE_DB = 10.0
# the fallback judges the model on at most this many times sensitivity_batches batches
JUDGE_BATCHES_PER_SENSITIVITY = 4


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
    return {layer.node: _sqnr(gm, [layer], grids, weights, batches, float_outs)
            for layer in progress(layers, "int8 sensitivity")}


def _sqnr(gm, layers, grids, weights, batches, float_outs) -> float:
    """SQNR (dB) on ``batches`` of the simulated model with ``layers`` int8 (none: inf)."""
    if not layers:
        return math.inf
    return sqnr_of(SimulatedInt8(gm, make_plan(gm, layers, grids, weights)), batches, float_outs)


def fallback(gm, layers, grids, weights, batches, float_outs, cfg) -> tuple[list, list, dict]:
    """Move layers to float until the simulated SQNR on ``batches`` reaches
    ``cfg.fallback_target_db``, or ``cfg.max_float_layers`` are float, or no layer left fits
    ``cfg.fallback_mac_share`` of the layers' MACs (each layer's sensitivity is measured on the
    first ``cfg.sensitivity_batches`` of ``batches``, the model on up to
    ``JUDGE_BATCHES_PER_SENSITIVITY`` times as many). Returns the layers to quantize, the
    (layer, sensitivity dB, model SQNR after) moved to float, and every layer's figure (none
    measured when the model meets the target all int8).

    The order: the most sensitive layer first; under a MAC budget (``min_sqnr_db="auto"``),
    the layer whose noise alone (``10 ** (-sensitivity / 10)``, the noise-to-signal power the
    model has with only that layer int8; roughly additive over layers) is largest per MAC, so
    the budget buys the most dB (a ViT's head, 0.8 M MACs, goes before its MLPs), a layer
    ``NEGLIGIBLE_DB`` or more over the target alone stays int8, and so does one whose move
    does not raise the model's SQNR."""
    target, share = cfg.fallback_target_db, cfg.fallback_mac_share
    budget = len(layers) if cfg.max_float_layers is None else int(cfg.max_float_layers)
    k = cfg.sensitivity_batches  # each layer's figure on the first k batches
    # the model's on up to JUDGE_BATCHES_PER_SENSITIVITY times as many: the default target
    # measures every int8 model once, and held-out data can be hundreds of batches
    batches, float_outs = batches[:JUDGE_BATCHES_PER_SENSITIVITY * k], \
        float_outs[:JUDGE_BATCHES_PER_SENSITIVITY * k]
    chosen, moved = list(layers), []
    sqnr = _sqnr(gm, chosen, grids, weights, batches, float_outs)
    if budget == 0 or (target is not None and sqnr >= target):
        return chosen, moved, {}
    sens = sensitivity(gm, layers, grids, weights, batches[:k], float_outs[:k])
    if share is None:
        order, cost, left = sorted(layers, key=lambda l: sens[l.node]), {}, math.inf
    else:
        cost = {l.node: max(node_macs(l.node, gm), 1) for l in layers}
        # a layer whose noise alone is under a tenth of what the target allows buys little
        # (under ~0.4 dB) for its float MACs: it stays int8
        worth = [l for l in layers if not sens[l.node] >= target + NEGLIGIBLE_DB]
        order = sorted(worth, key=lambda l: -10 ** (-sens[l.node] / 10) / cost[l.node])
        left = share * sum(cost.values())
    while True:  # again over the layers left while a pass moved one: an undone move may
        before = len(moved)  # help once a noisier layer is float
        for layer in [l for l in order if l in chosen]:
            if len(moved) >= budget or (target is not None and sqnr >= target):
                break
            if cost.get(layer.node, 0) > left:
                continue  # over the MAC budget: a smaller layer may still fit
            trial = [l for l in chosen if l is not layer]
            after = _sqnr(gm, trial, grids, weights, batches, float_outs)
            if share is not None and not after > sqnr:
                # the model is no better with it float (int8 noise does not simply add up: on
                # a small resnet18 three such moves cost 2.4 dB): it stays int8 for now
                continue
            left -= cost.get(layer.node, 0)
            chosen, sqnr = trial, after
            moved.append((layer, sens[layer.node], sqnr))
        if share is None or len(moved) == before or len(moved) >= budget or sqnr >= target:
            break
    return chosen, moved, sens
