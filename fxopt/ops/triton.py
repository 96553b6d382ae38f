"""Ops that run fxopt's Triton kernels: what ``lower_to_triton`` writes into the graph.

Each op takes its weight already in the layout its kernel reads (prepared once by the pass and
held as a buffer) and its grids as plain numbers (no device sync per call):

    y = torch.ops.fxopt.triton_conv2d(x, w_nhwc, b, [1, 1], [1, 1], [1, 1], 1, res, act="relu")
    y = torch.ops.fxopt.triton_depthwise_conv2d(x, w_khkw_c, b, [3, 3], [2, 2], [1, 1], [1, 1])
    y = torch.ops.fxopt.triton_linear(x, w_nk, b, act="gelu")
    y = torch.ops.fxopt.triton_add(y, r, act="relu")          # float residual add, b broadcasts
    y = torch.ops.fxopt.triton_mul(y, gate)                    # float SE gate [N, C, 1, 1]
    q = torch.ops.fxopt.triton_quantize(x, 0.02, 128, 0, 255)                  # float -> codes
    q = torch.ops.fxopt.triton_conv2d_int8(q, w_q_nhwc, w_s, b, colsum, [1, 1], [1, 1], [1, 1], 1,
                                           0.02, 128, 0.05, 0, act="relu", out_int8=True)
    z = torch.ops.fxopt.triton_add_int8(q, 0.05, 0, r, 0.04, 3, 0.06, 0, act="relu")
    p = torch.ops.fxopt.triton_max_pool2d_int8(z, [3, 3], [2, 2], [1, 1], [1, 1], False)
    g = torch.ops.fxopt.triton_global_avg_pool2d_int8(p, 0.06, 0, 0, 255)     # [B, C, 1, 1]
    x = torch.ops.fxopt.triton_dequantize(q, 0.05, 0)                          # codes -> float32

Same math as ``conv2d_act`` / ``linear_act`` / the int8 IR of ``fxopt.ops_int8`` (the global
average pooling sums the codes exactly where the IR sums float32 values: one code apart at
rounding ties); ``triton_add`` / ``triton_mul`` are ``act(a + b)`` / ``act(a * b)`` (rounded once
to the dtype, as PyTorch adds and multiplies; ``b`` broadcasts to ``a``). Convolution and pooling
outputs are always channels-last (the kernels write NHWC), an add or a product (float or int8)
keeps its first input's layout, so a chain of convolutions carries NHWC
activations (and int8 codes between quantized layers) without layout copies; an input that is
not channels-last is converted on entry (the pass reports where that would happen).

Devices. On CUDA the ops call the launchers of ``fxopt.triton_kernels`` (compiled, autotuned).
On the CPU they run the plain PyTorch reference of the same math, so a lowered model saved on a
GPU machine still loads and runs anywhere, unless ``FXOPT_TRITON_ON_CPU=1``: then CPU tensors go
to the launchers too, which run the kernels in Triton's interpreter (``TRITON_INTERPRET=1`` is
set for the duration of the call when it is not set already). That is how the lowering is
tested without a GPU::

    FXOPT_TRITON_ON_CPU=1 TRITON_INTERPRET=1 python -m pytest tests/passes/lower/test_triton.py

Gradients: the float ops' backward is the vjp of the same math in standard ops (their
``differentiable`` forms below, declared through the schema); the int8 ops refuse backward with
``UnsupportedOpError`` (quantization-aware training: ``fxopt.prepare_qat``).
"""
from __future__ import annotations

import contextlib
import operator
import os

import torch

from fxopt.ir.activations import apply_activation
from fxopt.ops.fused import (conv_act_decomposed, conv_act_reference, linear_act_decomposed,
                             linear_act_reference)
from fxopt.ops.schema import define_op, weight_macs
from fxopt.ops.shapes import conv_out_shape
from fxopt.ops.int8 import (adaptive_avg_pool2d_int8_reference, add_int8_reference, codes_dtype,
                            conv2d_int8_reference, dequantize_reference, linear_int8_reference,
                            max_pool2d_int8_reference, quantize_reference)

__all__ = ["triton_on_cpu", "ON_CPU_ENV", "TRITON_CONV2D", "TRITON_DEPTHWISE_CONV2D",
           "TRITON_LINEAR", "TRITON_ADD", "TRITON_MUL", "TRITON_QUANTIZE", "TRITON_DEQUANTIZE",
           "TRITON_CONV2D_INT8", "TRITON_DEPTHWISE_CONV2D_INT8", "TRITON_LINEAR_INT8",
           "TRITON_ADD_INT8", "TRITON_MAX_POOL2D_INT8", "TRITON_GLOBAL_AVG_POOL2D_INT8"]

