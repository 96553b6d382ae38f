"""Quantize (float -> uint8/int8 codes) and dequantize (codes -> float32), per tensor.

Where a quantized region starts and ends. The arithmetic is PyTorch's:

    q = clamp(round_half_even(x.float() * (1/scale)) + zp, qmin, qmax)     # quantize
    x = (q - zp) * scale                                                     # dequantize, float32

``1/scale`` is the float32 reciprocal (``torch.reciprocal``), as in ``fxopt``'s reference.
Elementwise over the tensor's storage: any dense layout (contiguous or channels_last) is kept.

    q = quantize(x_nhwc, 0.05, 128, torch.uint8)
    x2 = dequantize(q, 0.05, 128)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxopt.triton_kernels._runtime import (CODE_DTYPES, FLOAT_DTYPES, Kernel, as_float, as_int,
                                           check_device, code_range, float_reciprocal)
from fxopt.triton_kernels.epilogue import quantize_reference, requantize

__all__ = ["quantize", "dequantize", "quantize_reference", "dequantize_reference"]


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, n, inv_scale, zp, qmin, qmax, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = requantize(x, inv_scale, zp, qmin, qmax)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(q_ptr, x_ptr, n, scale, zp, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    x = (q - zp).to(tl.float32) * scale
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)


def _configs():
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(1024, 4), (2048, 8), (4096, 8)]]


_quantize = Kernel(_quantize_kernel, _configs, ["n"], {"BLOCK": 256}, compile_cases={
    "quantize": (dict(x_ptr="*bf16", q_ptr="*i8"), dict(BLOCK=1024))})
_dequantize = Kernel(_dequantize_kernel, _configs, ["n"], {"BLOCK": 256}, compile_cases={
    "dequantize": (dict(q_ptr="*u8", x_ptr="*fp32"), dict(BLOCK=1024))})


def _dense(name, t, what):
    """Is ``t`` non-overlapping and dense (so its storage can be walked flat)?"""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return
    raise ValueError(f"{name}: {what} must be contiguous or channels-last (dense); pass "
                     f"{what}.contiguous()")


def _check_out(name, out, like, dtype):
    if out is None:
        return torch.empty_like(like, dtype=dtype)
    if (not isinstance(out, torch.Tensor) or out.shape != like.shape or out.dtype != dtype
            or out.stride() != like.stride() or out.device != like.device):
        raise ValueError(f"{name}: out must be a {dtype} tensor with the input's shape "
                         f"{tuple(like.shape)} and strides {like.stride()}")
    return out


def quantize(x: torch.Tensor, scale, zero_point, dtype: torch.dtype = torch.uint8, *,
             qmin: int | None = None, qmax: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of float ``x`` (fp16/bf16/fp32) on the grid ``scale``/``zero_point``, clamped to
    ``[qmin, qmax]`` (default: the dtype's range), same shape and memory layout as ``x``."""
    name = "quantize"
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: x must be a float16/bfloat16/float32 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if dtype not in CODE_DTYPES:
        raise TypeError(f"{name}: dtype must be torch.uint8 or torch.int8, got {dtype}")
    _dense(name, x, "x")
    check_device(name, {"x": x, "out": out})
    s = as_float(scale, f"{name}: scale")
    if not s > 0:
        raise ValueError(f"{name}: scale must be positive, got {s}")
    zp = as_int(zero_point, f"{name}: zero_point")
    lo, hi = code_range(dtype)
    qmin = lo if qmin is None else qmin
    qmax = hi if qmax is None else qmax
    if not lo <= qmin <= qmax <= hi:
        raise ValueError(f"{name}: need {lo} <= qmin <= qmax <= {hi} for {dtype}, got {qmin}, "
                         f"{qmax}")
    out = _check_out(name, out, x, dtype)
    n = x.numel()
    if n:
        _quantize[lambda META: (triton.cdiv(n, META["BLOCK"]),)](
            x_ptr=x, q_ptr=out, n=n, inv_scale=float_reciprocal(s), zp=float(zp),
            qmin=float(qmin), qmax=float(qmax))
    return out


def dequantize(q: torch.Tensor, scale, zero_point, *, out_dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32 (stored as ``out_dtype``), same layout as ``q``."""
    name = "dequantize"
    if not isinstance(q, torch.Tensor) or q.dtype not in CODE_DTYPES:
        raise TypeError(f"{name}: q must be a uint8 or int8 tensor of codes, got "
                        f"{getattr(q, 'dtype', type(q).__name__)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: out_dtype must be float16/bfloat16/float32, got {out_dtype}")
    _dense(name, q, "q")
    check_device(name, {"q": q, "out": out})
    s = as_float(scale, f"{name}: scale")
    zp = as_int(zero_point, f"{name}: zero_point")
    out = _check_out(name, out, q, out_dtype)
    n = q.numel()
    if n:
        _dequantize[lambda META: (triton.cdiv(n, META["BLOCK"]),)](
            q_ptr=q, x_ptr=out, n=n, scale=s, zp=zp)
    return out


def dequantize_reference(q: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """PyTorch's dequantization: ``(q - zp).float() * scale`` (float32 scale)."""
    scale32 = torch.tensor(float(scale), dtype=torch.float32, device=q.device)
    return (q.to(torch.int32) - int(zero_point)).float() * scale32
