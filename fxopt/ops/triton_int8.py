"""Int8 ops that run fxopt's Triton kernels: what ``lower_to_triton`` writes for the int8 IR.

Each layer takes its weight codes already in the layout its kernel reads (prepared once by the
pass, with their column sums) and its grids as plain numbers (no device sync per call):

    q = torch.ops.fxopt.triton_quantize(x, 0.02, 128, 0, 255)                  # float -> codes
    q = torch.ops.fxopt.triton_conv2d_int8(q, w_q_nhwc, w_s, b, colsum, [1, 1], [1, 1], [1, 1], 1,
                                           0.02, 128, 0.05, 0, act="relu", out_int8=True)
    z = torch.ops.fxopt.triton_add_int8(q, 0.05, 0, r, 0.04, 3, 0.06, 0, act="relu")
    p = torch.ops.fxopt.triton_max_pool2d_int8(z, [3, 3], [2, 2], [1, 1], [1, 1], False)
    g = torch.ops.fxopt.triton_global_avg_pool2d_int8(p, 0.06, 0, 0, 255)     # [B, C, 1, 1]
    x = torch.ops.fxopt.triton_dequantize(q, 0.05, 0)                          # codes -> float32

Same math as the int8 IR of ``fxopt.ops_int8`` (the global average pooling sums the codes
exactly where the IR sums float32 values: one code apart at rounding ties). Convolution and
pooling outputs are always channels-last (the kernels write NHWC), an add keeps its first
input's layout, so int8 codes flow between quantized layers without layout copies. Where an op
runs (CUDA, the interpreter, the CPU reference) is ``fxopt.ops.triton_launch``; the float ops are
in ``fxopt.ops.triton``. The int8 ops refuse backward with ``UnsupportedOpError``
(quantization-aware training: ``fxopt.prepare_qat``).
"""
from __future__ import annotations

import torch

from fxopt.ops.int8 import (adaptive_avg_pool2d_int8_reference, add_int8_reference, codes_dtype,
                            conv2d_int8_reference, dequantize_reference, linear_int8_reference,
                            max_pool2d_int8_reference, quantize_reference)
from fxopt.ops.schema import weight_macs
from fxopt.ops.triton_launch import (add_format, nhwc_out, conv_shape, triton_op,
                                     dense_residual, depthwise_weight4, grid, kernels_for,
                                     run_on, nhwc)

__all__ = ["TRITON_QUANTIZE", "TRITON_DEQUANTIZE", "TRITON_CONV2D_INT8",
           "TRITON_DEPTHWISE_CONV2D_INT8", "TRITON_LINEAR_INT8", "TRITON_ADD_INT8",
           "TRITON_MAX_POOL2D_INT8", "TRITON_GLOBAL_AVG_POOL2D_INT8"]


# -- int8 -------------------------------------------------------------------------------------
def _triton_quantize(x, scale, zp, qmin, qmax):
    if kernels_for(x) is None:
        s, z = grid(scale, zp, x.device)
        return quantize_reference(x, s, z, qmin, qmax)
    return run_on(x, lambda tk: tk.quant.quantize(x if x.is_contiguous() else nhwc(x), scale, zp,
                                          codes_dtype(qmin), qmin=qmin, qmax=qmax))


def _triton_dequantize(q, scale, zp):
    if kernels_for(q) is None:
        s, z = grid(scale, zp, q.device)
        return dequantize_reference(q, s, z)
    return run_on(q, lambda tk: tk.quant.dequantize(q if q.is_contiguous() else nhwc(q), scale, zp))


def _is_codes(x) -> bool:
    return x.dtype in (torch.uint8, torch.int8)


def _int8_layer(x, launch, reference, x_scale, x_zp, y_scale, y_zp, x_qmin, x_qmax, y_qmin,
                out_int8, conv: bool):
    """Shared by the three int8 layers: quantize a float input on entry, run the kernel with
    codes out (the IR rounds onto the y grid even for a float output), dequantize if asked."""
    if kernels_for(x) is None:
        xs, xz = grid(x_scale, x_zp, x.device)
        ys, yz = grid(y_scale, y_zp, x.device)
        return reference(xs, xz, ys, yz)

    def go(tk):
        codes = x
        if not _is_codes(x):
            codes = tk.quant.quantize(nhwc(x) if conv else x.contiguous(), x_scale, x_zp,
                                codes_dtype(x_qmin), qmin=x_qmin, qmax=x_qmax)
        q = launch(tk, nhwc(codes) if conv else codes, codes_dtype(y_qmin))
        if out_int8:
            return q
        return tk.quant.dequantize(q, y_scale, y_zp,
                             out_dtype=torch.float32 if _is_codes(x) else x.dtype)
    return run_on(x, go)


