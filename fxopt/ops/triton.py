"""Float ops that run fxopt's Triton kernels: what ``lower_to_triton`` writes for float layers.

Each op takes its weight already in the layout its kernel reads (prepared once by the pass and
held as a buffer) and its grids as plain numbers (no device sync per call):

    y = torch.ops.fxopt.triton_conv2d(x, w_nhwc, b, [1, 1], [1, 1], [1, 1], 1, res, act="relu")
    y = torch.ops.fxopt.triton_depthwise_conv2d(x, w_khkw_c, b, [3, 3], [2, 2], [1, 1], [1, 1])
    y = torch.ops.fxopt.triton_linear(x, w_nk, b, act="gelu")
    y = torch.ops.fxopt.triton_add(y, r, act="relu")          # float residual add, b broadcasts
    y = torch.ops.fxopt.triton_mul(y, gate)                    # float SE gate [N, C, 1, 1]
    s, y = torch.ops.fxopt.triton_add_layer_norm(x, r, [768], w, b, 1e-6)  # add + LayerNorm

Same math as ``conv2d_act`` / ``linear_act``; ``triton_add`` / ``triton_mul`` are
``act(a + b)`` / ``act(a * b)`` (rounded once to the dtype, as PyTorch adds and multiplies; ``b``
broadcasts to ``a``); ``triton_add_layer_norm`` is ``add_layer_norm`` (the sum and its
LayerNorm, both contiguous). Convolution outputs are always channels-last (the kernels write
NHWC), an add or a product keeps its first input's layout, so a chain of convolutions carries NHWC
activations without layout copies; an input that is not channels-last is converted on entry
(the pass reports where that would happen). The int8 ops are in ``fxopt.ops.triton_int8``;
where an op runs (CUDA, the interpreter, the CPU reference) is ``fxopt.ops.triton_launch``.

Gradients: the float ops' backward is the vjp of the same math in standard ops (their
``differentiable`` forms below, declared through the schema).
"""
from __future__ import annotations

import math
import operator

import torch

from fxopt.ir.activations import apply_activation
from fxopt.ops.fused import (add_layer_norm_reference, conv_act_decomposed, conv_act_reference,
                             linear_act_decomposed, linear_act_reference)
from fxopt.ops.schema import weight_macs
from fxopt.ops.triton_launch import (ON_CPU_ENV, add_format, nhwc_out, conv_shape,
                                     triton_op, dense_residual, depthwise_weight4,
                                     kernels_for, run_on, nhwc, triton_on_cpu)

__all__ = ["triton_on_cpu", "ON_CPU_ENV", "TRITON_CONV2D", "TRITON_DEPTHWISE_CONV2D",
           "TRITON_LINEAR", "TRITON_ADD", "TRITON_MUL", "TRITON_ADD_LAYER_NORM"]


def _tf32(x, conv: bool) -> bool:
    # Match what the graph before lowering ran: cuDNN's TF32 setting for convolutions, cuBLAS's
    # for matmuls; the check's tolerance follows the same flags (tolerances.tolerance_for).
    flag = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    return bool(x.is_cuda and x.dtype == torch.float32 and flag)


# -- float ------------------------------------------------------------------------------------
def _triton_conv2d(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                   act="none", act_args=()):
    shape = conv_shape(x, weight.shape[2], weight.shape[3], weight.shape[0], stride, padding,
                        dilation)
    if kernels_for(x) is None:
        return nhwc_out(conv_act_reference(x, weight, bias, stride, padding, dilation, groups,
                                      residual, act=act, act_args=act_args))
    res = dense_residual(residual, shape, torch.channels_last)
    return run_on(x, lambda tk: tk.conv.conv2d(nhwc(x), weight, bias, list(stride), list(padding),
                                        list(dilation), groups, res, act=act,
                                        act_args=list(act_args), allow_tf32=_tf32(x, True)))


def _triton_depthwise_conv2d(x, weight, bias, kernel_size, stride, padding, dilation,
                             residual=None, *, act="none", act_args=()):
    if kernels_for(x) is None:
        w4 = depthwise_weight4(weight, kernel_size)
        return nhwc_out(conv_act_reference(x, w4, bias, stride, padding, dilation, x.shape[1],
                                      residual, act=act, act_args=act_args))
    shape = conv_shape(x, kernel_size[0], kernel_size[1], x.shape[1], stride, padding, dilation)
    res = dense_residual(residual, shape, torch.channels_last)
    return run_on(x, lambda tk: tk.depthwise.depthwise_conv2d(
        nhwc(x), weight, bias, list(stride), list(padding), list(dilation), res, act=act,
        act_args=list(act_args), kernel_size=list(kernel_size)))


