"""Int8 ops in the ``fxopt`` namespace: the device-neutral int8 IR that ``quantize_int8`` writes.

Between int8 ops the graph carries *codes*: plain ``uint8`` (affine grids) or ``int8``
(symmetric grids) tensors, with each grid's scale and zero point held as buffers and passed
to the ops that read or write it. A quantized region starts at ``fxopt.quantize`` and ends
at ``fxopt.dequantize``; in between no float tensor is materialized.

    q  = torch.ops.fxopt.quantize(x, s_x, zp_x, 0, 255)                   # float -> uint8 codes
    y  = torch.ops.fxopt.conv2d_int8(q, w_q, w_s, b, [1, 1], [1, 1], [1, 1], 1,
                                     s_x, zp_x, s_y, zp_y, act="relu", out_int8=True)
    z  = torch.ops.fxopt.add_int8(y, s_y, zp_y, r, s_r, zp_r, s_z, zp_z, act="relu")
    g  = torch.ops.fxopt.mul_int8(z, s_z, zp_z, gate, s_g, zp_g, s_m, zp_m)  # gate [N, C, 1, 1]
    t  = torch.ops.fxopt.avg_pool2d_int8(g, [2, 2], [2, 2], [0, 0], False, True, s_m, zp_m,
                                         0, 255)                          # DenseNet transition
    u  = torch.ops.fxopt.upsample_nearest2d_int8(t, None, [2.0, 2.0], s_m, zp_m, 0, 255)  # FPN
    p  = torch.ops.fxopt.adaptive_avg_pool2d_int8(z, [1, 1], s_z, zp_z, 0, 255,
                                                  y_scale=s_p, y_zp=zp_p)  # its own grid
    n  = torch.ops.fxopt.batch_norm2d_int8(c, w, b, mean, var, 1e-5, s_c, zp_c, s_n, zp_n,
                                           act="relu")    # DenseNet's BN-ReLU after a concat
    out = torch.ops.fxopt.dequantize(p, s_p, zp_p)                        # codes -> float32

``conv2d_int8`` / ``linear_int8`` take float input (quantized inside on ``x``'s grid) or codes,
and return codes on the ``y`` grid with ``out_int8=True``, else the dequantized float. Weights
are int8 per output channel, symmetric (zero point 0); accumulation is exact; the epilogue
(bias, float residual, activation, rounding onto the ``y`` grid) is float32, PyTorch's
arithmetic (round half to even of ``v * (1/scale)``). Max pooling (``max_pool2d_int8``) and
flatten/reshape keep the grid (flatten runs on the codes unchanged), as does nearest-neighbour
upsampling (``upsample_nearest2d_int8``: a gather of codes); windowed average pooling
(``avg_pool2d_int8``) rounds back onto it; adaptive (global) average pooling
(``adaptive_avg_pool2d_int8``) rounds onto the output grid it is given (``y_scale`` /
``y_zp``; ``quantize_int8`` gives it its own observed grid), else onto its input's. An eval
BatchNorm that no convolution absorbs (DenseNet's after each concat: a ReLU and a convolution
follow, so its affine cannot move into the convolution's weights) is ``batch_norm2d_int8``: a
per-channel requantization of the codes onto its own grid, the ReLU its clamp. Every op
here has one implementation, the exact reference, on CPU and CUDA; speed comes from the
lowering passes (``lower_int8_cpu`` to PyTorch's quantized x86 kernels, ``lower_to_triton`` on
CUDA). That keeps the IR the single source of truth that the checks, the ONNX QDQ export
and the lowerings all read. Each op is declared once in the op schema; read a call with its view
(``Conv2dInt8.of(node).y_scale``) and write one by name (``CONV2D_INT8.emit(g, x=..., ...)``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxopt.ir.activations import apply_activation
from fxopt.ops.schema import OpView, define_op, weight_macs
from fxopt.ops.shapes import conv_out_shape, out_format, to_format

__all__ = ["conv2d_int8_reference", "linear_int8_reference", "quantize_reference",
           "dequantize_reference", "add_int8_reference", "mul_int8_reference",
           "adaptive_avg_pool2d_int8_reference", "avg_pool2d_int8_reference",
           "cat_int8_reference", "max_pool2d_int8_reference", "upsample_nearest2d_int8_reference",
           "batch_norm2d_int8_reference", "activation_int8_reference", "codes_dtype", "is_codes",
           "INT8_IR_OPS", "CONV2D_INT8", "LINEAR_INT8", "QUANTIZE", "DEQUANTIZE", "ADD_INT8",
           "MUL_INT8", "CAT_INT8", "AVGPOOL_INT8", "AVG_POOL2D_INT8", "MAXPOOL_INT8",
           "UPSAMPLE_NEAREST2D_INT8", "UpsampleNearest2dInt8", "BATCH_NORM2D_INT8",
           "BatchNorm2dInt8", "ACTIVATION_INT8", "ActivationInt8",
           "Conv2dInt8", "LinearInt8", "Int8Layer", "Quantize", "Dequantize", "AddInt8", "MulInt8",
           "BinaryInt8", "CatInt8", "AvgPool2dInt8", "AvgPool2dWindowInt8", "MaxPool2dInt8"]


def codes_dtype(qmin: int) -> torch.dtype:
    """The storage dtype of a grid's codes: uint8 for affine grids, int8 for symmetric ones."""
    return torch.uint8 if qmin >= 0 else torch.int8