def _triton_conv2d_int8(x, w_q, w_scale, bias, w_colsum, stride, padding, dilation, groups,
                        x_scale, x_zp, y_scale, y_zp, residual=None, *, act="none", act_args=(),
                        x_qmin=0, x_qmax=255, y_qmin=0, y_qmax=255, out_int8=False):
    shape = conv_shape(x, w_q.shape[2], w_q.shape[3], w_q.shape[0], stride, padding, dilation)
    res = dense_residual(residual, shape, torch.channels_last)

    def launch(tk, codes, ydt):
        return tk.conv.conv2d_int8(codes, w_q, w_scale, bias, list(stride), list(padding),
                              list(dilation), groups, res, a_scale=x_scale, a_zp=x_zp, act=act,
                              act_args=list(act_args), out_dtype=ydt, y_scale=y_scale, y_zp=y_zp,
                              y_qmin=y_qmin, y_qmax=y_qmax, w_colsum=w_colsum)

    def reference(xs, xz, ys, yz):
        return nhwc_out(conv2d_int8_reference(
            x, w_q, w_scale, bias, stride, padding, dilation, groups, xs, xz, ys, yz, residual,
            act=act, act_args=act_args, x_qmin=x_qmin, x_qmax=x_qmax, y_qmin=y_qmin,
            y_qmax=y_qmax, out_int8=out_int8))
    return _int8_layer(x, launch, reference, x_scale, x_zp, y_scale, y_zp, x_qmin, x_qmax,
                       y_qmin, out_int8, True)


def _triton_depthwise_conv2d_int8(x, w_q, w_scale, bias, kernel_size, stride, padding, dilation,
                                  x_scale, x_zp, y_scale, y_zp, residual=None, *, act="none",
                                  act_args=(), x_qmin=0, x_qmax=255, y_qmin=0, y_qmax=255,
                                  out_int8=False):
    shape = conv_shape(x, kernel_size[0], kernel_size[1], x.shape[1], stride, padding, dilation)
    res = dense_residual(residual, shape, torch.channels_last)

    def launch(tk, codes, ydt):
        return tk.depthwise.depthwise_conv2d_int8(
            codes, w_q, w_scale, bias, list(stride), list(padding), list(dilation), res,
            a_scale=x_scale, a_zp=x_zp, act=act, act_args=list(act_args), out_dtype=ydt,
            y_scale=y_scale, y_zp=y_zp, y_qmin=y_qmin, y_qmax=y_qmax,
            kernel_size=list(kernel_size))

    def reference(xs, xz, ys, yz):
        w4 = depthwise_weight4(w_q, kernel_size)
        return nhwc_out(conv2d_int8_reference(
            x, w4, w_scale, bias, stride, padding, dilation, x.shape[1], xs, xz, ys, yz, residual,
            act=act, act_args=act_args, x_qmin=x_qmin, x_qmax=x_qmax, y_qmin=y_qmin,
            y_qmax=y_qmax, out_int8=out_int8))
    return _int8_layer(x, launch, reference, x_scale, x_zp, y_scale, y_zp, x_qmin, x_qmax,
                       y_qmin, out_int8, True)


def _triton_linear_int8(x, w_q, w_scale, bias, w_colsum, x_scale, x_zp, y_scale, y_zp,
                        residual=None, *, act="none", act_args=(), x_qmin=0, x_qmax=255,
                        y_qmin=0, y_qmax=255, out_int8=False):
    res = dense_residual(residual, (*x.shape[:-1], w_q.shape[0]))

    def launch(tk, codes, ydt):
        return tk.gemm.linear_int8(codes, w_q, w_scale, bias, res, a_scale=x_scale, a_zp=x_zp,
                              act=act, act_args=list(act_args), out_dtype=ydt, y_scale=y_scale,
                              y_zp=y_zp, y_qmin=y_qmin, y_qmax=y_qmax, w_colsum=w_colsum)

    def reference(xs, xz, ys, yz):
        return linear_int8_reference(x, w_q, w_scale, bias, xs, xz, ys, yz, residual, act=act,
                                     act_args=act_args, x_qmin=x_qmin, x_qmax=x_qmax,
                                     y_qmin=y_qmin, y_qmax=y_qmax, out_int8=out_int8)
    return _int8_layer(x, launch, reference, x_scale, x_zp, y_scale, y_zp, x_qmin, x_qmax,
                       y_qmin, out_int8, False)


