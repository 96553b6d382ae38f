"""The CPU fast path of ``conv2d_act``: oneDNN's fused convolution kernels.

A channels-last float32 input takes ``torch.ops.mkldnn._convolution_pointwise`` (the kernels
Inductor uses): conv + bias + activation in one pass (the activations oneDNN fuses are the
``onednn`` column of the activation table), or conv + bias + residual (+ relu). Weights are
reordered once into oneDNN's blocked format and cached, keyed by the weight tensor and its
version (an in-place update of the weight repacks). A case this build cannot run turns the
path off for the process with a warning; the reference runs from then on.

    >>> y = conv2d_act_onednn(x, w, b, [1, 1], [1, 1], [1, 1], 1, None, "relu", [])  # or None
"""
from __future__ import annotations

import warnings
import weakref

import torch

from fxopt.ir.activations import ACTIVATIONS, apply_activation
from fxopt.ops.shapes import conv_out_shape, strictly_channels_last

__all__ = ["mkldnn_available", "clear_weight_cache", "conv2d_act_onednn", "packed_weights"]


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
_state = {"failed": False}

# id(weight) -> (weakref to the weight, {(version, conv params, input shape): packed weight}).
# A few shapes per weight are kept (batch sizes, or one module called at several sites).
_PACKED: dict[int, tuple[weakref.ref, dict]] = {}
_SHAPES_PER_WEIGHT = 4


def mkldnn_available() -> bool:
    """Whether the CPU implementation can use oneDNN's fused convolution kernels."""
    return _MKLDNN is not None and not _state["failed"]


def clear_weight_cache() -> None:
    """Drop the cached oneDNN-packed weights (they are rebuilt on the next call)."""
    _PACKED.clear()


def packed_weights() -> int:
    """How many weights have a packed copy cached (tests)."""
    return len(_PACKED)


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _PACKED.get(key)
    if entry is not None and entry[0] is ref:
        del _PACKED[key]


def _packed_weight(weight: torch.Tensor, padding, stride, dilation, groups, x: torch.Tensor):
    key = id(weight)
    # Inference tensors have no version counter (and cannot change outside inference mode).
    version = -1 if weight.is_inference() else weight._version
    params = (version, tuple(padding), tuple(stride), tuple(dilation), groups, tuple(x.shape))
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


def applies(x, weight, bias, residual) -> bool:
    """Whether the oneDNN path takes this call (float32, channels-last, 2-D)."""
    return (mkldnn_available() and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and strictly_channels_last(x)
            and weight.dim() == 4 and (residual is None or residual.dtype == torch.float32))


def conv2d_act_onednn(x, weight, bias, stride, padding, dilation, groups, residual, act,
                      act_args):
    """``act(conv2d(x) + bias + residual)`` on oneDNN, or None when this build refuses it
    (the path is then off for the process)."""
    try:
        return _run(x, weight, bias, stride, padding, dilation, groups, residual, act, act_args)
    except RuntimeError as e:
        _state["failed"] = True
        warnings.warn(f"fxopt: oneDNN fused convolution failed ({e}); using the reference "
                      f"implementation", RuntimeWarning, stacklevel=3)
        return None


def _run(x, weight, bias, stride, padding, dilation, groups, residual, act, act_args):
    conv, conv_binary, _ = _MKLDNN
    packed = _packed_weight(weight, padding, stride, dilation, groups, x)
    padding, stride, dilation = list(padding), list(stride), list(dilation)
    if residual is None:
        unary = ACTIVATIONS[act].onednn
        if unary is not None:
            attr, scalars, algorithm = unary
            return conv(x, packed, bias, padding, stride, dilation, groups, attr,
                        scalars(act_args), algorithm)
        y = conv(x, packed, bias, padding, stride, dilation, groups, "none", [], None)
        return apply_activation(y, act, act_args, inplace=True)
    if not residual.is_contiguous(memory_format=torch.channels_last):
        # a broadcast residual is expanded first; oneDNN reads the full tensor
        shape = conv_out_shape(x, weight.shape[2:], weight.shape[0], stride, padding, dilation)
        residual = residual.expand(shape).contiguous(memory_format=torch.channels_last)
    # oneDNN fuses only relu after the residual add; other activations run in place after it.
    unary = "relu" if act == "relu" else None
    y = conv_binary(x, residual, packed, bias, padding, stride, dilation, groups, "add", None,
                    unary, [], None)
    return y if unary is not None else apply_activation(y, act, act_args, inplace=True)
