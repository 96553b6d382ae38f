"""Pooling kernels on int8 codes: max pooling and global average pooling.

Between the convolutions of an int8 CNN, with the codes kept on the GPU (never float tensors):

- ``max_pool2d_int8``: a direct kernel, blocks of output pixels x channels (channels contiguous
  in NHWC), kernel/stride/padding/dilation, ``ceil_mode``; padded and out-of-range taps are
  ignored (PyTorch's -inf padding). Codes keep their grid (max of codes = code of the max).
  Any input strides are read (NHWC is the fast one); the output is channels-last.
- ``global_avg_pool2d_int8``: ``adaptive_avg_pool2d`` to 1x1 on the same grid: exact int32 sum
  of ``q - zp`` per (image, channel), then ``sum * scale / (H*W)`` in float32, requantized.
  PyTorch sums the float values instead, so a code can differ by one where the mean sits
  within float32 rounding of a half-way point.

    p = max_pool2d_int8(q_nhwc, 3, stride=2, padding=1)
    g = global_avg_pool2d_int8(q_nhwc, 0.06, 0, qmin=0, qmax=255)          # [B, C, 1, 1]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxopt.triton_kernels._runtime import (Kernel, as_pair, check_codes, check_device,
                                           check_grid, check_numel, check_out, code_range,
                                           float_reciprocal)
from fxopt.triton_kernels.epilogue import quantize_reference, requantize

__all__ = ["max_pool2d_int8", "global_avg_pool2d_int8", "max_pool2d_int8_reference",
           "global_avg_pool2d_int8_reference", "pool_output_size"]


# -- kernels ----------------------------------------------------------------------------------
@triton.jit
def _max_pool_kernel(x_ptr, out_ptr, M, C, H, W, OH, OW, stride_h, stride_w, pad_h, pad_w,
                     dil_h, dil_w, sxb, sxc, sxh, sxw,
                     KH: tl.constexpr, KW: tl.constexpr, LOWEST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    c_mask = offs_c < C
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    b = t // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = x_ptr + b * sxb
    # the dtype's lowest code: a tap outside the input never wins (PyTorch pads with -inf)
    acc = tl.full((BLOCK_M, BLOCK_C), LOWEST, dtype=tl.int32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            inb = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            mask = inb[:, None] & c_mask[None, :]
            v = tl.load(x_row[:, None] + ih[:, None] * sxh + iw[:, None] * sxw
                        + offs_c[None, :] * sxc, mask=mask, other=LOWEST)
            acc = tl.maximum(acc, v.to(tl.int32))
    mask = m_mask[:, None] & c_mask[None, :]
    tl.store(out_ptr + offs_m[:, None] * C + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _global_avg_pool_kernel(x_ptr, out_ptr, C, HW, W, sxb, sxc, sxh, sxw, zp, scale, count,
                            y_inv_scale, y_zp, y_qmin, y_qmax,
                            BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.int32)
    for start in range(0, HW, BLOCK_HW):
        p = start + tl.arange(0, BLOCK_HW)
        mask = (p < HW)[:, None] & c_mask[None, :]
        ptrs = x_ptr + b * sxb + (p // W)[:, None] * sxh + (p % W)[:, None] * sxw \
            + offs_c[None, :] * sxc
        v = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        acc += tl.where(mask, v - zp, 0)
    total = tl.sum(acc, axis=0)
    # the mean of the float values, as PyTorch divides (correctly rounded, not div.full)
    y = tl.math.div_rn(total.to(tl.float32) * scale, count)
    q = requantize(y, y_inv_scale, y_zp, y_qmin, y_qmax)
    tl.store(out_ptr + b * C + offs_c, q.to(out_ptr.dtype.element_ty), mask=c_mask)


def _pool_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w)
            for bm, bc, w in [(32, 64, 4), (64, 64, 4), (16, 128, 4), (64, 128, 8), (128, 32, 4),
                              (8, 256, 4)]]


def _gap_configs():
    return [triton.Config({"BLOCK_HW": bh, "BLOCK_C": bc}, num_warps=w)
            for bh, bc, w in [(8, 128, 4), (16, 64, 4), (4, 256, 4), (32, 128, 8), (16, 256, 8)]]


_max_pool = Kernel(_max_pool_kernel, _pool_configs, ["M", "C", "H", "W"],
                   {"BLOCK_M": 16, "BLOCK_C": 32}, compile_cases={
    "max_pool_int8": (dict(x_ptr="*u8", out_ptr="*u8"),
                      dict(KH=3, KW=3, LOWEST=0, BLOCK_M=32, BLOCK_C=64))})
_gap = Kernel(_global_avg_pool_kernel, _gap_configs, ["C", "HW"], {"BLOCK_HW": 16, "BLOCK_C": 32},
              do_not_specialize=["zp"], compile_cases={
    "global_avg_pool_int8": (dict(x_ptr="*u8", out_ptr="*u8", zp="i32"),
                             dict(BLOCK_HW=16, BLOCK_C=64))})


# -- launchers --------------------------------------------------------------------------------
def pool_output_size(size: int, k: int, stride: int, pad: int, dil: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (with ceil_mode, the last window must start inside the
    input or its left padding)."""
    span = size + 2 * pad - dil * (k - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def max_pool2d_int8(q: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                    ceil_mode: bool = False, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``max_pool2d`` of 4-D codes (any strides; channels-last reads coalesced), channels-last
    output of the same dtype. ``stride`` defaults to ``kernel_size``; PyTorch's constraints
    (padding at most half the kernel) are checked."""
    name = "max_pool2d_int8"
    check_codes(name, q, "q")
    if q.dim() != 4:
        raise ValueError(f"{name}: q must be 4-D [B, C, H, W], got shape {tuple(q.shape)}")
    KH, KW = as_pair(kernel_size, f"{name}: kernel_size")
    sh, sw = (KH, KW) if stride is None or stride == [] else as_pair(stride, f"{name}: stride")
    ph, pw = as_pair(padding, f"{name}: padding")
    dh, dw = as_pair(dilation, f"{name}: dilation")
    if min(KH, KW, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{name}: need kernel_size, stride, dilation >= 1 and padding >= 0, got "
                         f"kernel {KH, KW}, stride {sh, sw}, padding {ph, pw}, dilation {dh, dw}")
    if ph > KH // 2 or pw > KW // 2:
        raise ValueError(f"{name}: padding {ph, pw} must be at most half the kernel {KH, KW}")
    check_device(name, {"q": q, "out": out})
    B, C, H, W = q.shape
    OH = pool_output_size(H, KH, sh, ph, dh, bool(ceil_mode))
    OW = pool_output_size(W, KW, sw, pw, dw, bool(ceil_mode))
    if OH < 1 or OW < 1:
        raise ValueError(f"{name}: the output would be empty ({OH}x{OW}) for input {H}x{W}")
    shape = (B, C, OH, OW)
    check_numel(name, q.numel(), B * C * OH * OW)
    res = torch.empty(shape, dtype=q.dtype, device=q.device, memory_format=torch.channels_last)
    out = check_out(name, out, shape, q.dtype, res.stride()) if out is not None else res
    M = B * OH * OW
    if M and C:
        sxb, sxc, sxh, sxw = q.stride()
        _max_pool[lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(C, META["BLOCK_C"]))](
            q, out, M, C, H, W, OH, OW, sh, sw, ph, pw, dh, dw, sxb, sxc, sxh, sxw,
            KH=KH, KW=KW, LOWEST=code_range(q.dtype)[0])
    return out


def global_avg_pool2d_int8(q: torch.Tensor, scale, zp, qmin: int | None = None,
                           qmax: int | None = None, *, y_scale=None, y_zp=None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """``adaptive_avg_pool2d(q, 1)`` of the codes on the grid ``scale``/``zp``, requantized
    onto the grid ``y_scale``/``y_zp`` (default: the same grid in and out), clamped to
    ``[qmin, qmax]``, as ``fxopt.adaptive_avg_pool2d_int8``; any input strides (channels-last
    reads coalesced), output ``[B, C, 1, 1]`` channels-last."""
    name = "global_avg_pool2d_int8"
    check_codes(name, q, "q")
    if q.dim() != 4:
        raise ValueError(f"{name}: q must be 4-D [B, C, H, W], got shape {tuple(q.shape)}")
    check_device(name, {"q": q, "out": out})
    s, z, lo, hi = check_grid(name, q.dtype, scale, zp, qmin, qmax, "")
    ys, yz = (s, z) if y_scale is None else \
        check_grid(name, q.dtype, y_scale, z if y_zp is None else y_zp, lo, hi)[:2]
    B, C, H, W = q.shape
    if H * W == 0:
        raise ValueError(f"{name}: cannot average an empty {H}x{W} plane")
    if H * W * 255 >= 2 ** 31:
        raise ValueError(f"{name}: planes of {H * W} pixels would overflow the int32 sum")
    check_numel(name, q.numel())
    res = torch.empty((B, C, 1, 1), dtype=q.dtype, device=q.device,
                      memory_format=torch.channels_last)
    out = check_out(name, out, res.shape, q.dtype, res.stride()) if out is not None else res
    if B and C:
        sxb, sxc, sxh, sxw = q.stride()
        _gap[lambda META: (B, triton.cdiv(C, META["BLOCK_C"]))](
            q, out, C, H * W, W, sxb, sxc, sxh, sxw, z, s, float(H * W),
            float_reciprocal(ys), float(yz), float(lo), float(hi))
    return out


# -- references: plain PyTorch ----------------------------------------------------------------
def max_pool2d_int8_reference(q, kernel_size, stride=None, padding=0, dilation=1,
                              ceil_mode=False) -> torch.Tensor:
    """Max pooling on float32 copies of the codes (exact), back to codes, channels-last."""
    y = torch.nn.functional.max_pool2d(q.float(), kernel_size, stride, padding, dilation,
                                       ceil_mode)
    return y.to(q.dtype).contiguous(memory_format=torch.channels_last)


def global_avg_pool2d_int8_reference(q, scale, zp, qmin=None, qmax=None) -> torch.Tensor:
    """The kernel's math in PyTorch: exact integer sum, ``sum * scale / (H*W)`` in float32,
    requantized onto the same grid."""
    lo, hi = code_range(q.dtype)
    total = (q.to(torch.int64) - int(zp)).sum((2, 3), keepdim=True).float()
    y = (total * torch.tensor(float(scale), dtype=torch.float32)) / float(q.shape[2] * q.shape[3])
    out = quantize_reference(y, float(scale), int(zp), lo if qmin is None else qmin,
                             hi if qmax is None else qmax, q.dtype)
    return out.contiguous(memory_format=torch.channels_last)
