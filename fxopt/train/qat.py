"""Quantization-aware fine-tuning: recover int8 accuracy by training through fake quantization.

Post-training int8 (``optimize(..., quantize="int8")``) rounds every weight and activation
once, after training. When that costs accuracy, a few epochs of training *through* the rounding
bring most of it back, the same way fine-tuning after pruning does.

1. :func:`prepare_qat`: optimize a copy of the model with the default float pipeline (cleanup,
   BatchNorm folding, activation fusion), find the layers ``quantize_int8`` would quantize
   (the same ``QuantConfig`` selection: ``keep_float``, ``first_layer``/``last_layer``, the
   CPU-kernel filter, the sensitivity fallback: ``fxopt.quant.select``), calibrate the
   activation grids once (``fxopt.quant.calibrate``) and make the plan
   (``fxopt.quant.plan.make_plan``).
   The result, a :class:`QATModel`, is a plain ``nn.Module``:

   - training mode: the fused float graph, interpreted with fake quantization at every point
     the plan puts int8 (int8 values, region entries, each residual layer's pre-add value) on
     the *fixed* calibrated grids, and on the layer weights, re-quantized on every forward from
     the current weights (symmetric int8 per output channel, scale ``max|w_c| / 127``, as the
     pass does). ``torch.fake_quantize_*`` pass gradients straight through (STE, zero outside
     the clamp range), so the weights and biases, ``nn.Parameter`` s of the graph, train.
   - eval mode: exactly :class:`~fxopt.quant.simulate.SimulatedInt8` for the plan with the
     current weights (the reference the int8 graph is checked against), without gradients.

2. Training: ``fxopt.finetune(qat, ...)`` or ``fxopt.train.lightning.finetune_lightning(qat, ...,
   teacher=model)``: distillation from the float model works unchanged.

3. :func:`convert`: the trained weights in the float fused graph, then the usual checked
   ``fxopt.optimize(..., quantize=..., calibration_data=...)`` (CPU-lowered by default). The
   activation grids are *re-calibrated* there (on the QAT calibration batches unless others
   are given): the int8 pass has no way to take grids from outside, so they move a little with
   the trained weights. Layers the sensitivity fallback kept in float stay in float
   (``keep_float``), so the converted model quantizes the same layers the QAT model simulated.

    >>> qat = fxopt.prepare_qat(model, x, calibration_data=batches)
    >>> fxopt.finetune(qat, train_loader, val_loader, epochs=2, teacher=model, lr=1e-4)
    >>> int8 = fxopt.qat.convert(qat)        # an OptimizedModule, int8 on the CPU kernels
    >>> int8 = qat.convert()                 # the same
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.errors import InputError
from fxopt.ir.activations import apply_activation
from fxopt.ir.boundary import normalize_inputs
from fxopt.ir.capture import propagate_shapes
from fxopt.ir.graph import get_attr_value
from fxopt.ops.fused import FusedLayer
from fxopt.quant.calibrate import calibrate, calibration_inputs, uncalibrated
from fxopt.quant.config import QuantConfig
from fxopt.quant.measure import outputs
from fxopt.quant.observers import PerChannelMinMaxObserver
from fxopt.quant.plan import (PRE, Layer, Plan, find_layers, make_plan,
                              with_accumulator_biases)
from fxopt.quant.qparams import QParams
from fxopt.quant.select import fallback, has_cpu_kernel, select_layers
from fxopt.quant.simulate import SimulatedInt8, Simulator, fake_quant

__all__ = ["prepare_qat", "convert", "QATModel", "weight_qparams"]


def weight_qparams(w: torch.Tensor, reduce_range: bool = False) -> QParams:
    """The per-output-channel symmetric int8 grid ``calibrate`` gives ``w`` (7-bit with
    ``reduce_range``: ``QuantConfig.weights_7bit``)."""
    obs = PerChannelMinMaxObserver(axis=0, label="a QAT weight", reduce_range=reduce_range)
    obs.observe(w.detach())
    return obs.qparams()


def _param_paths(gm: fx.GraphModule, layer: Layer) -> tuple[str, str | None]:
    """Attribute paths of a layer's weight and bias in ``gm``."""
    n = layer.node
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return f"{n.target}.weight", (f"{n.target}.bias" if m.bias is not None else None)
    w, b = n.args[1], n.args[2]
    return w.target, (b.target if b is not None else None)


