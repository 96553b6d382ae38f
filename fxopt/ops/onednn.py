"""oneDNN on the CPU: the fast path of ``conv2d_act``, and int8 convolution and linear with a
fused post-op (what ``fxopt.onednn_conv2d_int8`` / ``onednn_linear_int8`` run).

A channels-last float32 (or bfloat16: ``precision="bf16"``) input takes
``torch.ops.mkldnn._convolution_pointwise`` (the kernels Inductor uses): conv + bias +
activation in one pass (the activations oneDNN fuses are the ``onednn`` column of the
activation table), or conv + bias + residual (+ relu). Weights are
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
from typing import Callable

import torch

from fxopt.ir.activations import ACTIVATIONS, apply_activation
from fxopt.ops.shapes import conv_out_shape, strictly_channels_last
from fxopt.ops.unversioned import on_written

__all__ = ["mkldnn_available", "clear_weight_cache", "conv2d_act_onednn", "packed_weights",
           "linear_applies", "linear_act_onednn",
           "packed_copies",
           "int8_post_op", "conv2d_int8_onednn", "linear_int8_onednn",
           "onednn_int8_available", "packed_int8"]


def _find_mkldnn_ops():
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        ops = torch.ops.mkldnn
        return ops._convolution_pointwise.default, ops._convolution_pointwise.binary, \
            ops._reorder_convolution_weight.default
    except (AttributeError, RuntimeError):
        return None


def _find_linear_ops():
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        ops = torch.ops.mkldnn
        # the binary overload: a residual add as the matmul's post-op
        return ops._linear_pointwise.default, ops._linear_pointwise.binary, \
            ops._reorder_linear_weight.default
    except (AttributeError, RuntimeError):
        return None


_MKLDNN = _find_mkldnn_ops()
_LINEAR = _find_linear_ops()
_state = {"failed": False, "linear_failed": False}

# id(weight) -> (weakref to the weight, (data_ptr, version) packed from,
#               {(conv params, input shape): packed weight}).
# A few shapes per weight are kept (batch sizes, or one module called at several sites).
_PACKED: dict[int, tuple[weakref.ref, dict]] = {}
on_written(_PACKED.clear)
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
    params = (tuple(padding), tuple(stride), tuple(dilation), groups, tuple(x.shape))
    return _cached(weight, params, pack)


def _cached(weight: torch.Tensor, params: tuple, pack):
    """The packed copy of ``weight`` for ``params``, made by ``pack()`` on a miss."""
    key = id(weight)
    # What the packed copy was made from: the storage and its version (an in-place update, an
    # optimizer step or load_state_dict, bumps the version; ``weight.data = t`` moves the
    # storage). Inference tensors have no version counter (and cannot change outside inference
    # mode). Only ``weight.data.<op>_()`` escapes both: fxopt.weights_written() after it
    # (fxopt.ops.unversioned) clears this cache and every other.
    made_from = (weight.data_ptr(), -1 if weight.is_inference() else weight._version)
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


# The float dtypes the fused kernels take: bfloat16 is ``precision="bf16"`` on the CPU (a
# CPU without native bf16 is refused before: ``fxopt.ir.precision.cpu_native_bf16``).
_FLOATS = (torch.float32, torch.bfloat16)


def applies(x, weight, bias, residual) -> bool:
    """Whether the oneDNN path takes this call (float32 or bfloat16 throughout, channels-last,
    2-D)."""
    dtype = x.dtype
    return (mkldnn_available() and dtype in _FLOATS and weight.dtype == dtype
            and (bias is None or bias.dtype == dtype) and strictly_channels_last(x)
            and weight.dim() == 4 and (residual is None or residual.dtype == dtype))


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


# -- bf16 linear ---------------------------------------------------------------------------------
# Below this many weights ``F.linear`` is faster than the packed matmul at one row (its fixed
# cost, ~18 us a call): bf16, one thread, minimum of 7 runs: 96x4 3.2 against 18.1 us, 240x64
# 23.3 against 18.3, 960x240 41.3 against 27.6, 1280x1000 133 against 69, 768x3072 244 against
# 110.
_PACKED_LINEAR_MIN = 8192


def linear_applies(x, weight, bias, residual) -> bool:
    """Whether ``linear_act_onednn`` takes this call: bfloat16 throughout, a weight of at least
    ``_PACKED_LINEAR_MIN`` elements (2-D, or a 1x1 conv's), a residual (if any) of the output's
    shape. Float32 linear layers stay on ``F.linear``."""
    if not (_LINEAR is not None and not _state["linear_failed"] and mkldnn_available()
            and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.dim() >= 2
            and (weight.dim() == 2 or weight.shape[2:] == (1, 1))
            and weight.numel() >= _PACKED_LINEAR_MIN
            and (bias is None or bias.dtype == torch.bfloat16)):
        return False
    return residual is None or (residual.dtype == torch.bfloat16
                                and tuple(residual.shape) == (*x.shape[:-1], weight.shape[0]))


def linear_act_onednn(x, weight, bias, act, act_args, residual=None):
    """``act(F.linear(x, weight, bias) + residual)`` in bf16 on oneDNN's matmul with the weight
    packed once per weight and row count (cached like the conv weights) and the activation as
    its post-op where the table has one: 5-10% faster than ``F.linear`` + activation on ViT-B's
    layers, 1.8x on a 1280 -> 1000 classifier at batch 1 (one thread). A residual is the
    matmul's binary ``add`` post-op (one rounding to bf16 instead of two), the activation then
    runs in place after it. None when this build refuses it (the path is then off for the
    process). ``weight`` may be a 1x1 conv's ``[out, in, 1, 1]``: a 1x1 convolution of a 1x1
    image."""
    linear, linear_binary, reorder = _LINEAR
    rows = x.numel() // x.shape[-1]
    # a [out, in, 1, 1] conv weight (a 1x1 conv of a 1x1 image) is cached under itself
    flat = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)
    try:
        packed = _cached(weight, ("linear", rows), lambda: reorder(flat.detach(), rows))
        if residual is not None:
            y = linear_binary(x, residual.contiguous(), packed, bias, "add")
            return apply_activation(y, act, act_args, inplace=True)
        unary = ACTIVATIONS[act].onednn
        if unary is None:
            y = linear(x, packed, bias, "none", [], "")
            return apply_activation(y, act, act_args, inplace=True)
        attr, scalars, algorithm = unary
        return linear(x, packed, bias, attr, scalars(act_args), algorithm or "")
    except RuntimeError as e:
        _state["linear_failed"] = True
        warnings.warn(f"fxopt: oneDNN bf16 linear failed ({e}); using F.linear",
                      RuntimeWarning, stacklevel=3)
        return None


# -- int8 ---------------------------------------------------------------------------------------
def _find_int8_ops():
    try:
        ops = torch.ops.onednn
        return (ops.qconv_prepack.default, ops.qconv2d_pointwise.default,
                ops.qlinear_prepack.default, ops.qlinear_pointwise.default,
                ops.qconv2d_pointwise.binary)
    except (AttributeError, RuntimeError):
        return None


_INT8 = _find_int8_ops()
_int8_state = {"failed": _INT8 is None or not torch.backends.mkldnn.is_available()}
# (id(w_q), kind, grid, conv params, input shape)
#   -> (weakref to w_q, (id, version, data_ptr) of w_q and its deps, packed weight, zero points)
_INT8_PACKED: dict[tuple, tuple] = {}
on_written(_INT8_PACKED.clear)


def onednn_int8_available() -> bool:
    """Whether oneDNN's int8 convolution and linear kernels can run here."""
    return not _int8_state["failed"]


def int8_post_op(kind: str, act: str, act_args) -> tuple[str, list, str] | None:
    """(oneDNN post-op, scalars, algorithm) for a ``kind`` ("conv2d"/"linear") layer ending in
    ``act``, from the activation table: its ``onednn_int8`` column, else what its
    ``quantized_cpu`` column says every int8 kernel runs (``"fused"``: none and relu, oneDNN's
    post-ops of the same name; ``"clamp"``: relu6, hardtanh, clamp, oneDNN's ``hardtanh`` on
    the row's bounds); None when oneDNN's int8 kernel has no such post-op."""
    row = ACTIVATIONS[act]
    entry = row.onednn_int8.get(kind)
    if entry is not None:
        name, scalars, algorithm = entry
        return name, scalars(act_args), algorithm
    if row.quantized_cpu == "fused":
        return row.name, [], ""
    if row.quantized_cpu == "clamp":
        return "hardtanh", list(row.bounds(act_args)), ""
    return None


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


def _packed_int8(kind: str, w_q: torch.Tensor, key: tuple, pack, deps: tuple = ()) -> tuple:
    """(packed weight, int32 zero points) for ``w_q``, packed on the first call (per call
    site: this runs for every layer of every forward, so it does as little as it can). The
    packing is redone once ``w_q`` or any of ``deps`` (the other tensors ``pack`` reads: the
    weight scales, a bias packed in) is replaced, written in place or given new memory
    (``t.data = ...``)."""
    full = (id(w_q), kind, key)
    state = tuple((id(t), _version(t), t.data_ptr()) for t in (w_q, *deps) if t is not None)
    hit = _INT8_PACKED.get(full)
    if hit is not None and hit[0]() is w_q and hit[1] == state:
        return hit[2], hit[3]
    packed = pack()
    if len(_INT8_PACKED) > 4096:  # many models in one process: start over
        _INT8_PACKED.clear()
    zeros = torch.zeros(w_q.shape[0], dtype=torch.int32)
    _INT8_PACKED[full] = (weakref.ref(w_q), state, packed, zeros)
    return packed, zeros


def forget_dead_weights() -> int:
    """Drop the packed weights of int8 weights no longer alive (a lowering that was measured
    and not kept: ``cpu_engine="fastest"``); how many were dropped."""
    dead = [k for k, hit in _INT8_PACKED.items() if hit[0]() is None]
    for k in dead:
        del _INT8_PACKED[k]
    return len(dead)


def packed_int8(kind: str, w_q: torch.Tensor, key: tuple, pack, deps: tuple = ()):
    """What ``pack()`` returns for ``w_q`` under ``kind`` and ``key``, made on the first call and
    cached like oneDNN's packed weights, redone when ``w_q`` or ``deps`` change
    (``fxopt.ops.cpu`` keeps PyTorch's quantized packed params here: kind
    ``"conv2d_fbgemm"``, ...)."""
    return _packed_int8(kind, w_q, key, pack, deps)[0]


def _run_int8(fn):
    try:
        return fn()
    except RuntimeError as e:  # an unsupported case in this build: the reference from now on
        _int8_state["failed"] = True
        warnings.warn(f"fxopt: oneDNN int8 kernel failed ({e}); using the reference "
                      f"implementation", RuntimeWarning, stacklevel=3)
        return None


_FLOAT_OUT = ("none", [], "")  # no post-op: the kernel's float output, for a float epilogue


def _conv_packed(q, w_q, w_scale, stride, padding, dilation, groups, x_scale, x_zp) -> tuple:
    """(packed weight, zero points) of a convolution for codes shaped like ``q``."""
    key = (x_scale, x_zp, tuple(stride), tuple(padding), tuple(dilation), groups, q.shape)
    return _packed_int8("conv2d", w_q, key, lambda: _INT8[0](
        w_q.detach(), w_scale.detach().float(), float(x_scale), int(x_zp), list(stride),
        list(padding), list(dilation), groups, list(q.shape)), (w_scale,))


def _strided_pointwise(w_q: torch.Tensor, stride, padding) -> bool:
    """A 1x1 convolution with a stride and no padding (a ResNet or RegNet downsampling
    shortcut). PyTorch's ``onednn::qconv2d_pointwise`` computes it wrongly on several threads
    for a batch of two or more where the input channels are not a multiple of 16 (torch 2.14.1,
    AVX2 EPYC without VNNI, 2 threads: up to 169 codes off in a sweep of 1x1 stride-2 layers of
    24-440 input channels; exact on one thread, on each sample alone, with a 3x3 kernel, and on
    fbgemm). The conv runs instead as the stride-1 conv of the input's strided subsample: the
    same products and sums (``tests/fxopt/ops/test_cpu.py``)."""
    return tuple(w_q.shape[-2:]) == (1, 1) and tuple(stride) != (1, 1) and \
        all(int(p) == 0 for p in padding)


def _subsample(q: torch.Tensor, stride) -> torch.Tensor:
    """The pixels a 1x1 conv with ``stride`` reads, in ``q``'s memory format."""
    fmt = torch.channels_last if strictly_channels_last(q) else torch.contiguous_format
    return q[:, :, ::int(stride[0]), ::int(stride[1])].contiguous(memory_format=fmt)


def conv2d_int8_call(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                     y_scale, y_zp, post_op,
                     affine: tuple[float, float] | None = None
                     ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``conv2d_int8_onednn`` without a residual as a function of codes shaped like ``q``: the
    weight packed and every other argument converted once (a bound call,
    ``fxopt.infra.direct``); None when oneDNN refuses to pack it here. The function returns
    None where oneDNN refuses the call (as ``conv2d_int8_onednn``). ``affine=(a, c)``: the
    post-op reads ``a * (conv + bias) + c`` (the weight scales times ``a``, the bias
    ``bias * a + c``; the packed weight does not depend on the scales)."""
    if _strided_pointwise(w_q, stride, padding):
        call = conv2d_int8_call(_subsample(q, stride), w_q, w_scale, bias, [1, 1], padding,
                                dilation, groups, x_scale, x_zp, y_scale, y_zp, post_op, affine)
        return None if call is None else (lambda codes: call(_subsample(codes, stride)))
    conv = _INT8[1]
    name, scalars, algorithm = post_op or _FLOAT_OUT
    y_scale, y_zp, dtype = (1.0, 0, torch.float32) if post_op is None else (y_scale, y_zp, None)

    def bind():
        packed, zeros = _conv_packed(q, w_q, w_scale, stride, padding, dilation, groups, x_scale,
                                     x_zp)
        scales, b = w_scale.float(), None if bias is None else bias.float()
        if affine is not None:
            a, c = affine
            scales = scales * a
            b = torch.full_like(scales, c) if b is None else b * a + c
        args = (float(x_scale), int(x_zp), packed, scales, zeros, b, list(stride),
                list(padding), list(dilation), groups, float(y_scale), int(y_zp), dtype, name,
                scalars, algorithm)
        return lambda codes: _run_int8(lambda: conv(codes, *args))
    return _run_int8(bind)


def conv2d_int8_onednn(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                       y_scale, y_zp, post_op, residual=None, residual_grid=(1.0, 0)):
    """uint8 codes of ``post(conv2d(q) * x_scale * w_scale + bias [+ residual])`` on the y
    grid, or None when oneDNN refuses it here. Output channels-last. A ``residual`` (uint8
    codes on ``residual_grid``, the conv's output shape) is oneDNN's ``sum`` post-op
    (``qconv2d_pointwise.binary``), which writes into its accumulator: it gets a copy, the
    caller's codes stay as they were; ``post_op`` then runs after the sum (none or relu).
    ``post_op=None`` (no residual): the float32 value of ``conv2d(q) * x_scale * w_scale +
    bias`` instead (no post-op, no requantize: the caller applies an activation oneDNN cannot
    fuse, then quantizes)."""
    if _strided_pointwise(w_q, stride, padding):
        q, stride = _subsample(q, stride), [1, 1]
    if residual is None:
        call = conv2d_int8_call(q, w_q, w_scale, bias, stride, padding, dilation, groups,
                                x_scale, x_zp, y_scale, y_zp, post_op)
        return None if call is None else call(q)
    conv_binary = _INT8[4]
    name, scalars, algorithm = post_op

    def go():
        packed, zeros = _conv_packed(q, w_q, w_scale, stride, padding, dilation, groups, x_scale,
                                     x_zp)
        b = None if bias is None else bias.float()
        accum = residual.contiguous(memory_format=torch.channels_last)
        accum = accum.clone(memory_format=torch.channels_last) if accum is residual else accum
        return conv_binary(q, float(x_scale), int(x_zp), packed, w_scale.float(), zeros, accum,
                           b, list(stride), list(padding), list(dilation), groups,
                           float(y_scale), int(y_zp), None, float(residual_grid[0]),
                           int(residual_grid[1]), "sum", 1.0,
                           None if name == "none" else name, scalars, algorithm or None)
    return _run_int8(go)


def linear_int8_call(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp,
                     post_op) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``linear_int8_onednn`` as a function of contiguous codes shaped like ``q`` (bound once,
    as ``conv2d_int8_call``); None when oneDNN refuses it here."""
    _, _, prepack, linear, _ = _INT8
    name, scalars, algorithm = post_op or _FLOAT_OUT
    y_scale, y_zp, dtype = (1.0, 0, torch.float32) if post_op is None else (y_scale, y_zp, None)

    def bind():
        packed, zeros = _packed_int8("linear", w_q, q.shape,
                                     lambda: prepack(w_q.detach(), list(q.shape)))
        args = (float(x_scale), int(x_zp), packed, w_scale.float(), zeros,
                None if bias is None else bias.float(), float(y_scale), int(y_zp), dtype,
                name, scalars, algorithm)
        return lambda codes: _run_int8(lambda: linear(codes, *args))
    return _run_int8(bind)


def linear_int8_onednn(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, post_op):
    """uint8 codes of ``post(linear(q) * x_scale * w_scale + bias)`` on the y grid, or None
    when oneDNN refuses it here; ``post_op=None``: the float32 value before any activation."""
    call = linear_int8_call(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, post_op)
    return None if call is None else call(q)
