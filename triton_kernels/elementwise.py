"""Elementwise and pooling kernels: the float residual add and gate multiply; on int8 codes, the
residual add, max and global average pooling.

What sits between the convolutions of a residual CNN (one pass over memory each, no int64
temporaries; the int8 ones keep codes on the GPU, never float tensors):

- ``add``: ``act(a + b)`` of two fp16/bf16/fp32 tensors of one dtype, summed in float32 and
  rounded once to that dtype (so ``none``/``relu`` equal PyTorch's ``a + b`` bit for bit).
  Flat over ``a``'s storage: ``a`` dense (contiguous, channels-last, any dense permutation), the
  output with its strides; ``b`` broadcasts to ``a``'s shape with any strides (read in place,
  no copy: its strides are collapsed onto ``a``'s memory order, up to 4 dimensions).
- ``mul``: ``act(a * b)``, the same kernel, layouts and broadcasting as ``add`` (one constexpr
  ``OP`` picks the arithmetic): the squeeze-excitation gate ``x * gate`` (gate ``[N, C, 1, 1]``
  read in place), or a product of two tensors of one shape. The float32 product of two
  fp16/bf16 values is exact, so rounded once it equals PyTorch's ``a * b`` bit for bit too.
- ``add_int8``: ``act((a - a_zp) * a_scale + (b - b_zp) * b_scale)`` requantized onto the
  ``y`` grid, the arithmetic of ``fxopt.add_int8`` (float32 products and sum, activation,
  ``clamp(rint(y * (1/y_scale)) + y_zp, y_qmin, y_qmax)`` with the float32 reciprocal and round
  half to even). Flat over the storage: ``a`` and ``b`` need the same shape and the same dense
  strides (contiguous, channels-last, any dense permutation); the output has them too.
- ``max_pool2d_int8``: a direct kernel, blocks of output pixels x channels (channels contiguous
  in NHWC), kernel/stride/padding/dilation, ``ceil_mode``; padded and out-of-range taps are
  ignored (PyTorch's -inf padding). Codes keep their grid (max of codes = code of the max).
  Any input strides are read (NHWC is the fast one); the output is channels-last.
- ``global_avg_pool2d_int8``: ``adaptive_avg_pool2d`` to 1x1 on the same grid: exact int32 sum
  of ``q - zp`` per (image, channel), then ``sum * scale / (H*W)`` in float32, requantized.
  PyTorch sums the float values instead, so a code can differ by one where the mean sits
  within float32 rounding of a half-way point.

    y = add(x_nhwc, r_nhwc, act="relu")                                   # float, a's layout
    y = mul(x_nhwc, gate)                                  # gate [N, C, 1, 1] broadcast over H, W
    y = add_int8(a, 0.05, 128, b, 0.04, 120, 0.06, 0, act="relu")           # uint8 codes
    p = max_pool2d_int8(q_nhwc, 3, stride=2, padding=1)
    g = global_avg_pool2d_int8(q_nhwc, 0.06, 0, qmin=0, qmax=255)          # [B, C, 1, 1]
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fxopt.triton_kernels._runtime import (CODE_DTYPES, FLOAT_DTYPES, Kernel, as_float, as_int,
                                           as_pair, check_device, code_range, float_reciprocal)
from fxopt.triton_kernels.epilogue import (ACTIVATIONS, act_code, activation_reference,
                                           apply_act, quantize_reference, requantize)

__all__ = ["add", "mul", "add_int8", "max_pool2d_int8", "global_avg_pool2d_int8", "add_reference",
           "mul_reference", "add_int8_reference", "max_pool2d_int8_reference",
           "global_avg_pool2d_int8_reference", "pool_output_size"]

# -- kernels ----------------------------------------------------------------------------------
# The float binary ops: the OP constexpr of _float_binary_kernel (one kernel, the op compiled in)
_FLOAT_OPS = {"add": 0, "mul": 1}


@triton.jit
def _float_binary_kernel(a_ptr, b_ptr, out_ptr, n, D1, D2, D3, sb0, sb1, sb2, sb3, act_a0,
                         act_a1, B_FLAT: tl.constexpr, OP: tl.constexpr, ACT: tl.constexpr,
                         BLOCK: tl.constexpr):
    # act(a OP b), OP a code of _FLOAT_OPS. offs: the offset in a's (and out's) storage. b: the
    # same offsets when it has a's layout (B_FLAT), else the index in a's memory order
    # [D0, D1, D2, D3] through b's strides
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if B_FLAT:
        b_offs = offs
    else:
        i3 = offs % D3
        t = offs // D3
        i2 = t % D2
        t = t // D2
        b_offs = (t // D1) * sb0 + (t % D1) * sb1 + i2 * sb2 + i3 * sb3
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + b_offs, mask=mask, other=0.0).to(tl.float32)
    if OP == 1:  # mul
        y = a * b
    else:  # add
        y = a + b
    y = apply_act(y, ACT, act_a0, act_a1)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_int8_kernel(a_ptr, b_ptr, out_ptr, n, a_scale, a_zp, b_scale, b_zp,
                     act_a0, act_a1, y_inv_scale, y_zp, y_qmin, y_qmax,
                     ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0).to(tl.int32)
    b = tl.load(b_ptr + offs, mask=mask, other=0).to(tl.int32)
    va = (a - a_zp).to(tl.float32) * a_scale
    vb = (b - b_zp).to(tl.float32) * b_scale
    # PyTorch rounds each product to float32 before the add: the clamps keep the compiler from
    # contracting a product and the sum into one FMA (they change no finite value)
    va = tl.minimum(tl.maximum(va, -3.0e38), 3.0e38)
    vb = tl.minimum(tl.maximum(vb, -3.0e38), 3.0e38)
    y = apply_act(va + vb, ACT, act_a0, act_a1)
    q = requantize(y, y_inv_scale, y_zp, y_qmin, y_qmax)
    tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=mask)


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


def _add_configs():
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(1024, 4), (2048, 4), (4096, 8),
                                                                  (8192, 8)]]


def _pool_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w)
            for bm, bc, w in [(32, 64, 4), (64, 64, 4), (16, 128, 4), (64, 128, 8), (128, 32, 4),
                              (8, 256, 4)]]


def _gap_configs():
    return [triton.Config({"BLOCK_HW": bh, "BLOCK_C": bc}, num_warps=w)
            for bh, bc, w in [(8, 128, 4), (16, 64, 4), (4, 256, 4), (32, 128, 8), (16, 256, 8)]]


_float_binary = Kernel(_float_binary_kernel, _add_configs, ["n"], {"BLOCK": 256}, compile_cases={
    "add_bf16": (dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16"),
                 dict(B_FLAT=False, OP=_FLOAT_OPS["add"], ACT=ACTIVATIONS["silu"].code,
                      BLOCK=1024)),
    "mul_fp16": (dict(a_ptr="*fp16", b_ptr="*fp16", out_ptr="*fp16"),  # the SE gate
                 dict(B_FLAT=False, OP=_FLOAT_OPS["mul"], ACT=ACTIVATIONS["none"].code,
                      BLOCK=1024))})
_add = Kernel(_add_int8_kernel, _add_configs, ["n"], {"BLOCK": 256},
              do_not_specialize=["a_zp", "b_zp"], compile_cases={
    "add_int8": (dict(a_ptr="*u8", b_ptr="*u8", out_ptr="*u8", a_zp="i32", b_zp="i32"),
                 dict(ACT=1, BLOCK=1024))})
_max_pool = Kernel(_max_pool_kernel, _pool_configs, ["M", "C", "H", "W"],
                   {"BLOCK_M": 16, "BLOCK_C": 32}, compile_cases={
    "max_pool_int8": (dict(x_ptr="*u8", out_ptr="*u8"),
                      dict(KH=3, KW=3, LOWEST=0, BLOCK_M=32, BLOCK_C=64))})
_gap = Kernel(_global_avg_pool_kernel, _gap_configs, ["C", "HW"], {"BLOCK_HW": 16, "BLOCK_C": 32},
              do_not_specialize=["zp"], compile_cases={
    "global_avg_pool_int8": (dict(x_ptr="*u8", out_ptr="*u8", zp="i32"),
                             dict(BLOCK_HW=16, BLOCK_C=64))})


# -- checks -----------------------------------------------------------------------------------
def _check_codes(name, t, what):
    if not isinstance(t, torch.Tensor) or t.dtype not in CODE_DTYPES:
        raise TypeError(f"{name}: {what} must be a uint8 or int8 tensor of codes, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the storage is exactly ``numel`` elements in some dim order."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(shape, s1, s2) -> bool:
    """Same memory layout: equal strides on every dim of size > 1 (size-1 dims' strides do not
    matter and PyTorch leaves them ambiguous, e.g. channels-last [B, C, 1, 1])."""
    return all(n == 1 or x == y for n, x, y in zip(shape, s1, s2))


def _out_dtype(name, out_dtype, y_qmin):
    if out_dtype is None:
        return torch.int8 if y_qmin is not None and as_int(y_qmin, f"{name}: y_qmin") < 0 \
            else torch.uint8
    if out_dtype not in CODE_DTYPES:
        raise TypeError(f"{name}: out_dtype must be torch.uint8 or torch.int8, got {out_dtype}")
    return out_dtype


def _grid_args(name, dtype, y_scale, y_zp, y_qmin, y_qmax, what="y"):
    s = as_float(y_scale, f"{name}: {what}_scale")
    if not s > 0 or not math.isfinite(s):
        raise ValueError(f"{name}: {what}_scale must be positive and finite, got {s}")
    zp = as_int(y_zp, f"{name}: {what}_zp")
    lo, hi = code_range(dtype)
    qmin = lo if y_qmin is None else as_int(y_qmin, f"{name}: {what}_qmin")
    qmax = hi if y_qmax is None else as_int(y_qmax, f"{name}: {what}_qmax")
    if not lo <= qmin <= qmax <= hi:
        raise ValueError(f"{name}: need {lo} <= {what}_qmin <= {what}_qmax <= {hi} for {dtype}, "
                         f"got {qmin}, {qmax}")
    return s, zp, qmin, qmax


def _check_out(name, out, shape, dtype, strides):
    if out is None:
        return None
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape)
            or out.dtype != dtype or not _same_layout(shape, out.stride(), strides)):
        raise ValueError(f"{name}: out must be a {dtype} tensor of shape {tuple(shape)} with "
                         f"strides {tuple(strides)}")
    return out


def _small(name, *numels):
    if max(numels) >= 2 ** 31:
        raise ValueError(f"{name}: tensors with 2**31 or more elements are not supported "
                         "(int32 offsets); split the batch")


# -- launchers --------------------------------------------------------------------------------
def _b_index(a: torch.Tensor, b: torch.Tensor):
    """How the kernel reads ``b`` (broadcast to ``a``'s shape) at each offset of ``a``'s dense
    storage: ``(b, flat, [D1, D2, D3], [s0, s1, s2, s3])``. ``a``'s dims in its memory order,
    size-1 dims dropped, neighbours merged where ``b``'s strides allow; ``flat`` when ``b`` is
    laid out as ``a`` (same offsets). More than 4 dims left (rare): ``b`` copied to a's layout."""
    bb = b.expand(a.shape)
    dims = sorted((d for d in range(a.dim()) if a.shape[d] != 1), key=lambda d: -a.stride(d))
    sizes, strides = [a.shape[d] for d in dims], [bb.stride(d) for d in dims]
    i = len(sizes) - 1
    while i > 0:  # merge dim i into dim i-1 when b steps through both as one
        if strides[i - 1] == strides[i] * sizes[i]:
            sizes[i - 1] *= sizes.pop(i)
            strides.pop(i - 1)
        i -= 1
    if len(sizes) > 4:
        bb, sizes, strides = torch.empty_like(a).copy_(bb), [a.numel()], [1]
    if len(sizes) <= 1 and strides in ([], [1]):
        return bb, True, [1, 1, 1], [0, 0, 0, 0]
    sizes, strides = [1] * (4 - len(sizes)) + sizes, [0] * (4 - len(strides)) + strides
    return bb, False, sizes[1:], strides


def _float_binary_launch(op: str, a: torch.Tensor, b: torch.Tensor, act, act_args,
                         out: torch.Tensor | None) -> torch.Tensor:
    """``act(a op b)`` (``op`` in ``_FLOAT_OPS``): the checks, the output and the launch that
    ``add`` and ``mul`` share; messages name ``op``."""
    name = op
    for what, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {what} must be a float16, bfloat16 or float32 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name}: a and b must have one dtype, got {a.dtype} and {b.dtype} "
                        "(convert one first)")
    try:
        fits = tuple(torch.broadcast_shapes(a.shape, b.shape)) == tuple(a.shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name}: b must broadcast to a's shape (a is not broadcast), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not _is_dense(a):
        raise ValueError(f"{name}: a must be dense (got strides {a.stride()} for shape "
                         f"{tuple(a.shape)}); pass a.contiguous(memory_format=...)")
    check_device(name, {"a": a, "b": b, "out": out})
    code, a0, a1 = act_code(act, act_args)
    _small(name, a.numel())
    out = _check_out(name, out, a.shape, a.dtype, a.stride())
    if out is None:
        out = torch.empty_like(a)  # dense input: keeps its strides
    elif out.numel() and any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                             for t in (a, b)):
        raise ValueError(f"{name}: out must not share memory with a or b (autotuning runs the "
                         "kernel several times)")
    n = a.numel()
    if n:
        b2, flat, (d1, d2, d3), (s0, s1, s2, s3) = _b_index(a, b)
        _float_binary[lambda META: (triton.cdiv(n, META["BLOCK"]),)](
            a, b2, out, n, d1, d2, d3, s0, s1, s2, s3, a0, a1, B_FLAT=flat, OP=_FLOAT_OPS[op],
            ACT=code)
    return out


