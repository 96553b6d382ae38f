"""Int8 ops in the ``fxopt`` namespace: a convolution or linear layer run on int8 codes.

Each op takes a *float* input and returns a *float* output; inside it quantizes the input
(per tensor, ``x_scale``/``x_zp``), multiplies int8 codes with a per-channel symmetric int8
weight (``w_scale`` per output channel, zero point 0) accumulating in int32, adds the float
bias (and a float residual), applies the activation and rounds the result onto the output
grid (``y_scale``/``y_zp``), then dequantizes. First cut: every op is its own quantized
region (quantize at entry, dequantize at exit); int8 chains without a float round trip are
the next step.

    y = torch.ops.fxopt.conv2d_int8(x, w_q, w_scale, b, [1, 1], [1, 1], [1, 1], 1,
                                    x_scale, x_zp, y_scale, y_zp, None, act="relu")
    # == fq_y(relu(conv2d(fq_x(x), w_q * w_scale, b)))  within one step of the y grid

CPU: PyTorch's quantized kernels (``torch.ops.quantized.conv2d`` / ``linear`` with prepacked
weights, engine ``torch.backends.quantized.engine``) when the op has no residual and its
activation is ``none`` or ``relu`` and the input grid is uint8 with a 7-bit range (fbgemm's
u8 x s8 pair sums must stay inside int16); everything else runs the reference: integer
codes, exact accumulation (float32 while every partial sum stays below 2**24, else float64),
the epilogue in float32.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F

from .metrics import MAC_COUNTERS
from .ops import LIB, _out_format, apply_activation

__all__ = ["conv2d_int8_reference", "linear_int8_reference", "quantized_engine_available",
           "clear_packed_cache"]

_TAIL = ("Tensor x_scale, Tensor x_zp, Tensor y_scale, Tensor y_zp, Tensor? residual=None, *, "
         "str act='none', float[] act_args=[], int x_qmin=0, int x_qmax=127, int y_qmin=0, "
         "int y_qmax=255) -> Tensor")
LIB.define("conv2d_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, int[2] stride, "
           "int[2] padding, int[2] dilation, int groups, " + _TAIL)
LIB.define("linear_int8(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, " + _TAIL)


def _quant(x, scale, zp, qmin, qmax) -> torch.Tensor:
    """Codes (as int64) with PyTorch's arithmetic: round(x * (1/s)) + zp, clamped."""
    q = torch.round(x.float() * torch.reciprocal(scale.float())) + zp
    return q.clamp_(qmin, qmax).to(torch.int64)


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
    q = _quant(y, y_scale, y_zp, y_qmin, y_qmax)
    return (q - y_zp).float() * y_scale.float()


def _exact_dtype(k: int, x_zp, x_qmin: int, x_qmax: int) -> torch.dtype:
    """float32 when every partial sum of ``k`` int8 products is an integer below 2**24 (then
    any summation order is exact and the fast float kernels apply), else float64."""
    zp = int(x_zp)
    bound = k * max(zp - x_qmin, x_qmax - zp) * 127
    return torch.float32 if bound < 2 ** 24 else torch.float64


def conv2d_int8_reference(x, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                          y_scale, y_zp, residual=None, *, act="none", act_args=(), x_qmin=0,
                          x_qmax=127, y_qmin=0, y_qmax=255) -> torch.Tensor:
    """Exact integer convolution: integer codes, accumulated in float32 where every partial
    sum fits its 24-bit mantissa, else in float64 (exact for any int8 layer size here)."""
    k = w_q.shape[1] * w_q.shape[2] * w_q.shape[3]
    dt = _exact_dtype(k, x_zp, x_qmin, x_qmax)
    xq = (_quant(x, x_scale, x_zp, x_qmin, x_qmax) - x_zp).to(dt)
    acc = F.conv2d(xq, w_q.to(dt), None, list(stride), list(padding), list(dilation), groups)
    y = _epilogue(acc, x_scale, w_scale, bias, residual, act, act_args, y_scale, y_zp, y_qmin,
                  y_qmax, 1).to(x.dtype)
    fmt = _out_format(x)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


def linear_int8_reference(x, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, residual=None, *,
                          act="none", act_args=(), x_qmin=0, x_qmax=127, y_qmin=0,
                          y_qmax=255) -> torch.Tensor:
    dt = _exact_dtype(w_q.shape[1], x_zp, x_qmin, x_qmax)
    xq = (_quant(x, x_scale, x_zp, x_qmin, x_qmax) - x_zp).to(dt)
    acc = F.linear(xq, w_q.to(dt))
    return _epilogue(acc, x_scale, w_scale, bias, residual, act, act_args, y_scale, y_zp, y_qmin,
                     y_qmax, -1).to(x.dtype).contiguous()


# -- CPU: PyTorch's quantized kernels ----------------------------------------------------------
_PACKED: dict[tuple, tuple] = {}


def clear_packed_cache() -> None:
    _PACKED.clear()


def quantized_engine_available() -> bool:
    """Whether PyTorch's quantized CPU kernels (fbgemm / x86 / onednn) can run here."""
    return torch.backends.quantized.engine in ("x86", "fbgemm", "onednn")


def _fast_ok(x, residual, act, x_zp, x_qmin, x_qmax, y_qmin, y_qmax) -> bool:
    return (quantized_engine_available() and residual is None and act in ("none", "relu")
            and x.dtype == torch.float32 and x_qmin == 0 and x_qmax <= 127
            and y_qmin == 0 and y_qmax == 255)