# -- int8 between the layers: residual add, pooling -----------------------------------------------
def _same_layout(a, b) -> bool:
    return all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


def _add_operands(a, b):
    """``a``, ``b`` as the kernel reads them: one shape (``b`` broadcast to ``a``'s), one dense
    layout (``a``'s when it is contiguous or channels-last; a copy of ``b`` only if it differs)."""
    if tuple(b.shape) != tuple(a.shape):
        b = b.expand(a.shape)
    fmt = add_format(a)
    a = a.contiguous(memory_format=fmt)
    if not (_same_layout(a, b) and b.is_contiguous(memory_format=fmt)):
        b = b.contiguous(memory_format=fmt)
    return a, b


def _triton_add_int8(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none",
                     act_args=(), y_qmin=0, y_qmax=255):
    if kernels_for(a) is None:
        (sa, za), (sb, zb), (sy, zy) = (grid(a_scale, a_zp, a.device),
                                        grid(b_scale, b_zp, a.device),
                                        grid(y_scale, y_zp, a.device))
        y = add_int8_reference(a, sa, za, b, sb, zb, sy, zy, act=act, act_args=act_args,
                               y_qmin=y_qmin, y_qmax=y_qmax)
        return y.contiguous(memory_format=add_format(a))
    a2, b2 = _add_operands(a, b)
    return run_on(a, lambda tk: tk.elementwise.add_int8(
        a2, a_scale, a_zp, b2, b_scale, b_zp, y_scale, y_zp, act=act, act_args=list(act_args),
        y_qmin=y_qmin, y_qmax=y_qmax, out_dtype=codes_dtype(y_qmin)))


def _triton_max_pool2d_int8(q, kernel_size, stride, padding, dilation, ceil_mode):
    if kernels_for(q) is None:
        return nhwc_out(max_pool2d_int8_reference(q, kernel_size, stride, padding, dilation,
                                             ceil_mode))
    return run_on(q, lambda tk: tk.pool.max_pool2d_int8(q, list(kernel_size), list(stride),
                                                 list(padding), list(dilation), bool(ceil_mode)))


def _triton_global_avg_pool2d_int8(q, scale, zp, qmin, qmax, *, y_scale=None, y_zp=None):
    own = y_scale is not None  # onto the output grid y_scale / y_zp, else the input's
    if kernels_for(q) is None:
        s, z = grid(scale, zp, q.device)
        ys, yz = grid(y_scale, y_zp, q.device) if own else (None, None)
        return nhwc_out(adaptive_avg_pool2d_int8_reference(q, [1, 1], s, z, qmin, qmax, y_scale=ys,
                                                      y_zp=yz))
    return run_on(q, lambda tk: tk.pool.global_avg_pool2d_int8(
        q, scale, zp, qmin, qmax, y_scale=y_scale if own else None, y_zp=y_zp if own else None))


# -- fake implementations: shapes, dtypes, strides ----------------------------------------------
def _quantize_fake(x, scale, zp, qmin, qmax):
    return torch.empty_like(x, dtype=codes_dtype(qmin))


def _dequantize_fake(q, scale, zp):
    return torch.empty_like(q, dtype=torch.float32)


def _int8_dtype(x, y_qmin, out_int8):
    return codes_dtype(y_qmin) if out_int8 else (torch.float32 if _is_codes(x) else x.dtype)


def _conv_int8_fake(x, w_q, w_scale, bias, w_colsum, stride, padding, dilation, groups, x_scale,
                    x_zp, y_scale, y_zp, residual=None, *, act="none", act_args=(), x_qmin=0,
                    x_qmax=255, y_qmin=0, y_qmax=255, out_int8=False):
    shape = conv_shape(x, w_q.shape[2], w_q.shape[3], w_q.shape[0], stride, padding, dilation)
    return torch.empty(shape, dtype=_int8_dtype(x, y_qmin, out_int8), device=x.device,
                       memory_format=torch.channels_last)