def add(a: torch.Tensor, b: torch.Tensor, *, act: str = "none", act_args=(),
        out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(a + b)`` for fp16/bf16/fp32 tensors of one dtype, in ``a``'s layout. ``a`` must be
    dense (contiguous, channels-last, any dense permutation); ``b`` broadcasts to ``a``'s shape,
    any strides. The sum is float32, rounded once to the dtype; ``act`` is any of
    ``ACTIVATIONS``. ``out`` (optional) has ``a``'s shape, dtype and strides, and is neither
    input."""
    return _float_binary_launch("add", a, b, act, act_args, out)


def mul(a: torch.Tensor, b: torch.Tensor, *, act: str = "none", act_args=(),
        out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(a * b)``, as ``add`` (same dtypes, layouts, broadcasting, ``out``): the
    squeeze-excitation gate ``mul(x, gate)`` with ``gate`` ``[N, C, 1, 1]`` read in place. The
    product is float32, rounded once to the dtype."""
    return _float_binary_launch("mul", a, b, act, act_args, out)


def add_int8(a: torch.Tensor, a_scale, a_zp, b: torch.Tensor, b_scale, b_zp, y_scale, y_zp, *,
             act: str = "none", act_args=(), y_qmin: int | None = None,
             y_qmax: int | None = None, out_dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of ``act(a + b)`` on the ``y`` grid; ``a``, ``b`` uint8/int8 codes of one shape and
    the same dense strides, each on its own grid. ``out_dtype`` defaults to int8 when
    ``y_qmin < 0``, else uint8; ``act`` is any of ``ACTIVATIONS``."""
    name = "add_int8"
    _check_codes(name, a, "a")
    _check_codes(name, b, "b")
    if a.shape != b.shape:
        raise ValueError(f"{name}: a and b must have the same shape (no broadcasting), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not _same_layout(a.shape, a.stride(), b.stride()) or not _is_dense(a):
        raise ValueError(f"{name}: a and b must be dense with the same strides (got "
                         f"{a.stride()} and {b.stride()}); pass b.contiguous(memory_format=...) "
                         "in a's layout")
    check_device(name, {"a": a, "b": b, "out": out})
    sa, za, _, _ = _grid_args(name, a.dtype, a_scale, a_zp, None, None, "a")
    sb, zb, _, _ = _grid_args(name, b.dtype, b_scale, b_zp, None, None, "b")
    dtype = _out_dtype(name, out_dtype, y_qmin)
    sy, zy, qmin, qmax = _grid_args(name, dtype, y_scale, y_zp, y_qmin, y_qmax)
    code, a0, a1 = act_code(act, act_args)
    _small(name, a.numel())
    out = _check_out(name, out, a.shape, dtype, a.stride())
    if out is None:
        out = torch.empty_like(a, dtype=dtype)  # dense input: keeps its strides
    n = a.numel()
    if n:
        _add[lambda META: (triton.cdiv(n, META["BLOCK"]),)](
            a, b, out, n, sa, za, sb, zb, a0, a1, float_reciprocal(sy), float(zy), float(qmin),
            float(qmax), ACT=code)
    return out


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
    _check_codes(name, q, "q")
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
    _small(name, q.numel(), B * C * OH * OW)
    res = torch.empty(shape, dtype=q.dtype, device=q.device, memory_format=torch.channels_last)
    out = _check_out(name, out, shape, q.dtype, res.stride()) if out is not None else res
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
    _check_codes(name, q, "q")
    if q.dim() != 4:
        raise ValueError(f"{name}: q must be 4-D [B, C, H, W], got shape {tuple(q.shape)}")
    check_device(name, {"q": q, "out": out})
    s, z, lo, hi = _grid_args(name, q.dtype, scale, zp, qmin, qmax, "")
    ys, yz = (s, z) if y_scale is None else \
        _grid_args(name, q.dtype, y_scale, z if y_zp is None else y_zp, lo, hi)[:2]
    B, C, H, W = q.shape
    if H * W == 0:
        raise ValueError(f"{name}: cannot average an empty {H}x{W} plane")
    if H * W * 255 >= 2 ** 31:
        raise ValueError(f"{name}: planes of {H * W} pixels would overflow the int32 sum")
    _small(name, q.numel())
    res = torch.empty((B, C, 1, 1), dtype=q.dtype, device=q.device,
                      memory_format=torch.channels_last)
    out = _check_out(name, out, res.shape, q.dtype, res.stride()) if out is not None else res
    if B and C:
        sxb, sxc, sxh, sxw = q.stride()
        _gap[lambda META: (B, triton.cdiv(C, META["BLOCK_C"]))](
            q, out, C, H * W, W, sxb, sxc, sxh, sxw, z, s, float(H * W),
            float_reciprocal(ys), float(yz), float(lo), float(hi))
    return out


# -- references: plain PyTorch ----------------------------------------------------------------
def _float_binary_reference(fn, a, b, act, act_args) -> torch.Tensor:
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return activation_reference(fn(a.to(acc), b.to(acc)), act, act_args).to(a.dtype)


def add_reference(a, b, *, act="none", act_args=()) -> torch.Tensor:
    """The kernel's math: ``a + b`` in float32 (float64 inputs: float64, the test reference),
    the activation, rounded once to ``a``'s dtype."""
    return _float_binary_reference(torch.add, a, b, act, act_args)


def mul_reference(a, b, *, act="none", act_args=()) -> torch.Tensor:
    """The kernel's math: ``a * b`` in float32 (float64 inputs: float64), the activation,
    rounded once to ``a``'s dtype."""
    return _float_binary_reference(torch.mul, a, b, act, act_args)


def _values(q, scale, zp):
    return (q.to(torch.int32) - int(zp)).float() * torch.tensor(float(scale), dtype=torch.float32,
                                                                device=q.device)


def add_int8_reference(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, act="none",
                       act_args=(), y_qmin=None, y_qmax=None, out_dtype=None) -> torch.Tensor:
    """PyTorch's quantized add: float32 values summed, activation, requantized."""
    dtype = _out_dtype("add_int8_reference", out_dtype, y_qmin)
    lo, hi = code_range(dtype)
    y = activation_reference(_values(a, a_scale, a_zp) + _values(b, b_scale, b_zp), act,
                             act_args)
    return quantize_reference(y, float(y_scale), int(y_zp), lo if y_qmin is None else y_qmin,
                              hi if y_qmax is None else y_qmax, dtype)


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
