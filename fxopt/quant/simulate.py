"""The reference of the int8 passes: the float graph with fake quantization where a plan puts int8.

:class:`SimulatedInt8` (DESIGN.md section 4) runs the float graph with fake quantization at
every int8 value, every region entry and every weight, in float. A layer's sum of
fake-quantized products is taken exactly (over the centered integer codes: float32 where every
partial sum stays below 2**24, float64 otherwise) and scaled in float32 as the int8 epilogue
does: a float32 convolution of fake-quantized values rounds each product and partial sum, and
in a deep network one value flipped to the neighbouring code at a tie grows, layer after layer,
past the one-step bound (ResNet-50 did). Same numbers, one rounding. For the same reason a
windowed average pooling (``avg_pool2d_int8``, a same-grid role with ``exact_on_codes``) is
simulated on the codes, as the int8 op
averages: a float average of fake-quantized values lands a 2x2 window's ties either side
(conv -> AvgPool2d(2) -> conv was two output steps off).

:class:`Simulator` is the interpreter behind it; quantization-aware training subclasses it to
run the same plan with gradients.

    >>> SimulatedInt8(gm, make_plan(gm, layers, grids, weights))(x)
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.activations import apply_activation
from fxopt.ir.share import TensorGuard, copy_sharing_tensors
from fxopt.quant.plan import PRE, Layer, Plan
from fxopt.quant.roles import SAME_GRID, SameGridRole
from fxopt.quant.qparams import QParams

__all__ = ["fake_quant", "Simulator", "SimulatedInt8", "simulated_copy", "weight_codes"]


def fake_quant(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``x`` fake-quantized on ``qp``; a tuple (an int8 value's ``chunk`` / ``split``)
    piecewise."""
    if isinstance(x, (tuple, list)):
        return type(x)(fake_quant(t, qp) for t in x)
    return torch.fake_quantize_per_tensor_affine(x, float(qp.scale), int(qp.zero_point),
                                                 qp.qmin, qp.qmax)


