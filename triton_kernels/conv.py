"""Conv2d as an implicit GEMM on channels-last (NHWC) activations, with the fused epilogue.

GEMM view, per group ``g``: ``M = B*OH*OW`` output pixels, ``N = C_out/groups`` channels,
``K = KH*KW*C_in/groups`` taps x input channels. No im2col buffer: each K step loads, for a
block of output pixels, one filter tap (kh, kw) and a block of input channels, which NHWC
makes a contiguous row per pixel. The K loop runs over (tap, channel block) flattened, so the
software pipeline spans taps.

Layouts:
- ``x``: logical NCHW in ``torch.channels_last`` memory (NHWC), float or uint8/int8 codes;
- ``weight``: the usual OIHW tensor ``[C_out, C_in/groups, KH, KW]``; the kernel reads it in
  ``torch.channels_last`` memory (physically ``[C_out, KH, KW, C_in/groups]``, K contiguous
  per output channel). The launcher makes that copy when the weight is not already so:
  prepare it once with ``prepare_conv_weight(w)`` (``w.contiguous(memory_format=channels_last)``);
- output: logical ``[B, C_out, OH, OW]`` in channels_last memory, like torch's conv on NHWC;
- ``residual`` (optional): the output's shape, channels_last memory.

int8: the same arithmetic as ``linear_int8`` (exact int32 accumulation of raw codes, zero
point corrected with the weight's sums afterwards); padded pixels read as the zero-point code,
so they contribute nothing, as in PyTorch's quantized conv.

    w = prepare_conv_weight(conv.weight.half())
    y = conv2d(x_nhwc_fp16, w, conv.bias.half(), stride=1, padding=1, act="relu")
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxopt.triton_kernels._runtime import (CODE_DTYPES, FLOAT_DTYPES, Kernel, as_pair,
                                           check_device, interpreting)
from fxopt.triton_kernels.epilogue import (COMPILE_EPILOGUE, COMPILE_FLOAT_EPILOGUE,
                                           check_residual, epilogue_kwargs, epilogue_reference,
                                           grouped_tile, store_epilogue)
from fxopt.triton_kernels.gemm import int8_scale_and_correction

__all__ = ["conv2d", "conv2d_int8", "conv2d_reference", "conv2d_int8_reference",
           "prepare_conv_weight", "conv_configs", "conv_output_size", "check_nhwc",
           "check_conv_output"]


@triton.jit
def _conv_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, res_ptr, corr_ptr,
                 M, H, W, OH, OW, C_OUT, CG, NG, KH, KW,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                 sxb, sxh, sxw, sxc, pad_code,
                 act_a0, act_a1, y_inv_scale, y_zp, y_qmin, y_qmax,
                 IS_INT8: tl.constexpr, A_UNSIGNED: tl.constexpr, HAS_PAD_CODE: tl.constexpr,
                 HAS_CORR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RES: tl.constexpr, ACT: tl.constexpr, QUANT_OUT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    g = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, NG, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m = offs_m % M                      # wrap: loads stay in bounds, the store is masked
    ow = m % OW
    t = m // OW
    oh = t % OH
    b = t // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = x_ptr + b * sxb + (g * CG) * sxc
    K_TOTAL = KH * KW * CG
    w_row = w_ptr + (g * NG + offs_n % NG) * K_TOTAL

    if IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_cblk = (CG + BLOCK_K - 1) // BLOCK_K
    for step in range(0, KH * KW * n_cblk):
        r = step // n_cblk
        c0 = (step % n_cblk) * BLOCK_K
        kh = r // KW
        kw = r % KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        inb = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_mask = offs_k[None, :] < CG - c0
        a = tl.load(x_row[:, None] + ih[:, None] * sxh + iw[:, None] * sxw
                    + (c0 + offs_k)[None, :] * sxc, mask=inb[:, None] & c_mask, other=0)
        w = tl.load(w_row[:, None] + r * CG + (c0 + offs_k)[None, :], mask=c_mask, other=0)
        if IS_INT8:
            if A_UNSIGNED:
                a = a.to(tl.int8, bitcast=True) ^ -128
            if HAS_PAD_CODE:
                # padded pixels hold the zero-point code (zero after the correction)
                a = tl.where(inb[:, None], a, pad_code.to(tl.int8))
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            if UPCAST_DOT:
                # the interpreter's dot multiplies bf16's raw bits (numpy has no bf16);
                # bf16 products are exact in fp32, so this is the same math
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if IS_INT8:
        if HAS_CORR:
            corr = tl.load(corr_ptr + g * NG + offs_n, mask=offs_n < NG, other=0)
            acc = acc - corr[None, :]
    ch = g * NG
    store_epilogue(acc.to(tl.float32), offs_m, offs_n, M, NG, out_ptr + ch, C_OUT, 1,
                   scale_ptr + ch, bias_ptr + ch, res_ptr + ch, C_OUT, 1,
                   act_a0, act_a1, y_inv_scale, y_zp, y_qmin, y_qmax,
                   HAS_SCALE, HAS_BIAS, HAS_RES, ACT, QUANT_OUT)


def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


def conv_configs(int8: bool = False, fp32: bool = False) -> list:
    """Autotune candidates (keyed on M, channels per group, K and the input-channel count)."""
    if int8:
        return [_cfg(128, 128, 128, 3, 8), _cfg(128, 64, 128, 4, 4), _cfg(64, 128, 128, 4, 4),
                _cfg(128, 128, 64, 4, 8), _cfg(64, 64, 64, 4, 4), _cfg(64, 32, 32, 3, 4)]
    if fp32:
        return [_cfg(128, 64, 32, 3, 8), _cfg(64, 64, 32, 4, 4), _cfg(64, 32, 16, 3, 4)]
    return [_cfg(128, 128, 64, 3, 8), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
            _cfg(128, 128, 32, 4, 8), _cfg(64, 64, 32, 4, 4), _cfg(64, 32, 16, 3, 4)]


_INTERPRET_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}
_KEY = ["M", "NG", "CG", "KH", "KW"]
_TILE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)  # compile cases
_conv_int8_kernel = Kernel(_conv_kernel, lambda: conv_configs(int8=True), _KEY, _INTERPRET_META,
                           do_not_specialize=["pad_code"], compile_cases={
    "conv_int8": (dict(x_ptr="*u8", w_ptr="*i8", out_ptr="*u8", res_ptr="*fp16"),
                  dict(IS_INT8=True, A_UNSIGNED=True, HAS_PAD_CODE=True, HAS_CORR=True,
                       **COMPILE_EPILOGUE, **_TILE))})
_conv_half_kernel = Kernel(_conv_kernel, lambda: conv_configs(), _KEY, _INTERPRET_META,
                           compile_cases={
    "conv_fp16": (dict(x_ptr="*fp16", w_ptr="*fp16", out_ptr="*fp16", res_ptr="*fp16"),
                  dict(IS_INT8=False, A_UNSIGNED=False, HAS_PAD_CODE=False, HAS_CORR=False,
                       **COMPILE_FLOAT_EPILOGUE, **_TILE))})
_conv_fp32_kernel = Kernel(_conv_kernel, lambda: conv_configs(fp32=True), _KEY, _INTERPRET_META,
                           compile_cases={
    "conv_fp32": (dict(x_ptr="*fp32", w_ptr="*fp32", out_ptr="*fp32", res_ptr="*fp32"),
                  dict(IS_INT8=False, A_UNSIGNED=False, HAS_PAD_CODE=False, HAS_CORR=False,
                       **COMPILE_FLOAT_EPILOGUE, **dict(_TILE, BLOCK_K=32)))})


def conv_output_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output rows (or columns) of a convolution, as PyTorch computes them."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def prepare_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in the layout the conv kernels read: OIHW in channels_last memory."""
    return weight.contiguous(memory_format=torch.channels_last)


