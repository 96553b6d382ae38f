"""The ``fxopt`` torch.library namespace: fused and quantized ops.

Each op has a fake implementation (shapes and strides, for ``torch.compile`` and export), a
CPU implementation and a CUDA one (for now the plain PyTorch reference; the Triton kernels
replace it). Importing this module defines the ops, so saved graphs that call them load.

Fused convolution and linear ops (``fuse_act`` makes them)::

    y = torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, residual, act="relu")
    # == relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + residual)

``act`` is one of ``ACTIVATIONS`` with its parameters in ``act_args`` (``leaky_relu``:
[negative_slope]; ``hardtanh``/``clamp``: [min, max], ``clamp`` bounds may be +-inf; ``elu``:
[alpha]). The epilogue is bias, then residual, then the activation.

Layout contract: the output of ``conv2d_act`` is channels-last when the input is (strictly)
channels-last, contiguous otherwise. On the CPU a channels-last float32 input takes oneDNN's
fused kernels (``torch.ops.mkldnn._convolution_pointwise``, the ones Inductor uses): conv + bias
+ activation, or conv + bias + residual (+ relu) in one pass, with weights reordered once into
oneDNN's blocked format and cached (keyed by the weight tensor and its version). Everything
else runs the reference: ``F.conv2d`` then the epilogue in place on its output.

These are inference ops: they have no autograd formula.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F

from fxopt.ir.metrics import MAC_COUNTERS, conv_weight_macs, linear_weight_macs

__all__ = ["LIB", "ACTIVATIONS", "apply_activation", "conv_act_reference", "linear_act_reference",
           "mkldnn_available", "clear_weight_cache"]

LIB = torch.library.Library("fxopt", "FRAGMENT")

# act name -> number of act_args it takes
ACTIVATIONS: dict[str, int] = {
    "none": 0, "relu": 0, "relu6": 0, "leaky_relu": 1, "hardtanh": 2, "clamp": 2, "elu": 1,
    "gelu": 0, "gelu_tanh": 0, "silu": 0, "mish": 0, "hardswish": 0, "hardsigmoid": 0,
    "sigmoid": 0, "tanh": 0,
}

_TAIL = "Tensor? residual=None, *, str act='none', float[] act_args=[]) -> Tensor"
LIB.define("conv1d_act(Tensor x, Tensor weight, Tensor? bias, int[1] stride, int[1] padding, "
           "int[1] dilation, int groups, " + _TAIL)
LIB.define("conv2d_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
           "int[2] dilation, int groups, " + _TAIL)
LIB.define("linear_act(Tensor x, Tensor weight, Tensor? bias, " + _TAIL)


# -- the reference: plain PyTorch, the same math ----------------------------------------------
def apply_activation(y: torch.Tensor, act: str, args: Sequence[float] = (), *,
                     inplace: bool = False) -> torch.Tensor:
    """``act`` applied to ``y`` (in place when ``inplace``: ``y`` must be a fresh tensor)."""
    if act == "none":
        return y
    if act == "relu":
        return torch.relu_(y) if inplace else torch.relu(y)
    if act == "relu6":
        return F.hardtanh(y, 0.0, 6.0, inplace=inplace)
    if act == "leaky_relu":
        return F.leaky_relu(y, args[0], inplace=inplace)
    if act == "hardtanh":
        return F.hardtanh(y, args[0], args[1], inplace=inplace)
    if act == "clamp":
        lo = None if args[0] == -math.inf else args[0]
        hi = None if args[1] == math.inf else args[1]
        return y.clamp_(lo, hi) if inplace else y.clamp(lo, hi)
    if act == "elu":
        return F.elu(y, args[0], inplace=inplace)
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "silu":
        return F.silu(y, inplace=inplace)
    if act == "mish":
        return F.mish(y, inplace=inplace)
    if act == "hardswish":
        return F.hardswish(y, inplace=inplace)
    if act == "hardsigmoid":
        return F.hardsigmoid(y, inplace=inplace)
    if act == "sigmoid":
        return y.sigmoid_() if inplace else torch.sigmoid(y)
    if act == "tanh":
        return y.tanh_() if inplace else torch.tanh(y)
    raise ValueError(f"fxopt: unknown activation '{act}' (known: {', '.join(ACTIVATIONS)})")


def _check_act(act: str, act_args: Sequence[float]) -> None:
    n = ACTIVATIONS.get(act)
    if n is None:
        raise ValueError(f"fxopt: unknown activation '{act}' (known: {', '.join(ACTIVATIONS)})")
    if len(act_args) != n:
        raise ValueError(f"fxopt: activation '{act}' takes {n} act_args, got {list(act_args)}")


def _strictly_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _out_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _strictly_channels_last(x) else torch.contiguous_format


def _conv_fn(ndim: int):
    return F.conv1d if ndim == 3 else F.conv2d


def conv_act_reference(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                       act="none", act_args=()) -> torch.Tensor:
    """``act(conv(x) + bias + residual)`` with plain PyTorch ops, in the op's output layout."""
    _check_act(act, act_args)
    y = _conv_fn(x.dim())(x, weight, bias, list(stride), list(padding), list(dilation), groups)
    if residual is not None:
        y.add_(residual)
    y = apply_activation(y, act, act_args, inplace=True)
    fmt = _out_format(x)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


