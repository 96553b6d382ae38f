"""Elementwise kernels: the float residual add and gate multiply, and the residual add on int8
codes (the int8 pools are ``pool``).

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

    y = add(x_nhwc, r_nhwc, act="relu")                                   # float, a's layout
    y = mul(x_nhwc, gate)                                  # gate [N, C, 1, 1] broadcast over H, W
    y = add_int8(a, 0.05, 128, b, 0.04, 120, 0.06, 0, act="relu")           # uint8 codes
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxopt.triton_kernels._runtime import (CODE_DTYPES, FLOAT_DTYPES, Kernel, as_int,
                                           check_codes, check_device, check_grid, check_numel,
                                           check_out, code_range, float_reciprocal, same_layout)
from fxopt.triton_kernels.epilogue import (ACTIVATIONS, act_code, activation_reference,
                                           apply_act, quantize_reference, requantize)

__all__ = ["add", "mul", "add_int8", "add_reference", "mul_reference", "add_int8_reference"]

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


def _add_configs():
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(1024, 4), (2048, 4), (4096, 8),
                                                                  (8192, 8)]]


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
# -- checks -----------------------------------------------------------------------------------
def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the storage is exactly ``numel`` elements in some dim order."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _out_dtype(name, out_dtype, y_qmin):
    if out_dtype is None:
        return torch.int8 if y_qmin is not None and as_int(y_qmin, f"{name}: y_qmin") < 0 \
            else torch.uint8
    if out_dtype not in CODE_DTYPES:
        raise TypeError(f"{name}: out_dtype must be torch.uint8 or torch.int8, got {out_dtype}")
    return out_dtype


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
    check_numel(name, a.numel())
    out = check_out(name, out, a.shape, a.dtype, a.stride())
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
    check_codes(name, a, "a")
    check_codes(name, b, "b")
    if a.shape != b.shape:
        raise ValueError(f"{name}: a and b must have the same shape (no broadcasting), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not same_layout(a.shape, a.stride(), b.stride()) or not _is_dense(a):
        raise ValueError(f"{name}: a and b must be dense with the same strides (got "
                         f"{a.stride()} and {b.stride()}); pass b.contiguous(memory_format=...) "
                         "in a's layout")
    check_device(name, {"a": a, "b": b, "out": out})
    sa, za, _, _ = check_grid(name, a.dtype, a_scale, a_zp, None, None, "a")
    sb, zb, _, _ = check_grid(name, b.dtype, b_scale, b_zp, None, None, "b")
    dtype = _out_dtype(name, out_dtype, y_qmin)
    sy, zy, qmin, qmax = check_grid(name, dtype, y_scale, y_zp, y_qmin, y_qmax)
    code, a0, a1 = act_code(act, act_args)
    check_numel(name, a.numel())
    out = check_out(name, out, a.shape, dtype, a.stride())
    if out is None:
        out = torch.empty_like(a, dtype=dtype)  # dense input: keeps its strides
    n = a.numel()
    if n:
        _add[lambda META: (triton.cdiv(n, META["BLOCK"]),)](
            a, b, out, n, sa, za, sb, zb, a0, a1, float_reciprocal(sy), float(zy), float(qmin),
            float(qmax), ACT=code)
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