def _quant(x, scale, zp, qmin, qmax) -> torch.Tensor:
    """Codes (as int64) with PyTorch's arithmetic: round(x * (1/s)) + zp, clamped."""
    q = torch.round(x.float() * torch.reciprocal(scale.float())) + zp
    return q.clamp_(qmin, qmax).to(torch.int64)


def _values(q, scale, zp) -> torch.Tensor:
    """Codes -> float32 values ``(q - zp) * s``."""
    return (q.to(torch.int64) - zp).float() * scale.float()


def is_codes(x: torch.Tensor) -> bool:
    """Whether ``x`` holds int8 codes (uint8 or int8), not float values."""
    return x.dtype in (torch.uint8, torch.int8)


def quantize_reference(x, scale, zp, qmin, qmax) -> torch.Tensor:
    return _quant(x, scale, zp, qmin, qmax).to(codes_dtype(qmin))


def dequantize_reference(q, scale, zp) -> torch.Tensor:
    return _values(q, scale, zp)


def _finish(q, y_zp, y_scale, y_qmin, out_int8: bool, dtype) -> torch.Tensor:
    if out_int8:
        return q.to(codes_dtype(y_qmin))
    return ((q - y_zp).float() * y_scale.float()).to(dtype)


def _epilogue(acc, x_scale, w_scale, bias, residual, act, act_args, y_scale, y_zp, y_qmin, y_qmax,
              channel_dim: int):
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    y = (acc.float() * (x_scale.float() * w_scale.float()).reshape(shape))
    if bias is not None:
        y = y + bias.float().reshape(shape)
    if residual is not None:
        y = y + residual
    y = apply_activation(y, act, act_args)
    return _quant(y, y_scale, y_zp, y_qmin, y_qmax)