ON_CPU_ENV = "FXOPT_TRITON_ON_CPU"

def triton_on_cpu() -> bool:
    """Whether CPU tensors go to the Triton launchers (interpreted): ``FXOPT_TRITON_ON_CPU=1``."""
    return os.environ.get(ON_CPU_ENV, "0").lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def _interpreter():
    """``TRITON_INTERPRET=1`` for the duration of one CPU launch (the launchers read it then)."""
    old = os.environ.get("TRITON_INTERPRET")
    if old == "1":
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _kernels(x: torch.Tensor):
    """The launchers module when ``x`` should run on Triton (CUDA, or CPU with the switch),
    else None (the reference runs)."""
    if x.is_cuda or triton_on_cpu():
        from fxopt import triton_kernels
        return triton_kernels
    return None


def _run(x: torch.Tensor, fn):
    """``fn(tk)`` on the launchers module; under the interpreter for CPU tensors."""
    tk = _kernels(x)
    if x.is_cuda:
        return fn(tk)
    with _interpreter():
        return fn(tk)


def _nhwc(t):
    if t is None or t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _conv_shape(x, kh, kw, cout, stride, padding, dilation):
    return conv_out_shape(x, (kh, kw), cout, stride, padding, dilation)


def _residual(res, shape, fmt=None):
    """A residual the kernels can read: the output's full shape (broadcasts expanded), dense."""
    if res is None:
        return None
    if tuple(res.shape) != tuple(shape):
        res = res.expand(shape)
    if fmt is torch.channels_last:
        return _nhwc(res)
    return res if res.is_contiguous() else res.contiguous()


def _tf32(x, conv: bool) -> bool:
    # Match what the graph before lowering ran: cuDNN's TF32 setting for convolutions, cuBLAS's
    # for matmuls; the check's tolerance follows the same flags (tolerances.tolerance_for).
    flag = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    return bool(x.is_cuda and x.dtype == torch.float32 and flag)


def _cl(y):
    return y if y.is_contiguous(memory_format=torch.channels_last) else \
        y.contiguous(memory_format=torch.channels_last)


def _depthwise_weight4(w2, kernel_size):
    """Prepared ``[KH*KW, C]`` back to the usual ``[C, 1, KH, KW]`` (reference path)."""
    kh, kw = kernel_size
    return w2.t().reshape(w2.shape[1], 1, kh, kw)


def _grid(scale: float, zp: int, device):
    return (torch.tensor(scale, dtype=torch.float32, device=device),
            torch.tensor(zp, dtype=torch.int64, device=device))


# -- float ------------------------------------------------------------------------------------
def _triton_conv2d(x, weight, bias, stride, padding, dilation, groups, residual=None, *,
                   act="none", act_args=()):
    shape = _conv_shape(x, weight.shape[2], weight.shape[3], weight.shape[0], stride, padding,
                        dilation)
    if _kernels(x) is None:
        return _cl(conv_act_reference(x, weight, bias, stride, padding, dilation, groups,
                                      residual, act=act, act_args=act_args))
    res = _residual(residual, shape, torch.channels_last)
    return _run(x, lambda tk: tk.conv.conv2d(_nhwc(x), weight, bias, list(stride), list(padding),
                                        list(dilation), groups, res, act=act,
                                        act_args=list(act_args), allow_tf32=_tf32(x, True)))


def _triton_depthwise_conv2d(x, weight, bias, kernel_size, stride, padding, dilation,
                             residual=None, *, act="none", act_args=()):
    if _kernels(x) is None:
        w4 = _depthwise_weight4(weight, kernel_size)
        return _cl(conv_act_reference(x, w4, bias, stride, padding, dilation, x.shape[1],
                                      residual, act=act, act_args=act_args))
    shape = _conv_shape(x, kernel_size[0], kernel_size[1], x.shape[1], stride, padding, dilation)
    res = _residual(residual, shape, torch.channels_last)
    return _run(x, lambda tk: tk.depthwise.depthwise_conv2d(
        _nhwc(x), weight, bias, list(stride), list(padding), list(dilation), res, act=act,
        act_args=list(act_args), kernel_size=list(kernel_size)))


