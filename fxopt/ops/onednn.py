"""oneDNN on the CPU: the fast path of ``conv2d_act``, and int8 convolution and linear with a
fused post-op (what ``fxopt.onednn_conv2d_int8`` / ``onednn_linear_int8`` run).

A channels-last float32 input takes ``torch.ops.mkldnn._convolution_pointwise`` (the kernels
Inductor uses): conv + bias + activation in one pass (the activations oneDNN fuses are the
``onednn`` column of the activation table), or conv + bias + residual (+ relu). Weights are
reordered once into oneDNN's blocked format and cached, keyed by the weight tensor, its storage
and its version: an in-place update of the weight (an optimizer step, ``load_state_dict``)
repacks and drops the copies of the old values, so training through the op holds one packed
copy per weight and never runs a stale one. A case this build cannot run turns the
path off for the process with a warning; the reference runs from then on.

    >>> y = conv2d_act_onednn(x, w, b, [1, 1], [1, 1], [1, 1], 1, None, "relu", [])  # or None

Int8 (``conv2d_int8_onednn``, ``linear_int8_onednn``): uint8 codes in, uint8 codes out,
``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise`` with the post-op of the
activation table's ``onednn_int8`` column (hardswish, SiLU, ... where PyTorch's quantized kernels
have none). oneDNN's packed int8 weights are opaque tensors that can be neither copied nor saved,
so the module keeps the plain int8 weight and this module packs it once per weight, grid and
input shape, cached like the float weights.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from fxopt.ir.activations import ACTIVATIONS, apply_activation
from fxopt.ops.shapes import conv_out_shape, strictly_channels_last

__all__ = ["mkldnn_available", "clear_weight_cache", "conv2d_act_onednn", "packed_weights",
           "packed_copies",
           "int8_post_op", "conv2d_int8_onednn", "linear_int8_onednn", "onednn_int8_available"]


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

# id(weight) -> (weakref to the weight, (data_ptr, version) packed from,
#               {(conv params, input shape): packed weight}).
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


def packed_copies() -> int:
    """How many packed copies are cached, every weight and shape (tests)."""
    return sum(len(entry[2]) for entry in _PACKED.values())


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _PACKED.get(key)
    if entry is not None and entry[0] is ref:
        del _PACKED[key]


def _packed_weight(weight: torch.Tensor, padding, stride, dilation, groups, x: torch.Tensor):
    pack = lambda: _MKLDNN[2](weight.detach(), list(padding), list(stride),  # noqa: E731
                              list(dilation), groups, list(x.shape))
    key = id(weight)
    # What the packed copy was made from: the storage and its version (an in-place update, an
    # optimizer step or load_state_dict, bumps the version; ``weight.data = t`` moves the
    # storage). Inference tensors have no version counter (and cannot change outside inference
    # mode). Only ``weight.data.<op>_()`` escapes both: call clear_weight_cache() after it.
    made_from = (weight.data_ptr(), -1 if weight.is_inference() else weight._version)
    params = (tuple(padding), tuple(stride), tuple(dilation), groups, tuple(x.shape))
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != made_from:
        ref = weakref.ref(weight, lambda r, k=key: _forget(k, r))
        entry = _PACKED[key] = (ref, made_from, {})  # a changed weight drops every old copy
    packed = entry[2].get(params)
    if packed is None:
        packed = pack()
        if len(entry[2]) >= _SHAPES_PER_WEIGHT:
            entry[2].pop(next(iter(entry[2])))
        entry[2][params] = packed
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


# -- int8 ---------------------------------------------------------------------------------------
def _find_int8_ops():
    try:
        ops = torch.ops.onednn
        return (ops.qconv_prepack.default, ops.qconv2d_pointwise.default,
                ops.qlinear_prepack.default, ops.qlinear_pointwise.default)
    except (AttributeError, RuntimeError):
        return None


_INT8 = _find_int8_ops()
_int8_state = {"failed": _INT8 is None or not torch.backends.mkldnn.is_available()}
# (id(w_q), kind, grid, conv params, input shape)
#   -> (weakref to w_q, its version, packed weight, zero points)
_INT8_PACKED: dict[tuple, tuple] = {}


def onednn_int8_available() -> bool:
    """Whether oneDNN's int8 convolution and linear kernels can run here."""
    return not _int8_state["failed"]