def check_nhwc(name: str, x, dtypes, what="x") -> None:
    """A 4-D ``[B, C, H, W]`` tensor of one of ``dtypes`` in channels-last memory, or a readable
    error (the conv and depthwise launchers take their activations so)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: {what} must be a tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: {what} must be {', '.join(str(d) for d in dtypes)}, got "
                        f"{x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name}: {what} must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name}: {what} must be channels-last (NHWC memory); pass "
                         f"{what}.contiguous(memory_format=torch.channels_last)")


def _conv_common(name, x, weight, stride, padding, dilation, groups, residual, out, out_dtype,
                 wdtypes):
    if not isinstance(weight, torch.Tensor) or weight.dtype not in wdtypes:
        raise TypeError(f"{name}: weight must be a {' or '.join(str(d) for d in wdtypes)} "
                        f"tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() != 4:
        raise ValueError(f"{name}: weight must be 4-D [C_out, C_in/groups, KH, KW], "
                         f"got {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{name}: groups must be a positive int, got {groups!r}")
    sh, sw = as_pair(stride, f"{name}: stride")
    ph, pw = as_pair(padding, f"{name}: padding")
    dh, dw = as_pair(dilation, f"{name}: dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{name}: need stride >= 1, dilation >= 1, padding >= 0; got stride "
                         f"{(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}")
    B, C, H, W = x.shape
    CO, CG, KH, KW = weight.shape
    if C % groups or CO % groups:
        raise ValueError(f"{name}: groups={groups} must divide C_in={C} and C_out={CO}")
    if CG != C // groups:
        raise ValueError(f"{name}: weight has {CG} input channels per group, x has C_in={C} and "
                         f"groups={groups}, so {C // groups} expected")
    OH = conv_output_size(H, KH, sh, ph, dh)
    OW = conv_output_size(W, KW, sw, pw, dw)
    if OH < 1 or OW < 1:
        raise ValueError(f"{name}: the output would be empty ({OH}x{OW}) for input {H}x{W}, "
                         f"kernel {KH}x{KW}, stride {(sh, sw)}, padding {(ph, pw)}, "
                         f"dilation {(dh, dw)}")
    out_shape = (B, CO, OH, OW)
    check_conv_output(name, x, residual, out, out_shape, out_dtype)
    return (sh, sw), (ph, pw), (dh, dw), out_shape


def check_conv_output(name: str, x: torch.Tensor, residual, out, out_shape: tuple,
                      out_dtype: torch.dtype) -> None:
    """The residual and the caller's ``out`` fit an NHWC output of ``out_shape``, and every
    offset fits the kernels' int32 arithmetic (shared by the conv and depthwise launchers)."""
    check_residual(name, residual, out_shape)
    if residual is not None:
        check_nhwc(name, residual, FLOAT_DTYPES, "residual")
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != out_shape
                            or out.dtype != out_dtype
                            or not out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{name}: out must be a channels-last {out_dtype} tensor of shape "
                         f"{out_shape}")
    numel = out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3]
    if max(x.numel(), numel) >= 2 ** 31:
        raise ValueError(f"{name}: tensors with 2**31 or more elements are not supported "
                         "(int32 offsets)")