def _split_base(k: int, cmax: int) -> int | None:
    """A base ``b`` such that splitting centered codes ``c = b*h + l`` (``0 <= l < b``) keeps
    every partial sum of ``k`` products of either part with an int8 weight below 2**24, so a
    float32 convolution of each part is exact. 1: no split needed; None: use float64."""
    if k * cmax * 127 < 2 ** 24:
        return 1
    for b in (4, 8, 16, 32):
        if k * max(b - 1, cmax // b + 1) * 127 < 2 ** 24:
            return b
    return None


def _exact_acc(xc: torch.Tensor, w: torch.Tensor, k: int, cmax: int, fn) -> torch.Tensor:
    """``fn(xc, w)`` (a conv or matmul of centered integer codes with int8 weights), exact:
    float32 (split into two float32 products when the sums would pass 2**24), else float64."""
    base = _split_base(k, cmax)
    if base is None:
        return fn(xc.double(), w.double())
    wf = w.float()
    if base == 1:
        return fn(xc.float(), wf)
    h = torch.div(xc, base, rounding_mode="floor")
    lo = xc - h * base
    return fn(h.float(), wf).double() * base + fn(lo.float(), wf).double()


def _centered(x, x_scale, x_zp, x_qmin, x_qmax) -> tuple[torch.Tensor, int]:
    q = x.to(torch.int64) if is_codes(x) else _quant(x, x_scale, x_zp, x_qmin, x_qmax)
    zp = int(x_zp)
    return q - zp, max(zp - x_qmin, x_qmax - zp)


def conv2d_int8_reference(x, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                          y_scale, y_zp, residual=None, *, act="none", act_args=(), x_qmin=0,
                          x_qmax=255, y_qmin=0, y_qmax=255, out_int8=False) -> torch.Tensor:
    """Exact integer convolution: centered integer codes times int8 weights, summed in float32
    where every partial sum stays below 2**24 (split in two halves where it would not), else
    float64; then the float32 epilogue."""
    k = w_q.shape[1] * w_q.shape[2] * w_q.shape[3]
    xc, cmax = _centered(x, x_scale, x_zp, x_qmin, x_qmax)
    fmt = out_format(x)
    acc = _exact_acc(xc.contiguous(memory_format=fmt), w_q, k, cmax,
                     lambda a, w: F.conv2d(a, w, None, list(stride), list(padding),
                                           list(dilation), groups))
    q = _epilogue(acc, x_scale, w_scale, bias, residual, act, act_args, y_scale, y_zp, y_qmin,
                  y_qmax, 1)
    y = _finish(q, y_zp, y_scale, y_qmin, out_int8, torch.float32 if is_codes(x) else x.dtype)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


def linear_int8_reference(x, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, residual=None, *,
                          act="none", act_args=(), x_qmin=0, x_qmax=255, y_qmin=0,
                          y_qmax=255, out_int8=False) -> torch.Tensor:
    xc, cmax = _centered(x, x_scale, x_zp, x_qmin, x_qmax)
    acc = _exact_acc(xc, w_q, w_q.shape[1], cmax, F.linear)
    q = _epilogue(acc, x_scale, w_scale, bias, residual, act, act_args, y_scale, y_zp, y_qmin,
                  y_qmax, -1)
    return _finish(q, y_zp, y_scale, y_qmin, out_int8,
                   torch.float32 if is_codes(x) else x.dtype).contiguous()


def add_int8_reference(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none",
                       act_args=(), y_qmin=0, y_qmax=255) -> torch.Tensor:
    """``act(a + b)`` of two code tensors onto the ``y`` grid (PyTorch's quantized add: the
    float sum of the dequantized inputs, requantized)."""
    y = apply_activation(_values(a, a_scale, a_zp) + _values(b, b_scale, b_zp), act, act_args)
    return quantize_reference(y, y_scale, y_zp, y_qmin, y_qmax)


def mul_int8_reference(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none",
                       act_args=(), y_qmin=0, y_qmax=255) -> torch.Tensor:
    """``act(a * b)`` of two code tensors (broadcast: a squeeze-excitation gate ``[N, C, 1, 1]``)
    onto the ``y`` grid (PyTorch's quantized mul: the float32 product of the dequantized inputs,
    requantized)."""
    y = apply_activation(_values(a, a_scale, a_zp) * _values(b, b_scale, b_zp), act, act_args)
    return quantize_reference(y, y_scale, y_zp, y_qmin, y_qmax)


def adaptive_avg_pool2d_int8_reference(q, output_size, scale, zp, qmin, qmax, y_scale=None,
                                       y_zp=None) -> torch.Tensor:
    """Average pooling of codes (the float32 average of their values), rounded once onto the
    ``y`` grid (``y_scale`` / ``y_zp``; the same ``qmin`` / ``qmax``), or back onto the input's
    grid when none is given. A global pool needs a grid of its own: the average of a wide,
    sparse activation spans a small part of its input's range, and on the input's grid most
    pooled codes equal the zero point."""
    y = F.adaptive_avg_pool2d(_values(q, scale, zp), list(output_size))
    if y_scale is None:
        return quantize_reference(y, scale, zp, qmin, qmax)
    return quantize_reference(y, y_scale, zp if y_zp is None else y_zp, qmin, qmax)


def activation_int8_reference(q, scale, zp, qmin, qmax, y_scale, y_zp, *, act,
                              act_args=()) -> torch.Tensor:
    """``act`` of codes (the float32 activation of their values), rounded once onto the ``y``
    grid (the same ``qmin`` / ``qmax``): an activation an engine runs between a
    DequantizeLinear and a QuantizeLinear (``passes/quant/split_act.py``)."""
    y = apply_activation(_values(q, scale, zp), act, act_args)
    return quantize_reference(y, y_scale, y_zp, qmin, qmax)


def _window_sizes(n_in: int, n_out: int, k: int, s: int, p: int, include_pad: bool,
                  device) -> torch.Tensor:
    """The divisor of each pooling window along one axis: its span clipped to the padded input
    (``include_pad``), or to the input itself (PyTorch's rule, ceil_mode's last window too)."""
    start = torch.arange(n_out, device=device) * s - p
    end = torch.clamp(start + k, max=n_in + p)
    if include_pad:
        return end - start
    return end.clamp(max=n_in) - start.clamp(min=0)


def avg_pool2d_int8_reference(q, kernel_size, stride, padding, ceil_mode, count_include_pad,
                              scale, zp, qmin, qmax) -> torch.Tensor:
    """Average pooling of codes, on their own grid, as PyTorch's quantized kernel computes it
    (channels-last, bit for bit): the exact sum of each window's centered codes (padding adds
    zeros), times the float32 ``1 / divisor``, rounded half to even once. A float average of
    the values would round each sum first and put a tie (``sum % 4 == 2`` in a 2x2 window) on
    either side of it. ``scale`` only names the grid: in and out are the same."""
    k, s, p = list(kernel_size), list(stride), list(padding)
    z = zp.to(torch.int64)
    exact32 = k[0] * k[1] * (qmax - qmin) < 2 ** 24  # float32 sums of integers are exact there
    c = (q.to(torch.int64) - z).to(torch.float32 if exact32 else torch.float64)
    acc = F.avg_pool2d(c, k, s, p, ceil_mode, count_include_pad, divisor_override=1)
    sizes = [_window_sizes(c.shape[d], acc.shape[d], k[i], s[i], p[i], count_include_pad,
                           q.device) for i, d in enumerate((-2, -1))]
    divisor = (sizes[0][:, None] * sizes[1][None, :]).float()
    y = torch.round(acc.float() * (1.0 / divisor)) + z
    return y.clamp_(qmin, qmax).to(codes_dtype(qmin))


def max_pool2d_int8_reference(q, kernel_size, stride, padding, dilation, ceil_mode):
    """Max pooling of codes (exact: the max of codes is the code of the max). Runs in float32
    because PyTorch's uint8 max pooling fails on large channels-last inputs."""
    y = F.max_pool2d(q.float(), list(kernel_size), list(stride), list(padding), list(dilation),
                     ceil_mode)
    return y.to(q.dtype)


def _nearest_sources(n_in: int, n_out: int, scale: float | None, device) -> torch.Tensor:
    """The input index each output index copies along one axis, as PyTorch's float CPU kernel
    (ATen's ``nearest_idx``): itself when the size is kept, ``i >> 1`` when it doubles, else
    ``floor(i * s)`` in float32, ``s`` the float32 of ``1 / scale`` where a scale factor is
    given and positive, else of ``n_in / n_out``, clamped to the last input index. PyTorch's
    quantized kernel has no such shortcuts: a scale factor that keeps or doubles the size
    without being exactly 1 or 2 (one in (1, 1.5) or (2, 2.5), on a small enough input) it
    indexes one pixel differently; ``lower_int8_cpu`` leaves those to the reference."""
    i = torch.arange(n_out, device=device)
    if n_out == n_in:
        return i
    if n_out == 2 * n_in:
        return i >> 1
    f32 = dict(dtype=torch.float32, device=device)
    s = torch.tensor(1.0 / scale, **f32) if scale is not None and scale > 0 else \
        torch.tensor(float(n_in), **f32) / torch.tensor(float(n_out), **f32)
    return torch.floor(i.to(torch.float32) * s).to(torch.int64).clamp_(max=n_in - 1)


def _upsample_size(q, output_size, scale_factors) -> list[int]:
    """The output's spatial size: ``output_size``, else ``floor(size * scale)`` per axis (as
    ``F.interpolate`` computes it)."""
    if output_size is not None:
        return [int(v) for v in output_size]
    return [math.floor(float(n) * float(f)) for n, f in zip(q.shape[-2:], scale_factors)]


def upsample_nearest2d_int8_reference(q, output_size, scale_factors, scale, zp, qmin,
                                      qmax) -> torch.Tensor:
    """Nearest-neighbour upsampling (or downsampling) of codes, ``aten::upsample_nearest2d``'s
    arguments: an output size or a scale factor per axis (the quantizer writes one; a size
    wins), indexed as PyTorch's float kernel indexes (:func:`_nearest_sources`). Each output
    pixel is a copy of one input code: the grid is kept and nothing rounds. ``scale`` ...
    ``qmax`` only name the grid (in and out are the same; the ONNX row and the CPU lowering's
    reference row read it). Same layout as the input (channels-last in, channels-last out, as
    PyTorch's kernels)."""
    oh, ow = _upsample_size(q, output_size, scale_factors)
    sh, sw = (None, None) if output_size is not None else (float(f) for f in scale_factors)
    rows = _nearest_sources(q.shape[-2], oh, sh, q.device)
    cols = _nearest_sources(q.shape[-1], ow, sw, q.device)
    y = q.index_select(-2, rows).index_select(-1, cols)
    return to_format(y, out_format(q))


def batch_norm2d_int8_reference(q, weight, bias, mean, var, eps, x_scale, x_zp, y_scale, y_zp, *,
                                act="none", act_args=(), y_qmin=0, y_qmax=255) -> torch.Tensor:
    """Eval BatchNorm (a per-channel affine), then ``act``, of codes onto the ``y`` grid: the
    float op on the values (``F.batch_norm``, the simulation's arithmetic), requantized once.
    PyTorch's ``quantized::batch_norm2d(_relu)`` folds the two grids into its per-channel
    factors and lands on the same codes (within one, at a tie; ``fxopt.ops.cpu``)."""
    y = F.batch_norm(_values(q, x_scale, x_zp), mean, var, weight, bias, False, 0.0, eps)
    y = apply_activation(y, act, act_args)
    return quantize_reference(y, y_scale, y_zp, y_qmin, y_qmax)


def cat_int8_reference(qs, scales, zps, dim, y_scale, y_zp, y_qmin, y_qmax) -> torch.Tensor:
    y = torch.cat([_values(q, s, z) for q, s, z in zip(qs, scales, zps)], dim)
    return quantize_reference(y, y_scale, y_zp, y_qmin, y_qmax)


# -- fake implementations ----------------------------------------------------------------------
def _conv2d_int8_fake(x, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                      y_scale, y_zp, residual=None, *, act="none", act_args=(), x_qmin=0,
                      x_qmax=255, y_qmin=0, y_qmax=255, out_int8=False):
    shape = conv_out_shape(x, w_q.shape[2:], w_q.shape[0], stride, padding, dilation)
    dtype = codes_dtype(y_qmin) if out_int8 else (torch.float32 if is_codes(x) else x.dtype)
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=out_format(x))