class _Trainer(Simulator):
    """The training forward: every op differentiable (fake quantization with STE gradients;
    the float fused ops as their decompositions: plain PyTorch ops, whose backward needs no
    second forward, where the ops' own gradient recomputes one)."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, paths: dict, weights_7bit: bool):
        super().__init__(gm, plan, {})
        self.paths, self.weights_7bit = paths, weights_7bit

    def run_node(self, n):
        layer = self.plan.layers.get(n)
        if layer is not None:
            out = self._train_layer(n, layer)
        elif FusedLayer.matches(n):
            out = self._float_fused(n)  # a layer kept in float
        else:
            out = fx.Interpreter.run_node(self, n)
        if n in self.plan.roles:
            out = fake_quant(out, self.plan.grid(n))
        return out

    def _float_fused(self, n):
        """A fused op as standard (differentiable) ops: its schema's decomposition."""
        schema = FusedLayer.of(n).schema
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return schema.decompose(*args, **kwargs)

    def _train_layer(self, n: fx.Node, layer: Layer) -> torch.Tensor:
        x = self.entry(layer.x)
        w_path, b_path = self.paths[n]
        w = get_attr_value(self.module, w_path)
        b = None if b_path is None else get_attr_value(self.module, b_path)
        qp = weight_qparams(w, self.weights_7bit)
        w_fq = torch.fake_quantize_per_channel_affine(
            w, qp.scale.to(w.device), qp.zero_point.to(device=w.device, dtype=torch.int32), 0,
            qp.qmin, qp.qmax)
        if layer.kind == "conv2d":
            stride, padding, dilation, groups = layer.conv
            y = F.conv2d(x, w_fq, b, list(stride), list(padding), list(dilation), groups)
        else:
            y = F.linear(x, w_fq, b)
        if layer.residual is not None:
            y = fake_quant(y, self.plan.grids[(PRE, n)]) + self.entry(layer.residual)
        return apply_activation(y, layer.act, layer.act_args)


class QATModel(nn.Module):
    """The fused float graph run with int8 fake quantization; its weights and biases train.

    ``graph_module``: the float fused graph (its layer weights and biases are
    ``nn.Parameter`` s). ``plan``: the int8 plan (fixed activation grids from calibration; the
    weight grids are recomputed from the current weights on every forward).
    ``config``: the ``QuantConfig``; ``kept_float``: labels of the layers left in float;
    ``calibration_batches``: the batches the grids came from (``convert`` re-uses them).
    """

    def __init__(self, graph_module: fx.GraphModule, plan: Plan, config: QuantConfig,
                 example_inputs: tuple, calibration_batches: list, kept_float: list[str],
                 kept_by_sensitivity: list[str], target: str):
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self.config = config
        self.example_inputs = example_inputs
        self.calibration_batches = calibration_batches
        self.kept_float = kept_float
        self.kept_by_sensitivity = kept_by_sensitivity
        self.target = target
        self._paths = {n: _param_paths(graph_module, l) for n, l in plan.layers.items()}
        for w_path, b_path in self._paths.values():
            for p in (w_path, b_path):
                if p is not None:
                    _make_parameter(graph_module, p)

    def forward(self, *args):
        if self.training:
            return _Trainer(self.graph_module, self.plan, self._paths,
                            self.config.weights_7bit).run(*args)
        return self.simulated()(*args)

    def current_plan(self) -> Plan:
        """The plan with the current weights and biases (and their weight grids; the biases on
        their accumulator grids, as ``make_plan`` puts them)."""
        layers, weights = {}, {}
        for n, layer in self.plan.layers.items():
            w_path, b_path = self._paths[n]
            w = get_attr_value(self.graph_module, w_path).detach()
            b = None if b_path is None else get_attr_value(self.graph_module, b_path).detach()
            layers[n] = replace(layer, weight=w, bias=b)
            weights[n] = weight_qparams(w, self.config.weights_7bit).to(w.device)
        return with_accumulator_biases(Plan(layers, self.plan.roles, self.plan.grids, weights))

    def simulated(self) -> SimulatedInt8:
        """``SimulatedInt8`` for the current weights (what eval mode runs)."""
        return SimulatedInt8(self.graph_module, self.current_plan())

    def float_graph(self) -> fx.GraphModule:
        """A copy of the float fused graph with the trained weights, in eval mode, frozen."""
        gm = copy.deepcopy(self.graph_module).eval()
        gm.requires_grad_(False)
        return gm

    def convert(self, calibration_data: Any = None, target: str = "cpu", *,
                check: str = "each"):
        """:func:`convert` of this model: the checked int8 ``OptimizedModule``."""
        return convert(self, calibration_data, target, check=check)

    def extra_repr(self) -> str:
        return (f"{len(self.plan.layers)} int8 layers, {len(self.kept_float)} kept in float, "
                f"{len(self.plan.grids)} activation grids")