def _triton_linear(x, weight, bias, residual=None, *, act="none", act_args=()):
    if kernels_for(x) is None:
        return linear_act_reference(x, weight, bias, residual, act=act, act_args=act_args)
    res = dense_residual(residual, (*x.shape[:-1], weight.shape[0]))
    return run_on(x, lambda tk: tk.gemm.linear(x, weight, bias, res, act=act,
                                               act_args=list(act_args),
                                               allow_tf32=_tf32(x, False)))


def _float_binary(a, b, act, act_args, fn, launcher):
    """``act(fn(a, b))`` in ``a``'s layout: ``launcher(tk.elementwise)`` on Triton, else what the
    graph ran before (``fn`` in the dtype, then ``act``)."""
    fmt = add_format(a)
    if kernels_for(a) is None:
        return apply_activation(fn(a, b), act, list(act_args)).contiguous(memory_format=fmt)
    return run_on(a, lambda tk: launcher(tk.elementwise)(a.contiguous(memory_format=fmt), b,
                                                       act=act, act_args=list(act_args)))


def _triton_add(a, b, *, act="none", act_args=()):
    return _float_binary(a, b, act, act_args, operator.add, lambda E: E.add)


def _triton_mul(a, b, *, act="none", act_args=()):
    return _float_binary(a, b, act, act_args, operator.mul, lambda E: E.mul)


def _triton_add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    if kernels_for(x) is None:
        s, y = add_layer_norm_reference(x, residual, normalized_shape, weight, bias, eps)
        return s.contiguous(), y.contiguous()
    n = math.prod(normalized_shape)
    return run_on(x, lambda tk: tk.norm.add_layer_norm(x, residual, weight, bias, eps=eps, n=n))


# -- the float ops' differentiable forms (standard ops, out of place): their backward --------
def _depthwise_differentiable(x, weight, bias, kernel_size, stride, padding, dilation,
                              residual=None, *, act="none", act_args=()):
    return conv_act_decomposed(x, depthwise_weight4(weight, kernel_size), bias, stride, padding,
                               dilation, x.shape[1], residual, act=act, act_args=act_args)


def _add_differentiable(a, b, *, act="none", act_args=()):
    return apply_activation(a + b, act, list(act_args))


def _mul_differentiable(a, b, *, act="none", act_args=()):
    return apply_activation(a * b, act, list(act_args))


# -- fake implementations: shapes, dtypes, strides ----------------------------------------------
def _conv_fake(x, weight, bias, stride, padding, dilation, groups, residual=None, *, act="none",
               act_args=()):
    shape = conv_shape(x, weight.shape[2], weight.shape[3], weight.shape[0], stride, padding,
                        dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _depthwise_fake(x, weight, bias, kernel_size, stride, padding, dilation, residual=None, *,
                    act="none", act_args=()):
    shape = conv_shape(x, kernel_size[0], kernel_size[1], x.shape[1], stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _linear_fake(x, weight, bias, residual=None, *, act="none", act_args=()):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _float_binary_fake(a, b, *, act="none", act_args=()):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device, memory_format=add_format(a))


def _add_layer_norm_fake(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    return (torch.empty(shape, dtype=x.dtype, device=x.device),
            torch.empty(shape, dtype=x.dtype, device=x.device))


# -- the ops ------------------------------------------------------------------------------------
_ACT = "*, str act='none', float[] act_args=[]) -> Tensor"
_DEPTHWISE_MACS = weight_macs("weight", depthwise_kernel="weight")  # weight [KH*KW, C]


TRITON_CONV2D = triton_op(
    "triton_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, Tensor? residual=None, " + _ACT,
    _triton_conv2d, _conv_fake, weight_macs("weight"), differentiable=conv_act_decomposed)
TRITON_DEPTHWISE_CONV2D = triton_op(
    "triton_depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] kernel_size, "
    "int[2] stride, int[2] padding, int[2] dilation, Tensor? residual=None, " + _ACT,
    _triton_depthwise_conv2d, _depthwise_fake, _DEPTHWISE_MACS,
    differentiable=_depthwise_differentiable)
TRITON_LINEAR = triton_op(
    "triton_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual=None, " + _ACT,
    _triton_linear, _linear_fake, weight_macs("weight"), differentiable=linear_act_decomposed)
TRITON_ADD = triton_op("triton_add(Tensor a, Tensor b, " + _ACT, _triton_add, _float_binary_fake,
                 differentiable=_add_differentiable)
TRITON_MUL = triton_op("triton_mul(Tensor a, Tensor b, " + _ACT, _triton_mul, _float_binary_fake,
                 differentiable=_mul_differentiable)
TRITON_ADD_LAYER_NORM = triton_op(
    "triton_add_layer_norm(Tensor x, Tensor residual, int[] normalized_shape, Tensor? weight=None,"
    " Tensor? bias=None, float eps=1e-05) -> (Tensor, Tensor)",
    _triton_add_layer_norm, _add_layer_norm_fake, differentiable=add_layer_norm_reference)
