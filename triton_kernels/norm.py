"""Normalization kernels: the residual add and LayerNorm of a transformer block, one pass.

- ``add_layer_norm``: ``s = x + r`` and ``y = layer_norm(s)`` over the last ``N`` elements of
  each row (``N`` = the product of ``normalized_shape``), both written. In a pre-norm block
  (ViT, Swin, BERT's post-norm too) the sum is the next residual and the normalized value feeds
  the attention or the MLP; PyTorch runs an add (read x, r; write s) and a LayerNorm (read s;
  write y): 5 passes over the row's memory. Here one program per row reads x and r once, writes
  s and y: 4 passes, and one launch instead of two.

The math is PyTorch's in the input dtype: the sum in float32 rounded once to the dtype (the
``s`` PyTorch writes), the LayerNorm of that rounded sum in float32 (mean, then the biased
variance of ``s - mean``, ``rsqrt(var + eps)``), the affine ``* weight + bias`` (either may be
absent), rounded once to the dtype. fp16/bf16/fp32; ``weight``/``bias`` of the input dtype or
float32. The row is one block (``BLOCK`` = the next power of two of ``N``, masked tail), so
``N`` is at most ``MAX_N`` (16384: every transformer width; wider rows stay on PyTorch).

    s, y = add_layer_norm(x, r, weight, bias, eps=1e-6)        # x, r [..., N], one dtype
    s, y = add_layer_norm_reference(x, r, weight, bias, eps=1e-6)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxopt.triton_kernels._runtime import FLOAT_DTYPES, Kernel, as_float, check_device

__all__ = ["add_layer_norm", "add_layer_norm_reference", "MAX_N"]

MAX_N = 16384


@triton.jit
def _add_layer_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, s_ptr, y_ptr, N, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    # one program per row: s = x + r (rounded to the dtype), y = layer_norm(s) * w + b
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    base = row * N
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    s_q = (x + r).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + base + cols, s_q, mask=mask)
    s = s_q.to(tl.float32)
    mean = tl.sum(s, axis=0) / N
    d = tl.where(mask, s - mean, 0.0)
    var = tl.sum(d * d, axis=0) / N
    y = d * (1.0 / tl.sqrt(var + eps))
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _configs():
    return [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]


_add_layer_norm = Kernel(_add_layer_norm_kernel, _configs, ["N"], {}, compile_cases={
    "add_layer_norm_bf16": (dict(x_ptr="*bf16", r_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16",
                                 s_ptr="*bf16", y_ptr="*bf16", eps="fp32"),
                            dict(HAS_W=True, HAS_B=True, BLOCK=1024)),
    "add_layer_norm_fp32": (dict(x_ptr="*fp32", r_ptr="*fp32", s_ptr="*fp32", y_ptr="*fp32",
                                 eps="fp32"),
                            dict(HAS_W=False, HAS_B=False, BLOCK=256))})


# -- launcher ---------------------------------------------------------------------------------
def _check_affine(name, what, t, n, dtype):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != n or t.dtype not in (dtype, torch.float32):
        got = f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
        raise ValueError(f"{name}: {what} must be a {dtype} or float32 tensor of {n} elements "
                         f"(the normalized size), got {got}")
    return t.reshape(-1).contiguous()


def add_layer_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, *, eps: float = 1e-5,
                   n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + r, layer_norm(x + r))`` over the last ``n`` elements of each row (default the last
    dim's size; ``weight``/``bias`` have ``n`` elements). ``x`` and ``r`` have one float dtype
    and shapes that broadcast (a broadcast operand is expanded, a strided one copied); both
    outputs are contiguous, of the broadcast shape and the dtype."""
    name = "add_layer_norm"
    for what, t in (("x", x), ("r", r)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {what} must be a float16, bfloat16 or float32 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if x.dtype != r.dtype:
        raise TypeError(f"{name}: x and r must have one dtype, got {x.dtype} and {r.dtype}")
    try:
        shape = torch.broadcast_shapes(x.shape, r.shape)
    except RuntimeError:
        raise ValueError(f"{name}: x and r do not broadcast: {tuple(x.shape)}, "
                         f"{tuple(r.shape)}") from None
    n = (shape[-1] if len(shape) else 1) if n is None else int(n)
    numel = 1
    for d in shape:
        numel *= d
    if n < 1 or n > MAX_N or numel % n:
        raise ValueError(f"{name}: the normalized size must divide the elements and be in "
                         f"1..{MAX_N}, got {n} for shape {tuple(shape)}")
    weight = _check_affine(name, "weight", weight, n, x.dtype)
    bias = _check_affine(name, "bias", bias, n, x.dtype)
    check_device(name, {"x": x, "r": r, "weight": weight, "bias": bias})
    if numel >= 2 ** 31:
        raise ValueError(f"{name}: 2**31 or more elements are not supported; split the batch")
    x = x.expand(shape).contiguous()
    r = r.expand(shape).contiguous()
    s, y = torch.empty_like(x), torch.empty_like(x)
    rows = numel // n
    if rows:
        _add_layer_norm[(rows,)](x, r, weight if weight is not None else x,
                                 bias if bias is not None else x, s, y, n,
                                 as_float(eps, f"{name}: eps"), HAS_W=weight is not None,
                                 HAS_B=bias is not None, BLOCK=triton.next_power_of_2(n))
    return s, y


# -- reference: plain PyTorch -----------------------------------------------------------------
def add_layer_norm_reference(x, r, weight=None, bias=None, *, eps=1e-5, n=None):
    """The kernel's math: the sum rounded to the dtype, then LayerNorm in float32 (float64 inputs:
    float64, the test reference), rounded to the dtype."""
    s = x + r
    n = s.shape[-1] if n is None else int(n)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    rows = s.to(acc).reshape(-1, n)
    mean = rows.mean(dim=1, keepdim=True)
    d = rows - mean
    y = d * torch.rsqrt((d * d).mean(dim=1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.reshape(-1).to(acc)
    if bias is not None:
        y = y + bias.reshape(-1).to(acc)
    return s, y.reshape(s.shape).to(s.dtype)