def _triton_linear(x, weight, bias, residual=None, *, act="none", act_args=()):
    if _kernels(x) is None:
        return linear_act_reference(x, weight, bias, residual, act=act, act_args=act_args)
    res = _residual(residual, (*x.shape[:-1], weight.shape[0]))
    return _run(x, lambda tk: tk.gemm.linear(x, weight, bias, res, act=act, act_args=list(act_args),
                                        allow_tf32=_tf32(x, False)))


def _float_binary(a, b, act, act_args, fn, launcher):
    """``act(fn(a, b))`` in ``a``'s layout: ``launcher(tk.elementwise)`` on Triton, else what the
    graph ran before (``fn`` in the dtype, then ``act``)."""
    fmt = _add_format(a)
    if _kernels(a) is None:
        return apply_activation(fn(a, b), act, list(act_args)).contiguous(memory_format=fmt)
    return _run(a, lambda tk: launcher(tk.elementwise)(a.contiguous(memory_format=fmt), b,
                                                       act=act, act_args=list(act_args)))


def _triton_add(a, b, *, act="none", act_args=()):
    return _float_binary(a, b, act, act_args, operator.add, lambda E: E.add)


def _triton_mul(a, b, *, act="none", act_args=()):
    return _float_binary(a, b, act, act_args, operator.mul, lambda E: E.mul)


# -- the float ops' differentiable forms (standard ops, out of place): their backward --------
def _depthwise_differentiable(x, weight, bias, kernel_size, stride, padding, dilation,
                              residual=None, *, act="none", act_args=()):
    return conv_act_decomposed(x, _depthwise_weight4(weight, kernel_size), bias, stride, padding,
                               dilation, x.shape[1], residual, act=act, act_args=act_args)


def _add_differentiable(a, b, *, act="none", act_args=()):
    return apply_activation(a + b, act, list(act_args))


def _mul_differentiable(a, b, *, act="none", act_args=()):
    return apply_activation(a * b, act, list(act_args))


# -- int8 -------------------------------------------------------------------------------------
def _triton_quantize(x, scale, zp, qmin, qmax):
    if _kernels(x) is None:
        s, z = _grid(scale, zp, x.device)
        return quantize_reference(x, s, z, qmin, qmax)
    return _run(x, lambda tk: tk.quant.quantize(x if x.is_contiguous() else _nhwc(x), scale, zp,
                                          codes_dtype(qmin), qmin=qmin, qmax=qmax))


def _triton_dequantize(q, scale, zp):
    if _kernels(q) is None:
        s, z = _grid(scale, zp, q.device)
        return dequantize_reference(q, s, z)
    return _run(q, lambda tk: tk.quant.dequantize(q if q.is_contiguous() else _nhwc(q), scale, zp))


def _is_codes(x) -> bool:
    return x.dtype in (torch.uint8, torch.int8)


def _int8_layer(x, launch, reference, x_scale, x_zp, y_scale, y_zp, x_qmin, x_qmax, y_qmin,
                out_int8, conv: bool):
    """Shared by the three int8 layers: quantize a float input on entry, run the kernel with
    codes out (the IR rounds onto the y grid even for a float output), dequantize if asked."""
    if _kernels(x) is None:
        xs, xz = _grid(x_scale, x_zp, x.device)
        ys, yz = _grid(y_scale, y_zp, x.device)
        return reference(xs, xz, ys, yz)

    def go(tk):
        codes = x
        if not _is_codes(x):
            codes = tk.quant.quantize(_nhwc(x) if conv else x.contiguous(), x_scale, x_zp,
                                codes_dtype(x_qmin), qmin=x_qmin, qmax=x_qmax)
        q = launch(tk, _nhwc(codes) if conv else codes, codes_dtype(y_qmin))
        if out_int8:
            return q
        return tk.quant.dequantize(q, y_scale, y_zp,
                             out_dtype=torch.float32 if _is_codes(x) else x.dtype)
    return _run(x, go)


