"""Fused float ops: a convolution or linear layer with its epilogue, in one call.

``fuse_act`` writes them; ``lower_to_triton`` maps them onto Triton kernels on CUDA::

    y = torch.ops.fxopt.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, residual, act="relu")
    # == relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + residual)

The epilogue is bias, then residual, then the activation ``act`` (a name of the activation
table ``fxopt.ir.activations``, its parameters in ``act_args``: ``leaky_relu``
[negative_slope], ``hardtanh``/``clamp`` [min, max] with +-inf for a missing clamp bound,
``elu`` [alpha]).

``conv_transpose2d_act`` is the same epilogue after a transposed convolution; its parameters
are ``F.conv_transpose2d``'s, in its order (stride, padding, output_padding, groups, dilation)::

    y = torch.ops.fxopt.conv_transpose2d_act(x, w, b, [2, 2], [1, 1], [1, 1], 1, [1, 1],
                                             act="silu")
    # == silu(F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation))

Layout contract: the output of a conv op is channels-last when the input is (strictly)
channels-last, contiguous otherwise. On the CPU a channels-last float32 ``conv2d_act`` runs
oneDNN's fused kernels (``fxopt.ops.onednn``); everything else runs the reference, the
convolution then the epilogue in place on its output. ``decompose`` is the same math with
standard ops only and no in-place update: what the ONNX export and quantization-aware training
run, and the ops' gradient (its vjp, registered by the schema): a fused graph trains as the
layers it replaced, on the oneDNN path too.

``add_layer_norm`` is a transformer block's residual add and the LayerNorm that reads it, with
both values as outputs (in a pre-norm block the sum is also the next residual)::

    s, y = torch.ops.fxopt.add_layer_norm(x, r, [768], w, b, 1e-6)
    # == (x + r, F.layer_norm(x + r, [768], w, b, 1e-6))

On the CPU it is those two PyTorch calls (no faster kernel there); on CUDA ``lower_to_triton``
runs it as one Triton kernel (``fxopt.triton_kernels.norm``).

    >>> FusedConv.of(node).residual          # the arguments of a call, by name
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.ir.activations import apply_activation, check_activation
from fxopt.ir.graph import tensor_meta
from fxopt.ops import onednn
from fxopt.ops.schema import OpView, define_op, weight_macs
from fxopt.ops.shapes import conv_out_shape, out_format, to_format

__all__ = ["CONV1D_ACT", "CONV2D_ACT", "CONV_TRANSPOSE2D_ACT", "LINEAR_ACT", "ADD_LAYER_NORM",
           "FusedConv", "FusedLinear", "FusedLayer", "FUSED_OPS", "add_layer_norm_reference",
           "conv_act_reference", "conv_transpose_act_reference", "linear_act_reference",
           "conv_act_decomposed", "conv_transpose_act_decomposed", "linear_act_decomposed"]


def _conv_fn(ndim: int):
    return F.conv1d if ndim == 3 else F.conv2d


# -- the reference: plain PyTorch, the same math ----------------------------------------------
def conv_act_reference(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                       act="none", act_args=()) -> torch.Tensor:
    """``act(conv(x) + bias + residual)`` with plain PyTorch ops, in the op's output layout."""
    check_activation(act, act_args)
    y = _conv_fn(x.dim())(x, weight, bias, list(stride), list(padding), list(dilation), groups)
    if residual is not None:
        y.add_(residual)
    y = apply_activation(y, act, act_args, inplace=True)
    return to_format(y, out_format(x))


def conv_transpose_act_reference(x, weight, bias, stride, padding, output_padding, groups,
                                 dilation, residual=None, *, act="none",
                                 act_args=()) -> torch.Tensor:
    """``act(conv_transpose2d(x) + bias + residual)`` with plain PyTorch ops, in the op's output
    layout."""
    check_activation(act, act_args)
    y = F.conv_transpose2d(x, weight, bias, list(stride), list(padding), list(output_padding),
                           groups, list(dilation))
    if residual is not None:
        y.add_(residual)
    y = apply_activation(y, act, act_args, inplace=True)
    return to_format(y, out_format(x))