def _linear_int8_fake(x, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, residual=None, *,
                      act="none", act_args=(), x_qmin=0, x_qmax=255, y_qmin=0, y_qmax=255,
                      out_int8=False):
    dtype = codes_dtype(y_qmin) if out_int8 else (torch.float32 if is_codes(x) else x.dtype)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=dtype)


def _quantize_fake(x, scale, zp, qmin, qmax):
    return torch.empty_like(x, dtype=codes_dtype(qmin))


def _dequantize_fake(q, scale, zp):
    return torch.empty_like(q, dtype=torch.float32)


def _add_int8_fake(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none",
                   act_args=(), y_qmin=0, y_qmax=255):
    return torch.empty_like(a, dtype=codes_dtype(y_qmin))


def _mul_int8_fake(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none",
                   act_args=(), y_qmin=0, y_qmax=255):
    # the broadcast shape and the layout the reference's elementwise product picks
    y = torch.empty_like(a, dtype=torch.float32) * torch.empty_like(b, dtype=torch.float32)
    return torch.empty_like(y, dtype=codes_dtype(y_qmin))


def _avg_pool_fake(q, output_size, scale, zp, qmin, qmax, y_scale=None, y_zp=None):
    return q.new_empty((*q.shape[:-2], *output_size), dtype=codes_dtype(qmin))


