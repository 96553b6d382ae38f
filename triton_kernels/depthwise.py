"""Depthwise conv2d (groups == C_in == C_out, one filter per channel), direct, on NHWC.

Implicit GEMM is a poor fit (K = KH*KW per group, N = 1), so each program takes a block of
output pixels x a block of channels and sums the KH*KW taps with elementwise multiply-adds;
channels are contiguous in NHWC, so every tap is one coalesced load per pixel row. The fused
epilogue is the one of ``epilogue.py``.

Layouts: ``x`` logical NCHW in channels_last memory; ``weight`` the usual ``[C, 1, KH, KW]``,
which the launcher reorders to ``[KH*KW, C]`` (C contiguous; a small copy per call, or pass
``prepare_depthwise_weight(w)`` once: a 2-D tensor is taken as already prepared, then
``kernel_size`` must be given); output channels_last.

int8: ``(x - a_zp) * w`` summed in int32 (padded pixels contribute nothing), then the same
dequant/requant epilogue as ``conv2d_int8``.

    y = depthwise_conv2d(x_nhwc, conv.weight, conv.bias, stride=2, padding=1, act="relu6")
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxopt.triton_kernels._runtime import (CODE_DTYPES, FLOAT_DTYPES, Kernel, as_float, as_int,
                                           as_pair, check_device)
from fxopt.triton_kernels.conv import check_conv_output, check_nhwc, conv_output_size
from fxopt.triton_kernels.epilogue import (COMPILE_EPILOGUE, COMPILE_FLOAT_EPILOGUE,
                                           epilogue_kwargs, store_epilogue)

__all__ = ["depthwise_conv2d", "depthwise_conv2d_int8", "prepare_depthwise_weight",
           "depthwise_conv2d_reference", "depthwise_conv2d_int8_reference", "depthwise_configs"]


@triton.jit
def _depthwise_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, res_ptr,
                      M, C, H, W, OH, OW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                      sxb, sxh, sxw, sxc, a_zp,
                      act_a0, act_a1, y_inv_scale, y_zp, y_qmin, y_qmax,
                      KH: tl.constexpr, KW: tl.constexpr, IS_INT8: tl.constexpr,
                      HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                      ACT: tl.constexpr, QUANT_OUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    c_mask = offs_c < C
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    b = t // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = x_ptr + b * sxb
    if IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            inb = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            mask = inb[:, None] & c_mask[None, :]
            a = tl.load(x_row[:, None] + ih[:, None] * sxh + iw[:, None] * sxw
                        + offs_c[None, :] * sxc, mask=mask, other=0)
            w = tl.load(w_ptr + (kh * KW + kw) * C + offs_c, mask=c_mask, other=0)
            if IS_INT8:
                prod = (a.to(tl.int32) - a_zp) * w.to(tl.int32)[None, :]
                acc += tl.where(mask, prod, 0)
            else:
                acc += a.to(tl.float32) * w.to(tl.float32)[None, :]
    store_epilogue(acc.to(tl.float32), offs_m, offs_c, M, C, out_ptr, C, 1,
                   scale_ptr, bias_ptr, res_ptr, C, 1,
                   act_a0, act_a1, y_inv_scale, y_zp, y_qmin, y_qmax,
                   HAS_SCALE, HAS_BIAS, HAS_RES, ACT, QUANT_OUT)


def depthwise_configs() -> list:
    """Autotune candidates: pixels x channels tiles (channels contiguous)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=2)
            for bm, bc, w in [(32, 64, 4), (64, 64, 4), (16, 128, 4), (64, 128, 8), (128, 32, 4),
                              (8, 256, 4)]]