def _triton_conv2d_int8(x, w_q, w_scale, bias, w_colsum, stride, padding, dilation, groups,
                        x_scale, x_zp, y_scale, y_zp, residual=None, *, act="none", act_args=(),
                        x_qmin=0, x_qmax=255, y_qmin=0, y_qmax=255, out_int8=False):
    shape = _conv_shape(x, w_q.shape[2], w_q.shape[3], w_q.shape[0], stride, padding, dilation)
    res = _residual(residual, shape, torch.channels_last)

    def launch(tk, codes, ydt):
        return tk.conv.conv2d_int8(codes, w_q, w_scale, bias, list(stride), list(padding),
                              list(dilation), groups, res, a_scale=x_scale, a_zp=x_zp, act=act,
                              act_args=list(act_args), out_dtype=ydt, y_scale=y_scale, y_zp=y_zp,
                              y_qmin=y_qmin, y_qmax=y_qmax, w_colsum=w_colsum)

    def reference(xs, xz, ys, yz):
        return _cl(conv2d_int8_reference(
            x, w_q, w_scale, bias, stride, padding, dilation, groups, xs, xz, ys, yz, residual,
            act=act, act_args=act_args, x_qmin=x_qmin, x_qmax=x_qmax, y_qmin=y_qmin,
            y_qmax=y_qmax, out_int8=out_int8))
    return _int8_layer(x, launch, reference, x_scale, x_zp, y_scale, y_zp, x_qmin, x_qmax,
                       y_qmin, out_int8, True)


def _triton_depthwise_conv2d_int8(x, w_q, w_scale, bias, kernel_size, stride, padding, dilation,
                                  x_scale, x_zp, y_scale, y_zp, residual=None, *, act="none",
                                  act_args=(), x_qmin=0, x_qmax=255, y_qmin=0, y_qmax=255,
                                  out_int8=False):
    shape = _conv_shape(x, kernel_size[0], kernel_size[1], x.shape[1], stride, padding, dilation)
    res = _residual(residual, shape, torch.channels_last)

    def launch(tk, codes, ydt):
        return tk.depthwise.depthwise_conv2d_int8(
            codes, w_q, w_scale, bias, list(stride), list(padding), list(dilation), res,
            a_scale=x_scale, a_zp=x_zp, act=act, act_args=list(act_args), out_dtype=ydt,
            y_scale=y_scale, y_zp=y_zp, y_qmin=y_qmin, y_qmax=y_qmax,
            kernel_size=list(kernel_size))

    def reference(xs, xz, ys, yz):
        w4 = _depthwise_weight4(w_q, kernel_size)
        return _cl(conv2d_int8_reference(
            x, w4, w_scale, bias, stride, padding, dilation, x.shape[1], xs, xz, ys, yz, residual,
            act=act, act_args=act_args, x_qmin=x_qmin, x_qmax=x_qmax, y_qmin=y_qmin,
            y_qmax=y_qmax, out_int8=out_int8))
    return _int8_layer(x, launch, reference, x_scale, x_zp, y_scale, y_zp, x_qmin, x_qmax,
                       y_qmin, out_int8, True)


def _triton_linear_int8(x, w_q, w_scale, bias, w_colsum, x_scale, x_zp, y_scale, y_zp,
                        residual=None, *, act="none", act_args=(), x_qmin=0, x_qmax=255,
                        y_qmin=0, y_qmax=255, out_int8=False):
    res = _residual(residual, (*x.shape[:-1], w_q.shape[0]))

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


def _add_format(a):
    """The output layout of an add: ``a``'s if channels-last, else contiguous."""
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _add_operands(a, b):
    """``a``, ``b`` as the kernel reads them: one shape (``b`` broadcast to ``a``'s), one dense
    layout (``a``'s when it is contiguous or channels-last; a copy of ``b`` only if it differs)."""
    if tuple(b.shape) != tuple(a.shape):
        b = b.expand(a.shape)
    fmt = _add_format(a)
    a = a.contiguous(memory_format=fmt)
    if not (_same_layout(a, b) and b.is_contiguous(memory_format=fmt)):
        b = b.contiguous(memory_format=fmt)
    return a, b


def _triton_add_int8(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none",
                     act_args=(), y_qmin=0, y_qmax=255):
    if _kernels(a) is None:
        (sa, za), (sb, zb), (sy, zy) = (_grid(a_scale, a_zp, a.device),
                                        _grid(b_scale, b_zp, a.device),
                                        _grid(y_scale, y_zp, a.device))
        y = add_int8_reference(a, sa, za, b, sb, zb, sy, zy, act=act, act_args=act_args,
                               y_qmin=y_qmin, y_qmax=y_qmax)
        return y.contiguous(memory_format=_add_format(a))
    a2, b2 = _add_operands(a, b)
    return _run(a, lambda tk: tk.elementwise.add_int8(
        a2, a_scale, a_zp, b2, b_scale, b_zp, y_scale, y_zp, act=act, act_args=list(act_args),
        y_qmin=y_qmin, y_qmax=y_qmax, out_dtype=codes_dtype(y_qmin)))