def _make_parameter(gm: nn.Module, path: str) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = getattr(owner, name)
    if isinstance(value, nn.Parameter):
        value.requires_grad_(True)
        return
    delattr(owner, name)
    owner.register_parameter(name, nn.Parameter(value.detach().clone()))


def prepare_qat(model: nn.Module, example_inputs: Any, calibration_data: Any,
                quantize: Any = "int8", *, target: str = "cpu",
                check: str = "each") -> QATModel:
    """A :class:`QATModel` for ``model`` (which is not changed): the default float pipeline,
    the int8 layer selection and plan of ``quantize`` (``"int8"`` or a static ``QuantConfig``),
    activation grids calibrated on ``calibration_data`` (tensors, ``(x, y)`` tuples, a
    DataLoader). ``target``: where ``convert`` will run (on ``"cpu"`` the layers without a
    PyTorch int8 kernel stay float, as ``quantize_int8`` does). Returned in train mode.
    """
    from fxopt.api import optimize

    cfg = QuantConfig.coerce(quantize or "int8").resolved(target)
    if cfg.mode != "static":
        raise InputError("quantization-aware fine-tuning needs static int8 (calibrated "
                         "activation grids)", hint="pass quantize='int8' or a static QuantConfig")
    if calibration_data is None:
        raise InputError("prepare_qat needs calibration_data for the activation grids",
                         hint="pass calibration_data=[batch, ...] (a DataLoader works)")
    inputs = normalize_inputs(example_inputs)
    gm = optimize(model, inputs, check=check, target=target).graph_module
    gm = copy.deepcopy(gm)
    propagate_shapes(gm, inputs)
    all_layers = find_layers(gm)
    layers, kept = select_layers(all_layers, cfg)
    if target == "cpu" and cfg.float_without_kernel:
        kept = kept + [l.label for l in layers if not has_cpu_kernel(l)]
        layers = [l for l in layers if has_cpu_kernel(l)]
    if not layers:
        raise InputError("no layer to quantize: quantization-aware fine-tuning has nothing to "
                         "train", hint="check QuantConfig.keep_float / first_layer / last_layer")
    batches = calibration_inputs(calibration_data, inputs, cfg.min_batches)
    grids, weights = calibrate(gm, layers, batches, cfg)
    unreached = uncalibrated(layers, grids)  # no batch reached them: they stay float
    kept = kept + [l.label for l in unreached]
    layers = [l for l in layers if l not in unreached]
    if not layers:
        raise InputError("no calibration data reached any layer to quantize",
                         hint="pass calibration_data with at least one non-empty batch")
    by_sensitivity: list[str] = []
    # min_sqnr_db="auto" (the default) is post-training's: here training recovers the accuracy
    fcfg = replace(cfg, min_sqnr_db=None) if cfg.min_sqnr_db == "auto" else cfg
    if fcfg.runs_fallback:
        sens = batches[:cfg.sensitivity_batches]  # no held-out data here: the first batches
        layers, moved, _ = fallback(gm, layers, grids, weights, sens, outputs(gm, sens), fcfg)
        by_sensitivity = [l.label for l, _, _ in moved]
        kept = kept + by_sensitivity
        if not layers:
            raise InputError("the sensitivity fallback kept every layer in float: nothing to "
                             "quantize", hint="lower min_sqnr_db or max_float_layers")
    plan = make_plan(gm, layers, grids, weights)
    return QATModel(gm, plan, cfg, inputs, batches, kept, by_sensitivity, target).train()


def convert(qat_model: QATModel, calibration_data: Any = None, target: str = "cpu", *,
            check: str = "each"):
    """The trained QAT model as the usual checked int8 ``OptimizedModule``.

    The float fused graph with the trained weights goes through ``fxopt.optimize`` with the
    QAT config; the activation grids are re-calibrated on ``calibration_data`` (default: the
    batches ``prepare_qat`` calibrated on). Layers the sensitivity fallback kept in float stay
    float. ``target="cpu"``: lowered onto PyTorch's int8 CPU kernels.
    """
    from fxopt.api import optimize

    if not isinstance(qat_model, QATModel):
        raise InputError(f"convert takes the QATModel from prepare_qat, not "
                         f"{type(qat_model).__name__}")
    cfg = replace(qat_model.config,
                  keep_float=list(qat_model.config.keep_float) + qat_model.kept_by_sensitivity,
                  min_sqnr_db=None, max_float_layers=None)
    data = calibration_data if calibration_data is not None else qat_model.calibration_batches
    example = tuple(x.detach() if isinstance(x, torch.Tensor) else x
                    for x in qat_model.example_inputs)
    return optimize(qat_model.float_graph(), example, quantize=cfg, calibration_data=data,
                    target=target, check=check)
