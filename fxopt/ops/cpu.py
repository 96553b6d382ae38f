"""Ops the CPU int8 lowering writes where PyTorch's quantized kernels stop.

PyTorch's quantized CPU kernels fuse relu and nothing else; a conv + hardswish (MobileNetV3),
conv + SiLU (EfficientNet) or linear + GELU (transformers) used to stay float on the CPU.
oneDNN's int8 kernels fuse those post-ops (``torch.ops.onednn.qconv2d_pointwise`` /
``qlinear_pointwise``, what Inductor emits for PT2E models); these ops run them on plain uint8
codes::

    y = torch.ops.fxopt.onednn_conv2d_int8(q, w_q, w_scale, b, [1, 1], [1, 1], [1, 1], 1,
                                           0.03, 128, 0.02, 100, act="hardswish")
    # == conv2d_int8(q, ..., act="hardswish", out_int8=True), channels-last uint8 codes

Codes in on the ``x`` grid (uint8, affine), codes out on the ``y`` grid; weights int8 per output
channel, symmetric, held as plain tensors (the module saves and copies) and packed for oneDNN
once per weight, grid and input shape (``fxopt.ops.onednn``). Which activations each kind takes
is the ``onednn_int8`` column of the activation table; any other activation (sigmoid and
hardsigmoid gates, GELU or tanh after a convolution, leaky ReLU, ...) runs on the kernel's
float32 output (``output_dtype=torch.float32``: int8 in, the int32 sums scaled and the bias
added in the kernel), then quantizes onto the y grid: the convolution itself stays int8. The
reference, on any device and
wherever oneDNN refuses, is the int8 IR's own (``conv2d_int8_reference``): oneDNN sums the same
integers exactly; its float epilogue may round a tie the other way, which the lowering's
lockstep check allows (one code).
"""
from __future__ import annotations

import warnings

import torch

from fxopt.ir.activations import apply_activation
from fxopt.ops import onednn
from fxopt.ops.int8 import conv2d_int8_reference, linear_int8_reference
from fxopt.ops.schema import define_op, weight_macs
from fxopt.ops.shapes import conv_out_shape, to_format

__all__ = ["ONEDNN_CONV2D_INT8", "ONEDNN_LINEAR_INT8", "OnednnConv2dInt8", "OnednnLinearInt8"]


def _grid(scale: float, zp: int, device):
    return (torch.tensor(scale, dtype=torch.float32, device=device),
            torch.tensor(zp, dtype=torch.int64, device=device))


def _conv_reference(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                    y_scale, y_zp, *, act="none", act_args=()):
    y = conv2d_int8_reference(q, w_q, w_scale, bias, stride, padding, dilation, groups,
                              *_grid(x_scale, x_zp, q.device), *_grid(y_scale, y_zp, q.device),
                              act=act, act_args=act_args, out_int8=True)
    return to_format(y, torch.channels_last)


def _linear_reference(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, *, act="none",
                      act_args=()):
    return linear_int8_reference(q, w_q, w_scale, bias, *_grid(x_scale, x_zp, q.device),
                                 *_grid(y_scale, y_zp, q.device), act=act, act_args=act_args,
                                 out_int8=True)


_FLOAT_EPILOGUE = "float"  # oneDNN has no post-op for the activation: it runs after, in float


def _fast(q, w_q, kind: str, act: str, act_args):
    """oneDNN's post-op for this call, ``_FLOAT_EPILOGUE`` when oneDNN fuses no such post-op
    (the kernel writes float32, the activation and the requantize follow), or None (the
    reference runs)."""
    if not (onednn.onednn_int8_available() and q.dtype == torch.uint8
            and w_q.dtype == torch.int8):
        return None
    return onednn.int8_post_op(kind, act, act_args) or _FLOAT_EPILOGUE


def _requantize(y, act: str, act_args, y_scale: float, y_zp: int):
    """uint8 codes of ``act(y)`` on the y grid (``y``: the kernel's fresh float32 output)."""
    y = apply_activation(y, act, act_args, inplace=True)
    # PyTorch's quantize kernel: one pass, round half to even as the IR's (4x faster here than
    # round/add/clamp in three, 12x than quantized_decomposed's); its deprecation warning is
    # about quantized tensors, which go no further than int_repr
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        return torch.quantize_per_tensor(y, float(y_scale), int(y_zp), torch.quint8).int_repr()


def _conv_cpu(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp, y_scale,
              y_zp, *, act="none", act_args=()):
    post = _fast(q, w_q, "conv2d", act, act_args) if q.dim() == 4 else None
    if post is not None:
        epilogue = post is _FLOAT_EPILOGUE
        y = onednn.conv2d_int8_onednn(q, w_q, w_scale, bias, stride, padding, dilation, groups,
                                      x_scale, x_zp, y_scale, y_zp, None if epilogue else post)
        if y is not None:
            return _requantize(y, act, act_args, y_scale, y_zp) if epilogue else y
    return _conv_reference(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale,
                           x_zp, y_scale, y_zp, act=act, act_args=act_args)


def _linear_cpu(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, *, act="none",
                act_args=()):
    post = _fast(q, w_q, "linear", act, act_args) if q.dim() >= 2 else None
    if post is not None:
        epilogue = post is _FLOAT_EPILOGUE
        y = onednn.linear_int8_onednn(q.contiguous(), w_q, w_scale, bias, x_scale, x_zp,
                                      y_scale, y_zp, None if epilogue else post)
        if y is not None:
            return _requantize(y, act, act_args, y_scale, y_zp) if epilogue else y
    return _linear_reference(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, act=act,
                             act_args=act_args)


def _conv_fake(q, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp, y_scale,
               y_zp, *, act="none", act_args=()):
    shape = conv_out_shape(q, w_q.shape[2:], w_q.shape[0], stride, padding, dilation)
    return torch.empty(shape, dtype=torch.uint8, device=q.device,
                       memory_format=torch.channels_last)


def _linear_fake(q, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, *, act="none",
                 act_args=()):
    return q.new_empty((*q.shape[:-1], w_q.shape[0]), dtype=torch.uint8)


_GRIDS = "float x_scale, int x_zp, float y_scale, int y_zp, *, str act='none', " \
         "float[] act_args=[]) -> Tensor"
ONEDNN_CONV2D_INT8 = define_op(
    "onednn_conv2d_int8(Tensor q, Tensor w_q, Tensor w_scale, Tensor? bias, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups, " + _GRIDS,
    family="cpu", quantized=True, reference=_conv_reference, cpu=_conv_cpu, fake=_conv_fake,
    macs=weight_macs("w_q"))
ONEDNN_LINEAR_INT8 = define_op(
    "onednn_linear_int8(Tensor q, Tensor w_q, Tensor w_scale, Tensor? bias, " + _GRIDS,
    family="cpu", quantized=True, reference=_linear_reference, cpu=_linear_cpu,
    fake=_linear_fake, macs=weight_macs("w_q"))

OnednnConv2dInt8 = ONEDNN_CONV2D_INT8.view
OnednnLinearInt8 = ONEDNN_LINEAR_INT8.view