def _packed(kind: str, w_q, w_scale, bias, extra: tuple, act: str):
    """Prepacked weights, cached per weight tensor (and its version), engine and activation."""
    key = (kind, id(w_q), w_q._version, torch.backends.quantized.engine, extra, act,
           id(bias), id(w_scale))
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is w_q:
        return hit[1]
    with _quiet():
        wq = torch._make_per_channel_quantized_tensor(
            w_q.to(torch.int8), w_scale.double(), torch.zeros_like(w_scale, dtype=torch.int64), 0)
    b = bias.float() if bias is not None else None
    if kind == "conv2d":
        stride, padding, dilation, groups = extra
        packed = torch.ops.quantized.conv2d_prepack(wq, b, list(stride), list(padding),
                                                    list(dilation), groups)
    else:
        packed = torch.ops.quantized.linear_prepack(wq, b)
    _PACKED[key] = (weakref.ref(w_q), packed)
    return packed


def _qinput(x, x_scale, x_zp, x_qmin, x_qmax):
    codes = _quant(x, x_scale, x_zp, x_qmin, x_qmax).to(torch.uint8)
    with _quiet():
        return torch._make_per_tensor_quantized_tensor(codes, float(x_scale), int(x_zp))


def _quiet():
    """PyTorch deprecates quantized tensor creation (the kernels stay); keep that warning out."""
    return _Quiet()


class _Quiet:
    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _conv2d_int8_cpu(x, w_q, w_scale, bias, stride, padding, dilation, groups, x_scale, x_zp,
                     y_scale, y_zp, residual=None, *, act="none", act_args=(), x_qmin=0,
                     x_qmax=127, y_qmin=0, y_qmax=255):
    if not _fast_ok(x, residual, act, x_zp, x_qmin, x_qmax, y_qmin, y_qmax):
        return conv2d_int8_reference(x, w_q, w_scale, bias, stride, padding, dilation, groups,
                                     x_scale, x_zp, y_scale, y_zp, residual, act=act,
                                     act_args=act_args, x_qmin=x_qmin, x_qmax=x_qmax,
                                     y_qmin=y_qmin, y_qmax=y_qmax)
    # One packing per activation: the x86/onednn packed params cache a primitive built for
    # the first call's post-op (measured: conv2d after conv2d_relu on one packing kept relu).
    packed = _packed("conv2d", w_q, w_scale, bias, (tuple(stride), tuple(padding),
                                                    tuple(dilation), groups), act)
    qx = _qinput(x, x_scale, x_zp, x_qmin, x_qmax)
    fn = torch.ops.quantized.conv2d_relu if act == "relu" else torch.ops.quantized.conv2d
    y = fn(qx, packed, float(y_scale), int(y_zp)).dequantize()
    fmt = _out_format(x)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


def _linear_int8_cpu(x, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp, residual=None, *,
                     act="none", act_args=(), x_qmin=0, x_qmax=127, y_qmin=0, y_qmax=255):
    if not _fast_ok(x, residual, act, x_zp, x_qmin, x_qmax, y_qmin, y_qmax):
        return linear_int8_reference(x, w_q, w_scale, bias, x_scale, x_zp, y_scale, y_zp,
                                     residual, act=act, act_args=act_args, x_qmin=x_qmin,
                                     x_qmax=x_qmax, y_qmin=y_qmin, y_qmax=y_qmax)
    packed = _packed("linear", w_q, w_scale, bias, (), act)
    qx = _qinput(x.contiguous(), x_scale, x_zp, x_qmin, x_qmax)
    fn = torch.ops.quantized.linear_relu if act == "relu" else torch.ops.quantized.linear
    return fn(qx, packed, float(y_scale), int(y_zp)).dequantize().contiguous()


# -- fake implementations ----------------------------------------------------------------------
def _conv2d_int8_fake(x, w_q, w_scale, bias, stride, padding, dilation, groups, *rest, **kw):
    spatial = []
    for i, (s, p, d) in enumerate(zip(stride, padding, dilation)):
        size, k = x.shape[2 + i], w_q.shape[2 + i]
        spatial.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return torch.empty([x.shape[0], w_q.shape[0], *spatial], dtype=x.dtype, device=x.device,
                       memory_format=_out_format(x))


def _linear_int8_fake(x, w_q, *rest, **kw):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


LIB.impl("conv2d_int8", _conv2d_int8_cpu, "CPU")
LIB.impl("conv2d_int8", conv2d_int8_reference, "CUDA")  # the Triton int8 kernels replace this
torch.library.register_fake("fxopt::conv2d_int8", _conv2d_int8_fake, lib=LIB)
LIB.impl("linear_int8", _linear_int8_cpu, "CPU")
LIB.impl("linear_int8", linear_int8_reference, "CUDA")
torch.library.register_fake("fxopt::linear_int8", _linear_int8_fake, lib=LIB)


def _shape(node):
    tm = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _conv_macs(node, gm) -> int:
    import math
    out, w = _shape(node), _shape(node.args[1])
    return math.prod(out) * math.prod(w[1:]) if out and w else 0


def _linear_macs(node, gm) -> int:
    import math
    out, w = _shape(node), _shape(node.args[1])
    return math.prod(out) * w[-1] if out and w else 0


MAC_COUNTERS[torch.ops.fxopt.conv2d_int8] = _conv_macs
MAC_COUNTERS[torch.ops.fxopt.linear_int8] = _linear_macs