def _launch(kernel, x, w, out, ep, *, stride, padding, dilation, groups, residual, scale, corr,
            pad_code, is_int8, a_unsigned, dot_precision):
    B, C, H, W = x.shape
    CO, CG, KH, KW = w.shape
    _, _, OH, OW = out.shape
    M, NG = B * OH * OW, CO // groups
    if M == 0:
        return
    sxb, sxc, sxh, sxw = x.stride()
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(NG, META["BLOCK_N"]),
                         groups)
    kernel[grid](
        x_ptr=x, w_ptr=w, out_ptr=out, scale_ptr=out if scale is None else scale,
        res_ptr=out if residual is None else residual, corr_ptr=out if corr is None else corr,
        M=M, H=H, W=W, OH=OH, OW=OW, C_OUT=CO, CG=CG, NG=NG, KH=KH, KW=KW,
        stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1],
        dil_h=dilation[0], dil_w=dilation[1], sxb=sxb, sxh=sxh, sxw=sxw, sxc=sxc,
        pad_code=pad_code, IS_INT8=is_int8, A_UNSIGNED=a_unsigned,
        HAS_PAD_CODE=is_int8 and pad_code != 0 and (padding[0] > 0 or padding[1] > 0),
        HAS_CORR=corr is not None, HAS_SCALE=scale is not None, HAS_RES=residual is not None,
        DOT_PRECISION=dot_precision,
        UPCAST_DOT=interpreting() and w.dtype == torch.bfloat16, **ep)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1, residual: torch.Tensor | None = None,
           *, act: str = "none", act_args=(), out_dtype: torch.dtype | None = None, y_scale=None,
           y_zp=0, y_qmin=None, y_qmax=None, allow_tf32: bool = False,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)`` for a
    channels-last float ``x`` (fp16/bf16/fp32; ``weight`` the same dtype), fp32 accumulation.
    Output channels-last in ``out_dtype`` (default ``x.dtype``) or requantized codes."""
    name = "conv2d"
    check_nhwc(name, x, FLOAT_DTYPES)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    stride, padding, dilation, out_shape = _conv_common(
        name, x, weight, stride, padding, dilation, groups, residual, out, out_dtype, FLOAT_DTYPES)
    if weight.dtype != x.dtype:
        raise TypeError(f"{name}: x and weight must have the same dtype, got {x.dtype} and "
                        f"{weight.dtype}")
    device = check_device(name, {"x": x, "weight": weight, "bias": bias, "residual": residual,
                                 "out": out})
    w = prepare_conv_weight(weight)
    ep = epilogue_kwargs(name, n=weight.shape[0], out_dtype=out_dtype, bias=bias, act=act,
                         act_args=act_args, y_scale=y_scale, y_zp=y_zp, y_qmin=y_qmin,
                         y_qmax=y_qmax, dummy=w)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=device,
                          memory_format=torch.channels_last)
    kernel = _conv_fp32_kernel if x.dtype == torch.float32 else _conv_half_kernel
    _launch(kernel, x, w, out, ep, stride=stride, padding=padding, dilation=dilation,
            groups=groups, residual=residual, scale=None, corr=None, pad_code=0, is_int8=False,
            a_unsigned=False, dot_precision="tf32" if allow_tf32 else "ieee")
    return out


def conv2d_int8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1,
                residual: torch.Tensor | None = None, *, a_scale, a_zp=0, act: str = "none",
                act_args=(), out_dtype: torch.dtype = torch.float32, y_scale=None, y_zp=0,
                y_qmin=None, y_qmax=None, w_colsum: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 conv on channels-last uint8/int8 codes ``x`` (grid ``a_scale``/``a_zp``) with an
    int8 OIHW weight ``w_q`` (per-output-channel ``w_scale``, zero point 0). Output as
    ``linear_int8``: float or requantized codes, channels-last."""
    name = "conv2d_int8"
    check_nhwc(name, x, CODE_DTYPES)
    stride, padding, dilation, out_shape = _conv_common(
        name, x, w_q, stride, padding, dilation, groups, residual, out, out_dtype, (torch.int8,))
    device = check_device(name, {"x": x, "w_q": w_q, "w_scale": w_scale, "bias": bias,
                                 "residual": residual, "out": out, "w_colsum": w_colsum})
    scale, corr, zp_eff = int8_scale_and_correction(name, w_q, w_scale, x, a_scale, a_zp, w_colsum)
    w = prepare_conv_weight(w_q)
    ep = epilogue_kwargs(name, n=w_q.shape[0], out_dtype=out_dtype, bias=bias, act=act,
                         act_args=act_args, y_scale=y_scale, y_zp=y_zp, y_qmin=y_qmin,
                         y_qmax=y_qmax, dummy=scale)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=device,
                          memory_format=torch.channels_last)
    _launch(_conv_int8_kernel, x, w, out, ep, stride=stride, padding=padding, dilation=dilation,
            groups=groups, residual=residual, scale=scale, corr=corr, pad_code=zp_eff,
            is_int8=True, a_unsigned=x.dtype == torch.uint8, dot_precision="ieee")
    return out