def linear_act_reference(x, weight, bias, residual=None, *, act="none",
                         act_args=()) -> torch.Tensor:
    """``act(F.linear(x, weight, bias) + residual)`` with plain PyTorch ops (contiguous output)."""
    check_activation(act, act_args)
    y = F.linear(x, weight, bias)
    if residual is not None:
        y.add_(residual)
    y = apply_activation(y, act, act_args, inplace=True)
    return y if y.is_contiguous() else y.contiguous()


def add_layer_norm_reference(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``(x + residual, F.layer_norm(x + residual, ...))`` with plain PyTorch ops: also the
    decomposition (standard ops, out of place) and the CPU implementation."""
    s = x + residual
    return s, F.layer_norm(s, list(normalized_shape), weight, bias, eps)


# -- decompositions: standard ops only, out of place (ONNX, QAT) -------------------------------
def conv_act_decomposed(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                        act="none", act_args=()):
    """``act(conv(x) + bias + residual)`` with standard ops only (what ONNX receives)."""
    y = _conv_fn(x.dim())(x, weight, bias, list(stride), list(padding), list(dilation), groups)
    if residual is not None:
        y = y + residual
    return apply_activation(y, act, act_args)


def conv_transpose_act_decomposed(x, weight, bias, stride, padding, output_padding, groups,
                                  dilation, residual=None, *, act="none", act_args=()):
    """``act(conv_transpose2d(x) + bias + residual)`` with standard ops only."""
    y = F.conv_transpose2d(x, weight, bias, list(stride), list(padding), list(output_padding),
                           groups, list(dilation))
    if residual is not None:
        y = y + residual
    return apply_activation(y, act, act_args)


def linear_act_decomposed(x, weight, bias, residual=None, *, act="none", act_args=()):
    """``act(F.linear(x, weight, bias) + residual)`` with standard ops only."""
    y = F.linear(x, weight, bias)
    if residual is not None:
        y = y + residual
    return apply_activation(y, act, act_args)


# -- CPU: oneDNN where it applies ---------------------------------------------------------------
def _is_gemv_conv(x, weight, bias, padding, groups, residual) -> bool:
    """A bfloat16 1x1 convolution of a 1x1 image (the squeeze-excitation layers): a matrix
    product, run as the bf16 linear (the packed oneDNN matmul, or ``F.linear`` for a small
    weight). PyTorch's bf16 convolution reorders the weight on every call for it (61 us a call
    on a 96 -> 4 layer, one thread, against 3.4 us for ``F.linear``; float32 takes a direct
    path and stays as it is)."""
    return (x.dtype == torch.bfloat16 and x.dim() == 4 and x.shape[2:] == (1, 1)
            and weight.shape[2:] == (1, 1) and groups == 1 and residual is None
            and not any(padding) and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype))


def _conv2d_act_cpu(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                    act="none", act_args=()):
    if _is_gemv_conv(x, weight, bias, padding, groups, residual):
        check_activation(act, act_args)
        x2 = x.reshape(x.shape[0], x.shape[1])
        y = onednn.linear_act_onednn(x2, weight, bias, act, act_args) \
            if onednn.linear_applies(x2, weight, bias, None) else None
        if y is None:
            y = F.linear(x2, weight.reshape(weight.shape[:2]), bias)
            y = apply_activation(y, act, act_args, inplace=True)
        return y.reshape(x.shape[0], weight.shape[0], 1, 1)
    if onednn.applies(x, weight, bias, residual):
        check_activation(act, act_args)
        y = onednn.conv2d_act_onednn(x, weight, bias, stride, padding, dilation, groups,
                                     residual, act, act_args)
        if y is not None:
            return y
    return conv_act_reference(x, weight, bias, stride, padding, dilation, groups, residual,
                              act=act, act_args=act_args)


def _linear_act_cpu(x, weight, bias, residual=None, *, act="none", act_args=()):
    if onednn.linear_applies(x, weight, bias, residual):
        check_activation(act, act_args)
        y = onednn.linear_act_onednn(x, weight, bias, act, act_args, residual)
        if y is not None:
            return y
    return linear_act_reference(x, weight, bias, residual, act=act, act_args=act_args)


# -- fake implementations: shapes and strides --------------------------------------------------
def _conv_act_fake(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                   act="none", act_args=()):
    shape = conv_out_shape(x, weight.shape[2:], weight.shape[0], stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=out_format(x))


def _conv_transpose_act_fake(x, weight, bias, stride, padding, output_padding, groups,
                             dilation, residual=None, *, act="none", act_args=()):
    # weight: [C_in, C_out / groups, kh, kw]
    shape = [x.shape[0], weight.shape[1] * groups]
    for size, k, s, p, op, d in zip(x.shape[2:], weight.shape[2:], stride, padding,
                                    output_padding, dilation):
        shape.append((size - 1) * s - 2 * p + d * (k - 1) + op + 1)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=out_format(x))


def _linear_act_fake(x, weight, bias, residual=None, *, act="none", act_args=()):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _add_layer_norm_fake(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    s = x + residual  # the sum's shape, dtype and strides, as PyTorch's add gives them
    return s, torch.empty(s.shape, dtype=s.dtype, device=s.device)


# -- MAC counts ---------------------------------------------------------------------------------
def _conv_transpose_macs(view, gm: fx.GraphModule) -> int:
    """Every input element scatters into ``C_out / groups * kh * kw`` outputs (weight
    ``[C_in, C_out / groups, kh, kw]``): input elements times ``prod(weight.shape[1:])``."""
    x, w = tensor_meta(view.x), tensor_meta(view.weight)
    if x is None or w is None:
        return 0
    return math.prod(x.shape) * math.prod(w.shape[1:])


# -- the ops ------------------------------------------------------------------------------------
_TAIL = "Tensor? residual=None, *, str act='none', float[] act_args=[]) -> Tensor"

CONV1D_ACT = define_op(
    "conv1d_act(Tensor x, Tensor weight, Tensor? bias, int[1] stride, int[1] padding, "
    "int[1] dilation, int groups, " + _TAIL,
    family="fused", reference=conv_act_reference, fake=_conv_act_fake,
    decompose=conv_act_decomposed, macs=weight_macs("weight"))
CONV2D_ACT = define_op(
    "conv2d_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, " + _TAIL,
    family="fused", reference=conv_act_reference, fake=_conv_act_fake, cpu=_conv2d_act_cpu,
    decompose=conv_act_decomposed, macs=weight_macs("weight"))
CONV_TRANSPOSE2D_ACT = define_op(
    "conv_transpose2d_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
    "int[2] output_padding, int groups, int[2] dilation, " + _TAIL,
    family="fused", reference=conv_transpose_act_reference, fake=_conv_transpose_act_fake,
    decompose=conv_transpose_act_decomposed, macs=_conv_transpose_macs)
LINEAR_ACT = define_op(
    "linear_act(Tensor x, Tensor weight, Tensor? bias, " + _TAIL,
    family="fused", reference=linear_act_reference, fake=_linear_act_fake, cpu=_linear_act_cpu,
    decompose=linear_act_decomposed, macs=weight_macs("weight"))

ADD_LAYER_NORM = define_op(
    "add_layer_norm(Tensor x, Tensor residual, int[] normalized_shape, Tensor? weight=None, "
    "Tensor? bias=None, float eps=1e-05) -> (Tensor, Tensor)",
    family="fused", reference=add_layer_norm_reference, fake=_add_layer_norm_fake,
    decompose=add_layer_norm_reference)


class FusedConv(OpView):
    """``conv1d_act`` / ``conv2d_act``: x, weight, bias, stride, padding, dilation, groups,
    residual, act, act_args."""

    ops = (CONV1D_ACT, CONV2D_ACT)


class FusedLinear(OpView):
    """``linear_act``: x, weight, bias, residual, act, act_args."""

    ops = (LINEAR_ACT,)


class FusedLayer(OpView):
    """Any fused op, read through the parameters they all have (x, weight, bias, residual,
    act, act_args); ``view.schema`` says which op it is. ``conv_transpose2d_act`` is not a
    ``FusedConv`` (its weight is ``[C_in, C_out / groups, kh, kw]``, its parameters differ):
    its other arguments are read through its own view, ``CONV_TRANSPOSE2D_ACT.view``."""

    ops = (CONV1D_ACT, CONV2D_ACT, CONV_TRANSPOSE2D_ACT, LINEAR_ACT)


FUSED_OPS = tuple(op.overload for op in FusedLayer.ops)