_INTERPRET_META = {"BLOCK_M": 32, "BLOCK_C": 32}
_KEY = ["M", "C", "H", "W"]
_depthwise_kernel_l = Kernel(_depthwise_kernel, depthwise_configs, _KEY, _INTERPRET_META,
                             do_not_specialize=["a_zp"], compile_cases={
    "depthwise_int8": (dict(x_ptr="*i8", w_ptr="*i8", out_ptr="*i8", res_ptr="*fp32"),
                       dict(KH=3, KW=3, IS_INT8=True, **COMPILE_EPILOGUE, BLOCK_M=32,
                            BLOCK_C=64)),
    "depthwise_fp16": (dict(x_ptr="*fp16", w_ptr="*fp16", out_ptr="*fp16", res_ptr="*fp16"),
                       dict(KH=3, KW=3, IS_INT8=False, **COMPILE_FLOAT_EPILOGUE, BLOCK_M=32,
                            BLOCK_C=64))})


def prepare_depthwise_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[C, 1, KH, KW]`` -> ``[KH*KW, C]`` contiguous, the layout the kernel reads."""
    C, _, KH, KW = weight.shape
    return weight.reshape(C, KH * KW).t().contiguous()


def _prepare(name, x, weight, bias, stride, padding, dilation, residual, out, out_dtype,
             kernel_size, wdtypes):
    B, C, H, W = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dtype not in wdtypes:
        raise TypeError(f"{name}: weight must be a {' or '.join(str(d) for d in wdtypes)} tensor, "
                        f"got {getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() == 4:
        if tuple(weight.shape[:2]) != (C, 1):
            raise ValueError(f"{name}: a depthwise weight has shape [C, 1, KH, KW] with C={C} "
                             f"(the input's channels), got {tuple(weight.shape)}")
        KH, KW = weight.shape[2:]
        w2 = prepare_depthwise_weight(weight)
    elif weight.dim() == 2:
        if kernel_size is None:
            raise ValueError(f"{name}: a prepared 2-D weight [KH*KW, C] needs "
                             "kernel_size=(KH, KW)")
        KH, KW = as_pair(kernel_size, f"{name}: kernel_size")
        if tuple(weight.shape) != (KH * KW, C) or not weight.is_contiguous():
            raise ValueError(f"{name}: a prepared weight must be contiguous [KH*KW, C] = "
                             f"[{KH * KW}, {C}], got {tuple(weight.shape)}")
        w2 = weight
    else:
        raise ValueError(f"{name}: weight must be [C, 1, KH, KW] (or prepared [KH*KW, C]), "
                         f"got shape {tuple(weight.shape)}")
    sh, sw = as_pair(stride, f"{name}: stride")
    ph, pw = as_pair(padding, f"{name}: padding")
    dh, dw = as_pair(dilation, f"{name}: dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{name}: need stride >= 1, dilation >= 1, padding >= 0")
    OH, OW = conv_output_size(H, KH, sh, ph, dh), conv_output_size(W, KW, sw, pw, dw)
    if OH < 1 or OW < 1:
        raise ValueError(f"{name}: the output would be empty ({OH}x{OW})")
    out_shape = (B, C, OH, OW)
    check_conv_output(name, x, residual, out, out_shape, out_dtype)
    return w2, (KH, KW), (sh, sw), (ph, pw), (dh, dw), out_shape


def _launch(x, w2, ksize, out, ep, stride, padding, dilation, residual, scale, a_zp, is_int8):
    B, C, H, W = x.shape
    _, _, OH, OW = out.shape
    M = B * OH * OW
    sxb, sxc, sxh, sxw = x.stride()
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(C, META["BLOCK_C"]))
    _depthwise_kernel_l[grid](
        x_ptr=x, w_ptr=w2, out_ptr=out, scale_ptr=out if scale is None else scale,
        res_ptr=out if residual is None else residual,
        M=M, C=C, H=H, W=W, OH=OH, OW=OW, stride_h=stride[0], stride_w=stride[1],
        pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1],
        sxb=sxb, sxh=sxh, sxw=sxw, sxc=sxc, a_zp=a_zp, KH=ksize[0], KW=ksize[1],
        IS_INT8=is_int8, HAS_SCALE=scale is not None, HAS_RES=residual is not None, **ep)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride=1, padding=0, dilation=1, residual: torch.Tensor | None = None, *,
                     act: str = "none", act_args=(), out_dtype: torch.dtype | None = None,
                     y_scale=None, y_zp=0, y_qmin=None, y_qmax=None, kernel_size=None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups=C) + residual)`` on a
    channels-last float ``x``; fp32 accumulation; output channels-last."""
    name = "depthwise_conv2d"
    check_nhwc(name, x, FLOAT_DTYPES)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    w2, ks, stride, padding, dilation, out_shape = _prepare(
        name, x, weight, bias, stride, padding, dilation, residual, out, out_dtype, kernel_size,
        FLOAT_DTYPES)
    device = check_device(name, {"x": x, "weight": weight, "bias": bias, "residual": residual,
                                 "out": out})
    ep = epilogue_kwargs(name, n=x.shape[1], out_dtype=out_dtype, bias=bias, act=act,
                         act_args=act_args, y_scale=y_scale, y_zp=y_zp, y_qmin=y_qmin,
                         y_qmax=y_qmax, dummy=w2)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=device,
                          memory_format=torch.channels_last)
    _launch(x, w2, ks, out, ep, stride, padding, dilation, residual, None, 0, False)
    return out