def _triton_max_pool2d_int8(q, kernel_size, stride, padding, dilation, ceil_mode):
    if _kernels(q) is None:
        return _cl(max_pool2d_int8_reference(q, kernel_size, stride, padding, dilation,
                                             ceil_mode))
    return _run(q, lambda tk: tk.elementwise.max_pool2d_int8(q, list(kernel_size), list(stride),
                                                 list(padding), list(dilation), bool(ceil_mode)))


def _triton_global_avg_pool2d_int8(q, scale, zp, qmin, qmax, *, y_scale=None, y_zp=None):
    own = y_scale is not None  # onto the output grid y_scale / y_zp, else the input's
    if _kernels(q) is None:
        s, z = _grid(scale, zp, q.device)
        ys, yz = _grid(y_scale, y_zp, q.device) if own else (None, None)
        return _cl(adaptive_avg_pool2d_int8_reference(q, [1, 1], s, z, qmin, qmax, y_scale=ys,
                                                      y_zp=yz))
    return _run(q, lambda tk: tk.elementwise.global_avg_pool2d_int8(
        q, scale, zp, qmin, qmax, y_scale=y_scale if own else None, y_zp=y_zp if own else None))


# -- fake implementations: shapes, dtypes, strides ----------------------------------------------
def _conv_fake(x, weight, bias, stride, padding, dilation, groups, residual=None, *, act="none",
               act_args=()):
    shape = _conv_shape(x, weight.shape[2], weight.shape[3], weight.shape[0], stride, padding,
                        dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _depthwise_fake(x, weight, bias, kernel_size, stride, padding, dilation, residual=None, *,
                    act="none", act_args=()):
    shape = _conv_shape(x, kernel_size[0], kernel_size[1], x.shape[1], stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _linear_fake(x, weight, bias, residual=None, *, act="none", act_args=()):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _float_binary_fake(a, b, *, act="none", act_args=()):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device, memory_format=_add_format(a))


def _quantize_fake(x, scale, zp, qmin, qmax):
    return torch.empty_like(x, dtype=codes_dtype(qmin))


def _dequantize_fake(q, scale, zp):
    return torch.empty_like(q, dtype=torch.float32)


def _int8_dtype(x, y_qmin, out_int8):
    return codes_dtype(y_qmin) if out_int8 else (torch.float32 if _is_codes(x) else x.dtype)


def _conv_int8_fake(x, w_q, w_scale, bias, w_colsum, stride, padding, dilation, groups, x_scale,
                    x_zp, y_scale, y_zp, residual=None, *, act="none", act_args=(), x_qmin=0,
                    x_qmax=255, y_qmin=0, y_qmax=255, out_int8=False):
    shape = _conv_shape(x, w_q.shape[2], w_q.shape[3], w_q.shape[0], stride, padding, dilation)
    return torch.empty(shape, dtype=_int8_dtype(x, y_qmin, out_int8), device=x.device,
                       memory_format=torch.channels_last)


def _depthwise_int8_fake(x, w_q, w_scale, bias, kernel_size, stride, padding, dilation, x_scale,
                         x_zp, y_scale, y_zp, residual=None, *, act="none", act_args=(),
                         x_qmin=0, x_qmax=255, y_qmin=0, y_qmax=255, out_int8=False):
    shape = _conv_shape(x, kernel_size[0], kernel_size[1], x.shape[1], stride, padding, dilation)
    return torch.empty(shape, dtype=_int8_dtype(x, y_qmin, out_int8), device=x.device,
                       memory_format=torch.channels_last)


def _linear_int8_fake(x, w_q, w_scale, bias, w_colsum, x_scale, x_zp, y_scale, y_zp,
                      residual=None, *, act="none", act_args=(), x_qmin=0, x_qmax=255, y_qmin=0,
                      y_qmax=255, out_int8=False):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=_int8_dtype(x, y_qmin, out_int8))


def _add_int8_fake(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none",
                   act_args=(), y_qmin=0, y_qmax=255):
    return torch.empty(a.shape, dtype=codes_dtype(y_qmin), device=a.device,
                       memory_format=_add_format(a))


def _max_pool_int8_fake(q, kernel_size, stride, padding, dilation, ceil_mode):
    shape = torch.nn.functional.max_pool2d(torch.empty_like(q, dtype=torch.float32),
                                           list(kernel_size), list(stride), list(padding),
                                           list(dilation), ceil_mode).shape
    return torch.empty(shape, dtype=q.dtype, device=q.device, memory_format=torch.channels_last)