def linear_act_reference(x, weight, bias, residual=None, *, act="none", act_args=()) -> torch.Tensor:
    """``act(F.linear(x, weight, bias) + residual)`` with plain PyTorch ops (contiguous output)."""
    _check_act(act, act_args)
    y = F.linear(x, weight, bias)
    if residual is not None:
        y.add_(residual)
    y = apply_activation(y, act, act_args, inplace=True)
    return y if y.is_contiguous() else y.contiguous()


# -- CPU: oneDNN fused kernels where they apply -----------------------------------------------
def _find_mkldnn_ops():
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        ops = torch.ops.mkldnn
        return ops._convolution_pointwise.default, ops._convolution_pointwise.binary, \
            ops._reorder_convolution_weight.default
    except (AttributeError, RuntimeError):
        return None


_MKLDNN = _find_mkldnn_ops()
_mkldnn_failed = False
# act -> (oneDNN unary attr, scalars fn, algorithm); acts not here run in place after the conv.
_ONEDNN_UNARY = {
    "relu": ("relu", lambda a: [], None),
    "relu6": ("hardtanh", lambda a: [0.0, 6.0], None),
    "leaky_relu": ("leaky_relu", lambda a: [a[0]], None),
    "hardtanh": ("hardtanh", lambda a: [a[0], a[1]], None),
    "clamp": ("hardtanh", lambda a: [a[0], a[1]], None),
    "gelu": ("gelu", lambda a: [], "none"),
    "gelu_tanh": ("gelu", lambda a: [], "tanh"),
    "silu": ("swish", lambda a: [], None),
    "hardswish": ("hardswish", lambda a: [], None),
    "hardsigmoid": ("hardsigmoid", lambda a: [], None),
    "sigmoid": ("sigmoid", lambda a: [], None),
    "tanh": ("tanh", lambda a: [], None),
}


def mkldnn_available() -> bool:
    """Whether the CPU implementation can use oneDNN's fused convolution kernels."""
    return _MKLDNN is not None and not _mkldnn_failed


# id(weight) -> (weakref to the weight, {(version, conv params, input shape): packed weight}).
# A few shapes per weight are kept (batch sizes, or one module called at several sites).
_PACKED: dict[int, tuple[weakref.ref, dict]] = {}
_SHAPES_PER_WEIGHT = 4


def clear_weight_cache() -> None:
    """Drop the cached oneDNN-packed weights (they are rebuilt on the next call)."""
    _PACKED.clear()


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _PACKED.get(key)
    if entry is not None and entry[0] is ref:
        del _PACKED[key]


def _packed_weight(weight: torch.Tensor, padding, stride, dilation, groups, x: torch.Tensor):
    key = id(weight)
    # Inference tensors have no version counter (and cannot change outside inference mode).
    version = -1 if weight.is_inference() else weight._version
    params = (version, tuple(padding), tuple(stride), tuple(dilation), groups,
              tuple(x.shape))
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not weight:
        ref = weakref.ref(weight, lambda r, k=key: _forget(k, r))
        entry = _PACKED[key] = (ref, {})
    packed = entry[1].get(params)
    if packed is None:
        packed = _MKLDNN[2](weight.detach(), list(padding), list(stride), list(dilation), groups,
                            list(x.shape))
        if len(entry[1]) >= _SHAPES_PER_WEIGHT:
            entry[1].pop(next(iter(entry[1])))
        entry[1][params] = packed
    return packed