class Simulator(fx.Interpreter):
    """Interprets the float graph with the plan's fake quantization (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, fq_weights: dict):
        super().__init__(gm)
        self.plan, self.fq_weights = plan, fq_weights

    def entry(self, value_node: fx.Node) -> torch.Tensor:
        v = self.env[value_node]
        return v if self.plan.is_int8(value_node) else fake_quant(v, self.plan.grid(value_node))

    def run_node(self, n):
        layer = self.plan.layers.get(n)
        if layer is not None:
            out = self._layer(n, layer)
        elif getattr(SAME_GRID.get(self.plan.roles.get(n)), "exact_on_codes", False):
            out = self._on_codes(n, SAME_GRID[self.plan.roles[n]])
        else:
            out = super().run_node(n)
        if n in self.plan.roles:
            out = fake_quant(out, self.plan.grid(n))
        return out

    def _on_codes(self, n: fx.Node, row: SameGridRole) -> torch.Tensor:
        """The row's int8 op (its reference) on the input's codes (an int8 value: on its grid
        already)."""
        qp = self.plan.grid(n.args[0])
        values = row.args(self.module, n)
        if row.on_grid:
            values.update(scale=qp.scale, zp=qp.zero_point, qmin=qp.qmin, qmax=qp.qmax)
        codes = row.op.reference(**row.op.bind({"q": qp.quantize(self.env[n.args[0]]),
                                                **values}))
        return qp.dequantize(codes)

    def _layer(self, n: fx.Node, layer: Layer) -> torch.Tensor:
        x = self.entry(layer.x)
        x_qp = self.plan.grid(layer.x)
        w_q, w_s = self.fq_weights[n]
        # fake-quantized x times fake-quantized w, summed exactly: (x - zp) / s are the codes;
        # float32 holds every partial sum below 2**24 exactly (depthwise convolutions, small
        # layers: float64 convolutions are slow there), float64 the rest
        zp = int(x_qp.zero_point)
        k = w_q[0].numel()
        exact32 = k * max(zp - x_qp.qmin, x_qp.qmax - zp) * 127 < 2 ** 24
        dt = torch.float32 if exact32 else torch.float64
        xc = (x_qp.quantize(x).to(torch.int64) - zp).to(dt)
        w_q = w_q.to(dt)
        if layer.kind == "conv2d":
            stride, padding, dilation, groups = layer.conv
            acc = F.conv2d(xc, w_q, None, list(stride), list(padding), list(dilation), groups)
            shape = (1, -1) + (1,) * (acc.dim() - 2)
        else:
            acc = F.linear(xc, w_q)
            shape = (-1,)
        y = acc.float() * (x_qp.scale.float() * w_s).reshape(shape)
        if layer.bias is not None:
            y = y + layer.bias.float().reshape(shape)
        if layer.residual is not None:
            y = fake_quant(y, self.plan.grids[(PRE, n)]) + self.entry(layer.residual)
        return apply_activation(y, layer.act, layer.act_args)


class SimulatedInt8(nn.Module):
    """The float graph with fake quantization wherever ``plan`` puts int8 (DESIGN.md section 4).

    Holds the float graph without changing it; each call interprets it. ``guard``: the
    weights it shares with a graph being rewritten (``simulated_copy``), checked unchanged
    before every call."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, guard: TensorGuard | None = None,
                 codes: dict[fx.Node, torch.Tensor] | None = None):
        super().__init__()
        self.gm = gm
        self.plan = plan
        self._guard = guard
        codes = codes if codes is not None else weight_codes(plan)
        # int8 weight codes and their per-channel scales
        self._fq = {n: (codes[n], qp.scale.float()) for n, qp in plan.weights.items()}

    def forward(self, *args):
        if self._guard is not None:
            self._guard.check("quantize_int8")
        with torch.no_grad():
            return Simulator(self.gm, self.plan, self._fq).run(*args)


def weight_codes(plan: Plan) -> dict[fx.Node, torch.Tensor]:
    """Each int8 layer's weight codes on its per-channel grid, by layer node."""
    return {n: qp.quantize(plan.layers[n].weight) for n, qp in plan.weights.items()}


def simulated_copy(gm: fx.GraphModule, plan: Plan,
                   codes: dict[fx.Node, torch.Tensor] | None = None) -> SimulatedInt8:
    """``SimulatedInt8`` of ``plan`` on a copy of the float graph (so that ``gm`` can then be
    rewritten); ``codes``: the weights' int8 codes (``weight_codes(plan)``) when the rewrite
    writes the same tensors into ``gm`` (one copy of the codes, not two; guarded too). The
    copy shares ``gm``'s weights (``fxopt.ir.share``: the rewrite adds and deletes attributes
    but writes into no tensor; a write would fail the reference's guard): a deep copy was one
    more copy of every float weight at the int8 pass's peak (issue 15)."""
    ref = copy_sharing_tensors(gm)
    by_name = {n.name: n for n in ref.graph.nodes}

    def m(key):
        if isinstance(key, fx.Node):
            return by_name[key.name]
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], fx.Node):
            return (key[0], by_name[key[1].name])
        return key

    layers = {m(n): replace(l, node=m(l.node), x=m(l.x),
                            residual=None if l.residual is None else m(l.residual))
              for n, l in plan.layers.items()}
    codes = None if codes is None else {m(n): c for n, c in codes.items()}
    guarded = {f"{n.name} (int8 weight codes)": c for n, c in (codes or {}).items()}
    return SimulatedInt8(ref, Plan(layers, {m(k): v for k, v in plan.roles.items()},
                                   {m(k): v for k, v in plan.grids.items()},
                                   {m(k): v for k, v in plan.weights.items()}),
                         guard=TensorGuard(ref, guarded), codes=codes)
