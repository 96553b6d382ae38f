"""The one activation table: every activation fxopt knows, each in one row.

A row says how users spell the activation (modules, functions, methods: what capture turns
into the one canonical call), its canonical function and parameters, the ``act=`` name and
``act_args`` the fused and int8 ops take for it, its reference math, and what the CPU kernels
can fuse (oneDNN's float and int8 post-ops, PyTorch's quantized kernels). Capture
(``canonical``), the fused ops (``fxopt.ops``), ``fuse_act``, the quantizer, the lowerings, the
exporters and the pictures all read this table; nothing else lists activations. (The Triton
kernels keep their own numeric codes: they know nothing of fxopt; a test checks that their table
and this one name the same activations with the same arities.)

    >>> ACTIVATIONS["leaky_relu"].params                 # act_args, in order
    ('negative_slope',)
    >>> apply_activation(y, "leaky_relu", [0.1])         # F.leaky_relu(y, 0.1)
    >>> fused_activation("gelu", {"approximate": "tanh"})  # -> ("gelu_tanh", [])

Rows whose ``canonical`` is None are epilogue forms with no capture spelling of their own:
``none``, ``gelu_tanh`` (``F.gelu(x, approximate="tanh")``) and ``clamp`` (``torch.clamp``
with constant bounds, +-inf for a missing one).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Activation", "ACTIVATIONS", "CAPTURE_FORMS", "apply_activation", "check_activation",
           "fused_activation", "activation_names"]


def _clamp(y, args, inplace):
    lo = None if args[0] == -math.inf else args[0]
    hi = None if args[1] == math.inf else args[1]
    return y.clamp_(lo, hi) if inplace else y.clamp(lo, hi)


@dataclass(frozen=True)
class Activation:
    """One row of the table (see the module docstring)."""

    name: str
    # fn(y, act_args, inplace) -> tensor: the reference (``inplace`` only on fresh tensors)
    fn: Callable[[torch.Tensor, Sequence[float], bool], torch.Tensor]
    params: tuple[str, ...] = ()  # act_args, in order (the canonical keyword names)
    # capture: the canonical call and its keyword parameters with defaults, in call order
    canonical: Callable | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    modules: tuple[type, ...] = ()  # exact module types (most specific first across rows)
    functions: dict[Any, bool] = field(default_factory=dict)  # function -> writes in place
    methods: dict[str, bool] = field(default_factory=dict)  # Tensor method -> writes in place
    # CPU kernels: oneDNN's unary post-op (attr, scalars(act_args), algorithm) when it fuses one
    onednn: tuple[str, Callable[[Sequence[float]], list], str | None] | None = None
    # PyTorch's quantized CPU kernels: "fused" (conv2d_relu), "clamp" (a clamp after the
    # kernel, exact on the codes), None (no such kernel)
    quantized_cpu: str | None = None
    # oneDNN's int8 kernels where PyTorch's quantized ones stop: layer kind ("conv2d",
    # "linear") -> (post-op, scalars(act_args), algorithm) of qconv2d/qlinear_pointwise
    onednn_int8: dict[str, tuple[str, Callable[[Sequence[float]], list], str]] = \
        field(default_factory=dict)

    def cpu_int8_kernel(self, layer_kind: str, residual: bool) -> bool:
        """Whether an int8 ``layer_kind`` layer ending in this activation runs on a CPU int8
        kernel: PyTorch's quantized ones (a residual layer is the layer then ``add``/
        ``add_relu``), else oneDNN's, with the activation as its fused post-op (the
        ``onednn_int8`` column) or, for every other activation, on the kernel's float output
        before the requantize (``fxopt.ops.cpu``: the convolution itself is int8)."""
        if residual:
            return self.quantized_cpu == "fused"
        return layer_kind in ("conv2d", "linear")

    def bounds(self, act_args: Sequence[float]) -> tuple[float, float] | None:
        """(lo, hi) for the clamp-like activations (relu6, hardtanh, clamp), else None."""
        if self.name == "relu6":
            return 0.0, 6.0
        if self.name in ("hardtanh", "clamp"):
            return float(act_args[0]), float(act_args[1])
        return None


def _row(name, fn, params=(), **kw) -> Activation:
    return Activation(name, fn, tuple(params), **kw)


ACTIVATIONS: dict[str, Activation] = {r.name: r for r in (
    _row("none", lambda y, a, ip: y, quantized_cpu="fused"),
    _row("relu", lambda y, a, ip: torch.relu_(y) if ip else torch.relu(y),
         canonical=F.relu, modules=(nn.ReLU,),
         functions={F.relu: False, torch.relu: False, torch.relu_: True, F.relu_: True},
         methods={"relu": False, "relu_": True}, onednn=("relu", lambda a: [], None),
         quantized_cpu="fused"),
    _row("relu6", lambda y, a, ip: F.hardtanh(y, 0.0, 6.0, inplace=ip),
         canonical=F.relu6, modules=(nn.ReLU6,), functions={F.relu6: False},
         onednn=("hardtanh", lambda a: [0.0, 6.0], None), quantized_cpu="clamp"),
    _row("leaky_relu", lambda y, a, ip: F.leaky_relu(y, a[0], inplace=ip), ("negative_slope",),
         canonical=F.leaky_relu, defaults={"negative_slope": 0.01}, modules=(nn.LeakyReLU,),
         functions={F.leaky_relu: False, F.leaky_relu_: True},
         onednn=("leaky_relu", lambda a: [a[0]], None),
         onednn_int8={"linear": ("leaky_relu", lambda a: [a[0]], "")}),
    _row("hardtanh", lambda y, a, ip: F.hardtanh(y, a[0], a[1], inplace=ip),
         ("min_val", "max_val"), canonical=F.hardtanh,
         defaults={"min_val": -1.0, "max_val": 1.0}, modules=(nn.Hardtanh,),
         functions={F.hardtanh: False, F.hardtanh_: True},
         onednn=("hardtanh", lambda a: [a[0], a[1]], None), quantized_cpu="clamp"),
    _row("clamp", _clamp, ("min", "max"), onednn=("hardtanh", lambda a: [a[0], a[1]], None),
         quantized_cpu="clamp"),
    _row("elu", lambda y, a, ip: F.elu(y, a[0], inplace=ip), ("alpha",), canonical=F.elu,
         defaults={"alpha": 1.0}, modules=(nn.ELU,), functions={F.elu: False, F.elu_: True}),
    _row("gelu", lambda y, a, ip: F.gelu(y), canonical=F.gelu,
         defaults={"approximate": "none"}, modules=(nn.GELU,), functions={F.gelu: False},
         onednn=("gelu", lambda a: [], "none"),
         onednn_int8={"linear": ("gelu", lambda a: [], "none")}),
    _row("gelu_tanh", lambda y, a, ip: F.gelu(y, approximate="tanh"),
         onednn=("gelu", lambda a: [], "tanh"),
         onednn_int8={"linear": ("gelu", lambda a: [], "tanh")}),
    _row("silu", lambda y, a, ip: F.silu(y, inplace=ip), canonical=F.silu, modules=(nn.SiLU,),
         functions={F.silu: False}, onednn=("swish", lambda a: [], None),
         onednn_int8={"conv2d": ("swish", lambda a: [], ""),
                      "linear": ("swish", lambda a: [], "")}),
    _row("mish", lambda y, a, ip: F.mish(y, inplace=ip), canonical=F.mish, modules=(nn.Mish,),
         functions={F.mish: False}),
    _row("hardswish", lambda y, a, ip: F.hardswish(y, inplace=ip), canonical=F.hardswish,
         modules=(nn.Hardswish,), functions={F.hardswish: False},
         onednn=("hardswish", lambda a: [], None),
         onednn_int8={"conv2d": ("hardswish", lambda a: [], ""),
                      "linear": ("hardswish", lambda a: [], "")}),
    _row("hardsigmoid", lambda y, a, ip: F.hardsigmoid(y, inplace=ip), canonical=F.hardsigmoid,
         modules=(nn.Hardsigmoid,), functions={F.hardsigmoid: False},
         onednn=("hardsigmoid", lambda a: [], None)),
    _row("sigmoid", lambda y, a, ip: y.sigmoid_() if ip else torch.sigmoid(y),
         canonical=torch.sigmoid, modules=(nn.Sigmoid,),
         functions={torch.sigmoid: False, F.sigmoid: False, torch.sigmoid_: True},
         methods={"sigmoid": False, "sigmoid_": True},
         onednn=("sigmoid", lambda a: [], None)),
    _row("tanh", lambda y, a, ip: y.tanh_() if ip else torch.tanh(y), canonical=torch.tanh,
         modules=(nn.Tanh,), functions={torch.tanh: False, F.tanh: False, torch.tanh_: True},
         methods={"tanh": False, "tanh_": True}, onednn=("tanh", lambda a: [], None),
         onednn_int8={"linear": ("tanh", lambda a: [], "")}),
)}

# The rows capture writes: canonical name -> row.
CAPTURE_FORMS: dict[str, Activation] = {r.name: r for r in ACTIVATIONS.values()
                                        if r.canonical is not None}


def activation_names() -> str:
    return ", ".join(ACTIVATIONS)


def check_activation(act: str, act_args: Sequence[float]) -> Activation:
    """The row for ``act``; ``ValueError`` for an unknown name or the wrong number of args."""
    row = ACTIVATIONS.get(act) if isinstance(act, str) else None
    if row is None:
        raise ValueError(f"fxopt: unknown activation {act!r} (known: {activation_names()})")
    if len(act_args) != len(row.params):
        raise ValueError(f"fxopt: activation '{act}' takes {len(row.params)} act_args, got "
                         f"{list(act_args)}")
    return row


def apply_activation(y: torch.Tensor, act: str, args: Sequence[float] = (), *,
                     inplace: bool = False) -> torch.Tensor:
    """``act`` applied to ``y`` (in place when ``inplace``: ``y`` must be a fresh tensor)."""
    row = ACTIVATIONS.get(act) if isinstance(act, str) else None
    if row is None:
        raise ValueError(f"fxopt: unknown activation {act!r} (known: {activation_names()})")
    return row.fn(y, args, inplace)


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def fused_activation(name: str, params: dict[str, Any]) -> tuple[str, list[float]] | str:
    """``(act, act_args)`` for the fused ops from a canonical activation ``name`` and its
    keyword ``params`` (as capture writes them), or the reason it cannot be fused."""
    row = CAPTURE_FORMS.get(name)
    if row is None:
        return f"'{name}' is not an activation"
    if name == "gelu":
        approximate = params.get("approximate", "none")
        if set(params) - {"approximate"} or approximate not in ("none", "tanh"):
            return f"approximate={approximate!r}"
        return ("gelu" if approximate == "none" else "gelu_tanh"), []
    if set(params) - set(row.params) or not all(_number(params.get(k)) for k in row.params):
        return f"parameters fxopt cannot fuse: {params}"
    args = [float(params[k]) for k in row.params]
    if name == "hardtanh" and args[0] > args[1]:
        return "min_val > max_val"
    return name, args