def _conv2d_act_cpu(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                    act="none", act_args=()):
    global _mkldnn_failed
    if (_MKLDNN is not None and not _mkldnn_failed and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and _strictly_channels_last(x) and weight.dim() == 4
            and (residual is None or residual.dtype == torch.float32)):
        _check_act(act, act_args)
        try:
            return _conv2d_act_onednn(x, weight, bias, stride, padding, dilation, groups, residual,
                                      act, act_args)
        except RuntimeError as e:  # an unsupported case in this build: use the reference from now
            _mkldnn_failed = True
            warnings.warn(f"fxopt: oneDNN fused convolution failed ({e}); using the reference "
                          f"implementation", RuntimeWarning, stacklevel=2)
    return conv_act_reference(x, weight, bias, stride, padding, dilation, groups, residual,
                              act=act, act_args=act_args)


def _conv2d_act_onednn(x, weight, bias, stride, padding, dilation, groups, residual, act, act_args):
    conv, conv_binary, _ = _MKLDNN
    packed = _packed_weight(weight, padding, stride, dilation, groups, x)
    padding, stride, dilation = list(padding), list(stride), list(dilation)
    if residual is None:
        unary = _ONEDNN_UNARY.get(act)
        if unary is not None:
            attr, scalars, algorithm = unary
            return conv(x, packed, bias, padding, stride, dilation, groups, attr,
                        scalars(act_args), algorithm)
        y = conv(x, packed, bias, padding, stride, dilation, groups, "none", [], None)
        return apply_activation(y, act, act_args, inplace=True)
    if not residual.is_contiguous(memory_format=torch.channels_last):
        # a broadcast residual is expanded first; oneDNN reads the full tensor
        shape = _conv_out_shape(x, weight, stride, padding, dilation)
        residual = residual.expand(shape).contiguous(memory_format=torch.channels_last)
    # oneDNN fuses only relu after the residual add; other activations run in place after it.
    unary = "relu" if act == "relu" else None
    y = conv_binary(x, residual, packed, bias, padding, stride, dilation, groups, "add", None,
                    unary, [], None)
    return y if unary is not None else apply_activation(y, act, act_args, inplace=True)


def _conv1d_act_cpu(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                    act="none", act_args=()):
    return conv_act_reference(x, weight, bias, stride, padding, dilation, groups, residual,
                              act=act, act_args=act_args)


# -- fake implementations: shapes and strides --------------------------------------------------
def _conv_out_shape(x, weight, stride, padding, dilation) -> list:
    spatial = []
    for i, (s, p, d) in enumerate(zip(stride, padding, dilation)):
        size, k = x.shape[2 + i], weight.shape[2 + i]
        spatial.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return [x.shape[0], weight.shape[0], *spatial]


def _conv_act_fake(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                   act="none", act_args=()):
    shape = _conv_out_shape(x, weight, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))


def _linear_act_fake(x, weight, bias, residual=None, *, act="none", act_args=()):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


for _name, _cpu in (("conv1d_act", _conv1d_act_cpu), ("conv2d_act", _conv2d_act_cpu)):
    LIB.impl(_name, _cpu, "CPU")
    LIB.impl(_name, conv_act_reference, "CUDA")  # the Triton kernels replace this
    torch.library.register_fake(f"fxopt::{_name}", _conv_act_fake, lib=LIB)
LIB.impl("linear_act", linear_act_reference, "CPU")
LIB.impl("linear_act", linear_act_reference, "CUDA")
torch.library.register_fake("fxopt::linear_act", _linear_act_fake, lib=LIB)


# -- MAC counts ---------------------------------------------------------------------------------


MAC_COUNTERS[torch.ops.fxopt.conv1d_act] = conv_weight_macs
MAC_COUNTERS[torch.ops.fxopt.conv2d_act] = conv_weight_macs
MAC_COUNTERS[torch.ops.fxopt.linear_act] = linear_weight_macs
