"""What the fuse_act tests share (``tests/passes/fusion/test_fuse_act.py`` and
``test_fuse_act_conv_transpose.py``): the fused ops, the activation table a layer is followed
by, a layer-then-activation module, and ``run`` (fuse_act and the CPU layout passes, checked
against eager and the MAC count).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.registry import PassContext, PassResult
from fxopt.ir.metrics import count_macs
from fxopt.ir.tolerances import compare_outputs
from fxopt.ir.verify import verify_structure
from fxopt.passes.fusion.fuse_act import fuse_act, lower_convs
from fxopt.passes.fusion.layout import to_channels_last

__all__ = ["CONV2D", "CONV1D", "LINEAR", "DECONV", "ACTIVATIONS", "LayerAct", "run",
           "fused_nodes", "compute_nodes", "TwoUsers"]

CONV2D = torch.ops.fxopt.conv2d_act.default
CONV1D = torch.ops.fxopt.conv1d_act.default
LINEAR = torch.ops.fxopt.linear_act.default
DECONV = torch.ops.fxopt.conv_transpose2d_act.default

# name -> (module or function applied after the layer, expected act, expected act_args)
ACTIVATIONS = {
    "relu": (nn.ReLU(), "relu", []),
    "relu6": (nn.ReLU6(), "relu6", []),
    "leaky_relu": (nn.LeakyReLU(0.2), "leaky_relu", [0.2]),
    "hardtanh": (nn.Hardtanh(-0.5, 0.7), "hardtanh", [-0.5, 0.7]),
    "gelu": (nn.GELU(), "gelu", []),
    "gelu_tanh": (nn.GELU(approximate="tanh"), "gelu_tanh", []),
    "silu": (nn.SiLU(), "silu", []),
    "hardswish": (nn.Hardswish(), "hardswish", []),
    "hardsigmoid": (nn.Hardsigmoid(), "hardsigmoid", []),
    "sigmoid": (nn.Sigmoid(), "sigmoid", []),
    "tanh": (nn.Tanh(), "tanh", []),
    "elu": (nn.ELU(0.5), "elu", [0.5]),
    "mish": (nn.Mish(), "mish", []),
    "clamp": (lambda t: torch.clamp(t, -0.2, 0.4), "clamp", [-0.2, 0.4]),
    "clamp_min": (lambda t: t.clamp(min=0.1), "clamp", [0.1, math.inf]),
    "clamp_max": (lambda t: t.clamp_max(0.3), "clamp", [-math.inf, 0.3]),
}


class LayerAct(nn.Module):
    def __init__(self, layer, act):
        super().__init__()
        self.layer = layer
        self.act = act if isinstance(act, nn.Module) else None
        self.fn = None if isinstance(act, nn.Module) else act

    def forward(self, x):
        y = self.layer(x)
        return self.act(y) if self.act is not None else self.fn(y)


def run(model, *inputs, target="cpu", lower=None, channels_last=None):
    """fuse_act, then the CPU pipeline's layout passes (on for target='cpu' unless turned off):
    one PassResult with the stats and notes of all of them."""
    model = model.eval()
    gm = fxopt.capture(model, inputs)
    macs = count_macs(gm)
    ctx = PassContext(example_inputs=inputs, target=target)
    res = fuse_act(gm, ctx)
    cpu = target == "cpu"
    for on, fn in ((cpu if lower is None else lower, lower_convs),
                   (cpu if channels_last is None else channels_last, to_channels_last)):
        if on:
            more = fn(gm, ctx)
            res = PassResult(gm, res.modified or more.modified, {**res.stats, **more.stats},
                             res.notes + more.notes,
                             shapes_changed=res.shapes_changed or more.shapes_changed)
    assert verify_structure(gm, require_meta=True) == []
    assert count_macs(gm) == macs  # fusion moves the work, never drops it
    with torch.no_grad():
        stats = compare_outputs(gm(*inputs), model(*inputs))
    assert stats.ok, f"rel err {stats.rel_err:.2e}"
    return gm, res


def fused_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (CONV1D, CONV2D, LINEAR, DECONV)]


def compute_nodes(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")]


class TwoUsers(nn.Module):
    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y), y  # the conv output is needed un-activated too