def _activation_int8_fake(q, scale, zp, qmin, qmax, y_scale, y_zp, *, act, act_args=()):
    return torch.empty_like(q, dtype=codes_dtype(qmin))


def _avg_pool2d_fake(q, kernel_size, stride, padding, ceil_mode, count_include_pad, scale, zp,
                     qmin, qmax):
    return F.avg_pool2d(torch.empty_like(q, dtype=torch.float32), list(kernel_size),
                        list(stride), list(padding), ceil_mode,
                        count_include_pad).to(codes_dtype(qmin))


def _max_pool_fake(q, kernel_size, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(torch.empty_like(q, dtype=torch.float32), list(kernel_size), list(stride),
                        list(padding), list(dilation), ceil_mode).to(q.dtype)


def _upsample_nearest2d_fake(q, output_size, scale_factors, scale, zp, qmin, qmax):
    shape = (*q.shape[:-2], *_upsample_size(q, output_size, scale_factors))
    return torch.empty(shape, dtype=q.dtype, device=q.device, memory_format=out_format(q))


def _batch_norm2d_int8_fake(q, weight, bias, mean, var, eps, x_scale, x_zp, y_scale, y_zp, *,
                            act="none", act_args=(), y_qmin=0, y_qmax=255):
    return torch.empty_like(q, dtype=codes_dtype(y_qmin))


def _cat_int8_fake(qs, scales, zps, dim, y_scale, y_zp, y_qmin, y_qmax):
    return torch.cat([torch.empty_like(q, dtype=codes_dtype(y_qmin)) for q in qs], dim)


# -- the ops ------------------------------------------------------------------------------------
_TAIL = ("Tensor x_scale, Tensor x_zp, Tensor y_scale, Tensor y_zp, Tensor? residual=None, *, "
         "str act='none', float[] act_args=[], int x_qmin=0, int x_qmax=255, int y_qmin=0, "
         "int y_qmax=255, bool out_int8=False) -> Tensor")
CONV2D_INT8 = define_op(
    "conv2d_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups, " + _TAIL,
    family="int8", reference=conv2d_int8_reference, fake=_conv2d_int8_fake,
    macs=weight_macs("w_q"))
LINEAR_INT8 = define_op(
    "linear_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, " + _TAIL,
    family="int8", reference=linear_int8_reference, fake=_linear_int8_fake,
    macs=weight_macs("w_q"))
QUANTIZE = define_op("quantize(Tensor x, Tensor scale, Tensor zp, int qmin, int qmax) -> Tensor",
                     family="int8", reference=quantize_reference, fake=_quantize_fake)
DEQUANTIZE = define_op("dequantize(Tensor q, Tensor scale, Tensor zp) -> Tensor",
                       family="int8", reference=dequantize_reference, fake=_dequantize_fake)
ADD_INT8 = define_op(
    "add_int8(Tensor a, Tensor a_scale, Tensor a_zp, Tensor b, Tensor b_scale, Tensor b_zp, "
    "Tensor y_scale, Tensor y_zp, *, str act='none', float[] act_args=[], int y_qmin=0, "
    "int y_qmax=255) -> Tensor",
    family="int8", reference=add_int8_reference, fake=_add_int8_fake)
MUL_INT8 = define_op(
    "mul_int8(Tensor a, Tensor a_scale, Tensor a_zp, Tensor b, Tensor b_scale, Tensor b_zp, "
    "Tensor y_scale, Tensor y_zp, *, str act='none', float[] act_args=[], int y_qmin=0, "
    "int y_qmax=255) -> Tensor",
    family="int8", reference=mul_int8_reference, fake=_mul_int8_fake)
AVGPOOL_INT8 = define_op(
    "adaptive_avg_pool2d_int8(Tensor q, int[2] output_size, Tensor scale, Tensor zp, int qmin, "
    "int qmax, Tensor? y_scale=None, Tensor? y_zp=None) -> Tensor",
    family="int8", reference=adaptive_avg_pool2d_int8_reference, fake=_avg_pool_fake)
ACTIVATION_INT8 = define_op(
    "activation_int8(Tensor q, Tensor scale, Tensor zp, int qmin, int qmax, Tensor y_scale, "
    "Tensor y_zp, *, str act, float[] act_args=[]) -> Tensor",
    family="int8", reference=activation_int8_reference, fake=_activation_int8_fake)
AVG_POOL2D_INT8 = define_op(
    "avg_pool2d_int8(Tensor q, int[2] kernel_size, int[2] stride, int[2] padding, "
    "bool ceil_mode, bool count_include_pad, Tensor scale, Tensor zp, int qmin, int qmax) "
    "-> Tensor",
    family="int8", reference=avg_pool2d_int8_reference, fake=_avg_pool2d_fake)
MAXPOOL_INT8 = define_op(
    "max_pool2d_int8(Tensor q, int[2] kernel_size, int[2] stride, int[2] padding, "
    "int[2] dilation, bool ceil_mode) -> Tensor",
    family="int8", reference=max_pool2d_int8_reference, fake=_max_pool_fake)
UPSAMPLE_NEAREST2D_INT8 = define_op(
    "upsample_nearest2d_int8(Tensor q, SymInt[]? output_size, float[]? scale_factors, "
    "Tensor scale, Tensor zp, int qmin, int qmax) -> Tensor",
    family="int8", reference=upsample_nearest2d_int8_reference, fake=_upsample_nearest2d_fake)
CAT_INT8 = define_op(
    "cat_int8(Tensor[] qs, Tensor[] scales, Tensor[] zps, int dim, Tensor y_scale, Tensor y_zp, "
    "int y_qmin, int y_qmax) -> Tensor",
    family="int8", reference=cat_int8_reference, fake=_cat_int8_fake)
BATCH_NORM2D_INT8 = define_op(
    "batch_norm2d_int8(Tensor q, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
    "float eps, Tensor x_scale, Tensor x_zp, Tensor y_scale, Tensor y_zp, *, str act='none', "
    "float[] act_args=[], int y_qmin=0, int y_qmax=255) -> Tensor",
    family="int8", reference=batch_norm2d_int8_reference, fake=_batch_norm2d_int8_fake)

Conv2dInt8 = CONV2D_INT8.view
LinearInt8 = LINEAR_INT8.view
Quantize = QUANTIZE.view
Dequantize = DEQUANTIZE.view
AddInt8 = ADD_INT8.view
MulInt8 = MUL_INT8.view
AvgPool2dInt8 = AVGPOOL_INT8.view  # adaptive_avg_pool2d_int8
AvgPool2dWindowInt8 = AVG_POOL2D_INT8.view  # avg_pool2d_int8
MaxPool2dInt8 = MAXPOOL_INT8.view
UpsampleNearest2dInt8 = UPSAMPLE_NEAREST2D_INT8.view
CatInt8 = CAT_INT8.view
BatchNorm2dInt8 = BATCH_NORM2D_INT8.view
ActivationInt8 = ACTIVATION_INT8.view


class Int8Layer(OpView):
    """``conv2d_int8`` / ``linear_int8``, read through the parameters they share (x, w_q,
    w_scale, bias, the x and y grids, residual, act, act_args, out_int8)."""

    ops = (CONV2D_INT8, LINEAR_INT8)


class BinaryInt8(OpView):
    """``add_int8`` / ``mul_int8``, read through the parameters they share (a, b and their
    grids, the y grid, act, act_args)."""

    ops = (ADD_INT8, MUL_INT8)


INT8_IR_OPS = tuple(op.overload for op in (CONV2D_INT8, LINEAR_INT8, QUANTIZE, DEQUANTIZE,
                                           ADD_INT8, MUL_INT8, AVGPOOL_INT8, AVG_POOL2D_INT8,
                                           CAT_INT8, MAXPOOL_INT8, UPSAMPLE_NEAREST2D_INT8,
                                           BATCH_NORM2D_INT8, ACTIVATION_INT8))