def int8_post_op(kind: str, act: str, act_args) -> tuple[str, list, str] | None:
    """(oneDNN post-op, scalars, algorithm) for a ``kind`` ("conv2d"/"linear") layer ending in
    ``act``, from the activation table; None when oneDNN's int8 kernel has no such post-op."""
    entry = ACTIVATIONS[act].onednn_int8.get(kind)
    if entry is None:
        return None
    name, scalars, algorithm = entry
    return name, scalars(act_args), algorithm


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


def _packed_int8(kind: str, w_q: torch.Tensor, key: tuple, pack) -> tuple:
    """(packed weight, int32 zero points) for ``w_q``, packed on the first call (per call
    site: this runs for every layer of every forward, so it does as little as it can)."""
    full = (id(w_q), kind, key)
    hit = _INT8_PACKED.get(full)
    if hit is not None and hit[0]() is w_q and hit[1] == _version(w_q):
        return hit[2], hit[3]
    packed = pack()
    if len(_INT8_PACKED) > 4096:  # many models in one process: start over
        _INT8_PACKED.clear()
    zeros = torch.zeros(w_q.shape[0], dtype=torch.int32)
    _INT8_PACKED[full] = (weakref.ref(w_q), _version(w_q), packed, zeros)
    return packed, zeros


def _run_int8(fn):
    try:
        return fn()
    except RuntimeError as e:  # an unsupported case in this build: the reference from now on
        _int8_state["failed"] = True
        warnings.warn(f"fxopt: oneDNN int8 kernel failed ({e}); using the reference "
                      f"implementation", RuntimeWarning, stacklevel=3)
        return None


_FLOAT_OUT = ("none", [], "")  # no post-op: the kernel's float output, for a float epilogue


def conv2d_int8_onednn(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                       y_scale, y_zp, post_op):
    """uint8 codes of ``post(conv2d(q) * x_scale * w_scale + bias)`` on the y grid, or None
    when oneDNN refuses it here. Output channels-last. ``post_op=None``: the float32 value of
    ``conv2d(q) * x_scale * w_scale + bias`` instead (no post-op, no requantize: the caller
    applies an activation oneDNN cannot fuse, then quantizes)."""
    prepack, conv, _, _ = _INT8
    key = (x_scale, x_zp, tuple(stride), tuple(padding), tuple(dilation), groups, q.shape)
    name, scalars, algorithm = post_op or _FLOAT_OUT
    y_scale, y_zp, dtype = (1.0, 0, torch.float32) if post_op is None else (y_scale, y_zp, None)

    def go():
        packed, zeros = _packed_int8("conv2d", w_q, key, lambda: prepack(
            w_q.detach(), w_scale.detach().float(), float(x_scale), int(x_zp), list(stride),
            list(padding), list(dilation), groups, list(q.shape)))
        return conv(q, float(x_scale), int(x_zp), packed, w_scale.float(), zeros,
                    None if bias is None else bias.float(), list(stride), list(padding),
                    list(dilation), groups, float(y_scale), int(y_zp), dtype, name, scalars,
                    algorithm)
    return _run_int8(go)


def linear_int8_onednn(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, post_op):
    """uint8 codes of ``post(linear(q) * x_scale * w_scale + bias)`` on the y grid, or None
    when oneDNN refuses it here; ``post_op=None``: the float32 value before any activation."""
    _, _, prepack, linear = _INT8
    name, scalars, algorithm = post_op or _FLOAT_OUT
    y_scale, y_zp, dtype = (1.0, 0, torch.float32) if post_op is None else (y_scale, y_zp, None)

    def go():
        packed, zeros = _packed_int8("linear", w_q, q.shape,
                                     lambda: prepack(w_q.detach(), list(q.shape)))
        return linear(q, float(x_scale), int(x_zp), packed, w_scale.float(), zeros,
                      None if bias is None else bias.float(), float(y_scale), int(y_zp), dtype,
                      name, scalars, algorithm)
    return _run_int8(go)