def _depthwise_int8_fake(x, w_q, w_scale, bias, kernel_size, stride, padding, dilation, x_scale,
                         x_zp, y_scale, y_zp, residual=None, *, act="none", act_args=(),
                         x_qmin=0, x_qmax=255, y_qmin=0, y_qmax=255, out_int8=False):
    shape = conv_shape(x, kernel_size[0], kernel_size[1], x.shape[1], stride, padding, dilation)
    return torch.empty(shape, dtype=_int8_dtype(x, y_qmin, out_int8), device=x.device,
                       memory_format=torch.channels_last)


def _linear_int8_fake(x, w_q, w_scale, bias, w_colsum, x_scale, x_zp, y_scale, y_zp,
                      residual=None, *, act="none", act_args=(), x_qmin=0, x_qmax=255, y_qmin=0,
                      y_qmax=255, out_int8=False):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=_int8_dtype(x, y_qmin, out_int8))


def _add_int8_fake(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none",
                   act_args=(), y_qmin=0, y_qmax=255):
    return torch.empty(a.shape, dtype=codes_dtype(y_qmin), device=a.device,
                       memory_format=add_format(a))


def _max_pool_int8_fake(q, kernel_size, stride, padding, dilation, ceil_mode):
    shape = torch.nn.functional.max_pool2d(torch.empty_like(q, dtype=torch.float32),
                                           list(kernel_size), list(stride), list(padding),
                                           list(dilation), ceil_mode).shape
    return torch.empty(shape, dtype=q.dtype, device=q.device, memory_format=torch.channels_last)


def _global_avg_pool_int8_fake(q, scale, zp, qmin, qmax, *, y_scale=None, y_zp=None):
    return torch.empty((q.shape[0], q.shape[1], 1, 1), dtype=q.dtype, device=q.device,
                       memory_format=torch.channels_last)


# -- the ops ------------------------------------------------------------------------------------
_INT8 = ("float x_scale, int x_zp, float y_scale, int y_zp, Tensor? residual=None, *, "
         "str act='none', float[] act_args=[], int x_qmin=0, int x_qmax=255, int y_qmin=0, "
         "int y_qmax=255, bool out_int8=False) -> Tensor")
_DEPTHWISE_INT8_MACS = weight_macs("w_q", depthwise_kernel="w_q")

TRITON_QUANTIZE = triton_op(
    "triton_quantize(Tensor x, float scale, int zp, int qmin, int qmax) -> Tensor",
    _triton_quantize, _quantize_fake, quantized=True)
TRITON_DEQUANTIZE = triton_op("triton_dequantize(Tensor q, float scale, int zp) -> Tensor",
                              _triton_dequantize, _dequantize_fake, quantized=True)
TRITON_CONV2D_INT8 = triton_op(
    "triton_conv2d_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor w_colsum, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups, " + _INT8,
    _triton_conv2d_int8, _conv_int8_fake, weight_macs("w_q"), quantized=True)
TRITON_DEPTHWISE_CONV2D_INT8 = triton_op(
    "triton_depthwise_conv2d_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, "
    "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, " + _INT8,
    _triton_depthwise_conv2d_int8, _depthwise_int8_fake, _DEPTHWISE_INT8_MACS, quantized=True)
TRITON_LINEAR_INT8 = triton_op(
    "triton_linear_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor w_colsum, "
    + _INT8, _triton_linear_int8, _linear_int8_fake, weight_macs("w_q"), quantized=True)
TRITON_ADD_INT8 = triton_op(
    "triton_add_int8(Tensor a, float a_scale, int a_zp, Tensor b, float b_scale, int b_zp, "
    "float y_scale, int y_zp, *, str act='none', float[] act_args=[], int y_qmin=0, "
    "int y_qmax=255) -> Tensor", _triton_add_int8, _add_int8_fake, quantized=True)
TRITON_MAX_POOL2D_INT8 = triton_op(
    "triton_max_pool2d_int8(Tensor q, int[2] kernel_size, int[2] stride, int[2] padding, "
    "int[2] dilation, bool ceil_mode) -> Tensor", _triton_max_pool2d_int8, _max_pool_int8_fake,
    quantized=True)
TRITON_GLOBAL_AVG_POOL2D_INT8 = triton_op(
    "triton_global_avg_pool2d_int8(Tensor q, float scale, int zp, int qmin, int qmax, *, "
    "float? y_scale=None, int? y_zp=None) -> Tensor",
    _triton_global_avg_pool2d_int8, _global_avg_pool_int8_fake, quantized=True)


