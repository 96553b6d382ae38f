"""Calibration: the float graph run on the user's batches, every candidate value observed.

``calibrate`` runs the float graph once over the batches (a progress bar on a terminal), with
one activation observer per value any int8 plan over the given layers may need
(``plan.observed_values``: inputs, outputs and residuals of the layers, adds, concatenations,
and each residual layer's output before its add, computed by running the layer without its
residual and activation) and one per-channel min/max observer per weight. It returns the
grids; the plans for different layer sets (the sensitivity search) share them. A value no batch
reached (empty on every batch: Hugging Face's empty KV cache) gets no grid and stays float; the
pass names the layers this keeps float (:func:`uncalibrated`) instead of failing.

    >>> batches = calibration_inputs(loader, example_inputs)
    >>> grids, weights = calibrate(gm, find_layers(gm), batches, QuantConfig())
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.errors import InputError
from fxopt.infra.progress import progress
from fxopt.infra.validate import calibration_batch
from fxopt.ir.graph import module_path
from fxopt.ops.schema import schema_of
from fxopt.quant.config import QuantConfig
from fxopt.quant.observers import PerChannelMinMaxObserver, make_observer
from fxopt.quant.plan import PRE, Layer, observed_values
from fxopt.quant.qparams import QParams
from fxopt.quant.zero_point import ZeroPointZeroObserver

__all__ = ["calibration_inputs", "calibrate", "Calibrator", "activation_observer", "grid_of",
           "uncalibrated"]


def calibration_inputs(data, example_inputs: tuple, min_batches: int = 1) -> list[tuple]:
    """The calibration batches as argument tuples, checked against the example inputs."""
    if isinstance(data, torch.Tensor):
        raise InputError("calibration_data is one tensor, not a collection of batches",
                         hint="pass calibration_data=[batch1, batch2, ...] or a DataLoader")
    try:
        it = iter(data)
    except TypeError:
        raise InputError(f"calibration_data must be an iterable of batches, not "
                         f"{type(data).__name__}", hint="pass a list of tensors or a DataLoader")
    batches = []
    for i, batch in enumerate(it):
        args = calibration_batch(batch, i, example_inputs)
        batches.append(tuple(a.to(ex.device) if isinstance(ex, torch.Tensor) else a
                             for a, ex in zip(args, example_inputs)))
    if len(batches) < min_batches:
        raise InputError(f"calibration_data holds {len(batches)} batches; at least "
                         f"{min_batches} needed", hint="pass more calibration batches")
    return batches


class Calibrator(fx.Interpreter):
    """Runs the float graph; feeds each watched value (and each residual layer's pre-add
    value: the layer run without its residual and activation) to its observer."""

    def __init__(self, gm, observers: dict, pre: dict):
        super().__init__(gm)
        self.observers, self.pre = observers, pre

    def run_node(self, n):
        out = super().run_node(n)
        obs = self.observers.get(n)
        if obs is not None:
            obs.observe(out)
        pre = self.pre.get(n)
        if pre is not None:
            schema = schema_of(n.target)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            values = schema.bind_call(args, kwargs)
            pre.observe(schema.call(values, residual=None, act="none", act_args=[]))
        return out


def activation_observer(cfg: QuantConfig, label: str):
    """A fresh observer for one activation value, as ``cfg`` asks."""
    kw = dict(cfg.observer_options)
    if cfg.activation_symmetric == "auto":
        return ZeroPointZeroObserver(cfg.activation_observer, label=label,
                                     reduce_range=cfg.activations_7bit, **kw)
    if cfg.activation_symmetric:
        return make_observer(cfg.activation_observer, label=label, dtype=torch.int8,
                             symmetric=True, **kw)
    return make_observer(cfg.activation_observer, label=label, dtype=torch.uint8,
                         reduce_range=cfg.activations_7bit, **kw)


def grid_of(obs) -> QParams:
    """The observer's grid. A 7-bit (reduce_range) uint8 grid keeps its scale but clamps at
    [0, 255], as PyTorch's quantized kernels do: the range only leaves headroom."""
    qp = obs.qparams()
    if qp.dtype == torch.uint8 and not qp.symmetric:
        qp = QParams(qp.scale, qp.zero_point, 0, 255, torch.uint8)
    return qp


def _label(n: fx.Node) -> str:
    return module_path(n) or n.name


def uncalibrated(layers: list[Layer], grids: dict) -> list[Layer]:
    """The layers whose input, output, residual or pre-add value no calibration batch reached
    (no grid): they cannot be int8 and stay float."""
    def missing(l: Layer) -> bool:
        keys = [l.node, l.x] + ([] if l.residual is None else [l.residual, (PRE, l.node)])
        return any(k not in grids for k in keys)
    return [l for l in layers if missing(l)]


def calibrate(gm: fx.GraphModule, layers: list[Layer], batches: list[tuple],
              cfg: QuantConfig) -> tuple[dict, dict]:
    """Observed grids for every value any plan over ``layers`` may need, and the weights'.
    A value no batch reached (empty on every batch) has no grid; the plan
    keeps it float (:func:`uncalibrated` names the layers this keeps float)."""
    keys, pre_nodes = observed_values(gm, layers)
    observers = {k: activation_observer(cfg, f"the value of {_label(k)}") for k in keys}
    pre = {n: activation_observer(cfg, f"the output of {_label(n)} before its residual add")
           for n in pre_nodes}
    calib = Calibrator(gm, observers, pre)
    with torch.no_grad():
        for args in progress(batches, "calibrating"):
            calib.run(*args)
    # a value no batch reached (empty on every batch) has no grid: a plan keeps it float
    grids = {k: grid_of(o) for k, o in observers.items() if o.batches}
    grids.update({(PRE, n): grid_of(o) for n, o in pre.items() if o.batches})
    weights = {}
    for layer in layers:
        w_obs = PerChannelMinMaxObserver(axis=0, label=f"the weight of {layer.label}",
                                         reduce_range=cfg.weights_7bit)
        w_obs.observe(layer.weight)
        weights[layer.node] = w_obs.qparams()
    return grids, weights