def depthwise_conv2d_int8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                          residual: torch.Tensor | None = None, *, a_scale, a_zp=0,
                          act: str = "none", act_args=(), out_dtype: torch.dtype = torch.float32,
                          y_scale=None, y_zp=0, y_qmin=None, y_qmax=None, kernel_size=None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 depthwise conv on channels-last uint8/int8 codes; ``w_q`` int8 ``[C, 1, KH, KW]``
    (or prepared), ``w_scale`` [C]; output float or requantized codes, channels-last."""
    name = "depthwise_conv2d_int8"
    check_nhwc(name, x, CODE_DTYPES)
    w2, ks, stride, padding, dilation, out_shape = _prepare(
        name, x, w_q, bias, stride, padding, dilation, residual, out, out_dtype, kernel_size,
        (torch.int8,))
    device = check_device(name, {"x": x, "w_q": w_q, "w_scale": w_scale, "bias": bias,
                                 "residual": residual, "out": out})
    C = x.shape[1]
    if (not isinstance(w_scale, torch.Tensor) or w_scale.dtype not in FLOAT_DTYPES
            or w_scale.numel() != C):
        raise ValueError(f"{name}: w_scale must be a float tensor with {C} elements (one per "
                         "channel)")
    zp = as_int(a_zp, f"{name}: a_zp")
    lo, hi = (0, 255) if x.dtype == torch.uint8 else (-128, 127)
    if not lo <= zp <= hi:
        raise ValueError(f"{name}: a_zp={zp} is outside the {x.dtype} code range [{lo}, {hi}]")
    scale = (w_scale.reshape(-1).float() * as_float(a_scale, f"{name}: a_scale")).contiguous()
    ep = epilogue_kwargs(name, n=C, out_dtype=out_dtype, bias=bias, act=act, act_args=act_args,
                         y_scale=y_scale, y_zp=y_zp, y_qmin=y_qmin, y_qmax=y_qmax, dummy=scale)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=device,
                          memory_format=torch.channels_last)
    _launch(x, w2, ks, out, ep, stride, padding, dilation, residual, scale, zp, True)
    return out


# -- references: plain PyTorch ------------------------------------------------------------------
def depthwise_conv2d_reference(x, weight, bias=None, stride=1, padding=0, dilation=1,
                               residual=None, **kw):
    """``depthwise_conv2d``'s math (float64 by default): ``conv2d_reference`` with groups=C."""
    from fxopt.triton_kernels.conv import conv2d_reference
    return conv2d_reference(x, weight, bias, stride, padding, dilation, x.shape[1], residual, **kw)


def depthwise_conv2d_int8_reference(x, w_q, w_scale, bias=None, stride=1, padding=0, dilation=1,
                                    residual=None, **kw):
    from fxopt.triton_kernels.conv import conv2d_int8_reference
    return conv2d_int8_reference(x, w_q, w_scale, bias, stride, padding, dilation, x.shape[1],
                                 residual, **kw)