def _global_avg_pool_int8_fake(q, scale, zp, qmin, qmax, *, y_scale=None, y_zp=None):
    return torch.empty((q.shape[0], q.shape[1], 1, 1), dtype=q.dtype, device=q.device,
                       memory_format=torch.channels_last)


# -- the ops ------------------------------------------------------------------------------------
_ACT = "*, str act='none', float[] act_args=[]) -> Tensor"
_INT8 = ("float x_scale, int x_zp, float y_scale, int y_zp, Tensor? residual=None, *, "
         "str act='none', float[] act_args=[], int x_qmin=0, int x_qmax=255, int y_qmin=0, "
         "int y_qmax=255, bool out_int8=False) -> Tensor")
_DEPTHWISE_MACS = weight_macs("weight", depthwise_kernel="weight")  # weight [KH*KW, C]
_DEPTHWISE_INT8_MACS = weight_macs("w_q", depthwise_kernel="w_q")


def _op(signature: str, impl, fake, macs=None, *, quantized: bool = False,
        differentiable=None):
    return define_op(signature, family="triton", reference=impl, fake=fake, macs=macs,
                     quantized=quantized, differentiable=differentiable)


TRITON_CONV2D = _op(
    "triton_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, Tensor? residual=None, " + _ACT,
    _triton_conv2d, _conv_fake, weight_macs("weight"), differentiable=conv_act_decomposed)
TRITON_DEPTHWISE_CONV2D = _op(
    "triton_depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] kernel_size, "
    "int[2] stride, int[2] padding, int[2] dilation, Tensor? residual=None, " + _ACT,
    _triton_depthwise_conv2d, _depthwise_fake, _DEPTHWISE_MACS,
    differentiable=_depthwise_differentiable)
TRITON_LINEAR = _op(
    "triton_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual=None, " + _ACT,
    _triton_linear, _linear_fake, weight_macs("weight"), differentiable=linear_act_decomposed)
TRITON_ADD = _op("triton_add(Tensor a, Tensor b, " + _ACT, _triton_add, _float_binary_fake,
                 differentiable=_add_differentiable)
TRITON_MUL = _op("triton_mul(Tensor a, Tensor b, " + _ACT, _triton_mul, _float_binary_fake,
                 differentiable=_mul_differentiable)
TRITON_QUANTIZE = _op(
    "triton_quantize(Tensor x, float scale, int zp, int qmin, int qmax) -> Tensor",
    _triton_quantize, _quantize_fake, quantized=True)
TRITON_DEQUANTIZE = _op("triton_dequantize(Tensor q, float scale, int zp) -> Tensor",
                        _triton_dequantize, _dequantize_fake, quantized=True)
TRITON_CONV2D_INT8 = _op(
    "triton_conv2d_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor w_colsum, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups, " + _INT8,
    _triton_conv2d_int8, _conv_int8_fake, weight_macs("w_q"), quantized=True)
TRITON_DEPTHWISE_CONV2D_INT8 = _op(
    "triton_depthwise_conv2d_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, "
    "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, " + _INT8,
    _triton_depthwise_conv2d_int8, _depthwise_int8_fake, _DEPTHWISE_INT8_MACS, quantized=True)
TRITON_LINEAR_INT8 = _op(
    "triton_linear_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor w_colsum, "
    + _INT8, _triton_linear_int8, _linear_int8_fake, weight_macs("w_q"), quantized=True)
TRITON_ADD_INT8 = _op(
    "triton_add_int8(Tensor a, float a_scale, int a_zp, Tensor b, float b_scale, int b_zp, "
    "float y_scale, int y_zp, *, str act='none', float[] act_args=[], int y_qmin=0, "
    "int y_qmax=255) -> Tensor", _triton_add_int8, _add_int8_fake, quantized=True)
TRITON_MAX_POOL2D_INT8 = _op(
    "triton_max_pool2d_int8(Tensor q, int[2] kernel_size, int[2] stride, int[2] padding, "
    "int[2] dilation, bool ceil_mode) -> Tensor", _triton_max_pool2d_int8, _max_pool_int8_fake,
    quantized=True)
TRITON_GLOBAL_AVG_POOL2D_INT8 = _op(
    "triton_global_avg_pool2d_int8(Tensor q, float scale, int zp, int qmin, int qmax, *, "
    "float? y_scale=None, int? y_zp=None) -> Tensor",
    _triton_global_avg_pool2d_int8, _global_avg_pool_int8_fake, quantized=True)