# -- references: plain PyTorch ------------------------------------------------------------------
def conv2d_reference(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                     residual=None, *, act="none", act_args=(), out_dtype=None, y_scale=None,
                     y_zp=0, y_qmin=None, y_qmax=None, compute_dtype=torch.float64):
    """``conv2d``'s math in ``compute_dtype`` (float64 for tests; float outputs stay there)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    acc = torch.nn.functional.conv2d(x.to(compute_dtype), weight.to(compute_dtype), None,
                                     stride, padding, dilation, groups)
    lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
    return epilogue_reference(acc, None, bias, residual, act, act_args, out_dtype, y_scale, y_zp,
                              lo if y_qmin is None else y_qmin, hi if y_qmax is None else y_qmax,
                              channel_dim=1)


def conv2d_int8_reference(x, w_q, w_scale, bias=None, stride=1, padding=0, dilation=1, groups=1,
                          residual=None, *, a_scale, a_zp=0, act="none", act_args=(),
                          out_dtype=torch.float32, y_scale=None, y_zp=0, y_qmin=None, y_qmax=None,
                          compute_dtype=torch.float64):
    """Exact integer conv of ``x - a_zp`` (zero padding == zero-point padding) in float64,
    the float32 scale product, the rest of the epilogue in ``compute_dtype``."""
    acc = torch.nn.functional.conv2d(x.to(torch.float64) - float(a_zp), w_q.to(torch.float64),
                                     None, stride, padding, dilation, groups)
    a_scale32 = torch.tensor(float(a_scale), dtype=torch.float32, device=w_scale.device)
    scale = a_scale32 * w_scale.float()
    lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
    return epilogue_reference(acc.to(compute_dtype), scale, bias, residual, act, act_args,
                              out_dtype, y_scale, y_zp, lo if y_qmin is None else y_qmin,
                              hi if y_qmax is None else y_qmax, channel_dim=1)
