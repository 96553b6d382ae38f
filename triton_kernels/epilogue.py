"""The fused epilogue every GEMM/conv kernel shares, and its PyTorch reference.

Order (the same as ``fxopt``'s fused ops)::

    y = acc * scale[n]            # int8 paths: scale = a_scale * w_scale[n] (float32); float: none
    y = y + bias[n]               # optional
    y = y + residual[m, n]        # optional, float
    y = act(y, arg0, arg1)        # a row of ACTIVATIONS below
    out = y                       # float output (fp16/bf16/fp32), or requantized codes:
    out = clamp(rint(y * inv_y_scale) + y_zp, qmin, qmax)   # uint8 / int8

``inv_y_scale`` is ``torch.reciprocal(y_scale)`` in float32 and ``rint`` rounds half to even,
as ``torch.round`` does, so the codes match PyTorch's quantization.

The activations are one table, ``ACTIVATIONS``: name -> (``ACT`` code, number of arguments,
PyTorch reference). ``act_code`` turns a name and its arguments into what a kernel takes,
``activation_reference`` runs the reference; the device function ``apply_act`` has one branch
per code (a ``tl.constexpr`` branch: it compiles to the one activation). The names and
arguments are fxopt's (``fxopt.ir.activations``), but this package knows nothing of fxopt, so
it keeps its own table; a test checks that the two agree.

Example (reference side)::

    ACTIVATIONS["leaky_relu"]          # KernelActivation(code=3, arity=1, reference=...)
    act_code("leaky_relu", [0.1])      # (3, 0.1, 0.0): ACT, act_a0, act_a1 of a launch
    y = epilogue_reference(acc, scale, bias, residual, "leaky_relu", (0.1,), torch.float32)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import triton.language as tl

from fxopt.triton_kernels._runtime import (CODE_DTYPES, FLOAT_DTYPES, check_grid, device_fn,
                                           float_reciprocal)

__all__ = ["KernelActivation", "ACTIVATIONS", "COMPILE_EPILOGUE", "COMPILE_FLOAT_EPILOGUE",
           "act_code", "activation_reference",
           "epilogue_kwargs", "check_residual", "grouped_tile", "apply_act", "requantize",
           "store_epilogue", "epilogue_reference", "quantize_reference"]


@dataclass(frozen=True)
class KernelActivation:
    """One activation the kernels fuse (a row of ``ACTIVATIONS``)."""

    code: int  # the ACT constexpr: apply_act's branch for it
    arity: int  # how many act_args it takes (arguments as in fxopt's activation table)
    reference: Callable[[torch.Tensor, Sequence[float]], torch.Tensor]  # (y, act_args) -> y


def _clamp(y: torch.Tensor, a: Sequence[float]) -> torch.Tensor:
    # an infinite bound is an open side: torch.clamp takes None there
    return y.clamp(None if a[0] == -math.inf else a[0], None if a[1] == math.inf else a[1])


ACTIVATIONS: dict[str, KernelActivation] = {
    "none": KernelActivation(0, 0, lambda y, a: y),
    "relu": KernelActivation(1, 0, lambda y, a: torch.relu(y)),
    "relu6": KernelActivation(2, 0, lambda y, a: F.hardtanh(y, 0.0, 6.0)),
    "leaky_relu": KernelActivation(3, 1, lambda y, a: F.leaky_relu(y, a[0])),  # negative_slope
    "hardtanh": KernelActivation(4, 2, lambda y, a: F.hardtanh(y, a[0], a[1])),  # min_val, max_val
    "clamp": KernelActivation(5, 2, _clamp),  # min, max (+-inf: open)
    "elu": KernelActivation(6, 1, lambda y, a: F.elu(y, a[0])),  # alpha
    "gelu": KernelActivation(7, 0, lambda y, a: F.gelu(y)),
    "gelu_tanh": KernelActivation(8, 0, lambda y, a: F.gelu(y, approximate="tanh")),
    "silu": KernelActivation(9, 0, lambda y, a: F.silu(y)),
    "mish": KernelActivation(10, 0, lambda y, a: F.mish(y)),
    "hardswish": KernelActivation(11, 0, lambda y, a: F.hardswish(y)),
    "hardsigmoid": KernelActivation(12, 0, lambda y, a: F.hardsigmoid(y)),
    "sigmoid": KernelActivation(13, 0, lambda y, a: torch.sigmoid(y)),
    "tanh": KernelActivation(14, 0, lambda y, a: torch.tanh(y)),
}


def _row(act: str) -> KernelActivation:
    row = ACTIVATIONS.get(act) if isinstance(act, str) else None
    if row is None:
        raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")
    return row


# Constexprs of two of the longer epilogue branches (int8 in with codes out; float), for the
# kernels' sm_90 compile cases (``Kernel(compile_cases=...)``).
COMPILE_EPILOGUE = dict(HAS_SCALE=True, HAS_BIAS=True, HAS_RES=True,
                        ACT=ACTIVATIONS["gelu_tanh"].code, QUANT_OUT=True)
COMPILE_FLOAT_EPILOGUE = dict(COMPILE_EPILOGUE, HAS_SCALE=False, ACT=ACTIVATIONS["mish"].code,
                              QUANT_OUT=False)


def act_code(act: str, act_args: Sequence[float] = ()) -> tuple[int, float, float]:
    """(code, arg0, arg1) for the kernels; checks the name and the number of arguments."""
    row = _row(act)
    args = [float(a) for a in act_args]
    if len(args) != row.arity:
        raise ValueError(f"activation '{act}' takes {row.arity} argument(s), got "
                         f"{list(act_args)}")
    args += [0.0] * (2 - len(args))  # unused arguments: the kernels take two, always
    return row.code, args[0], args[1]


def activation_reference(y: torch.Tensor, act: str,
                         act_args: Sequence[float] = ()) -> torch.Tensor:
    """The activation as PyTorch computes it (any float dtype; float64 for test references)."""
    return _row(act).reference(y, list(act_args))


def epilogue_kwargs(name: str, *, n: int, out_dtype: torch.dtype, bias, act: str, act_args,
                    y_scale, y_zp, y_qmin, y_qmax, dummy: torch.Tensor) -> dict:
    """Check the epilogue arguments of a launcher and turn them into kernel arguments."""
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES + CODE_DTYPES:
        raise TypeError(f"{name}: out_dtype must be one of float16, bfloat16, float32 (float "
                        f"output) or uint8, int8 (requantized codes), got {out_dtype}")
    quant = out_dtype in CODE_DTYPES
    inv, zp, qmin, qmax = 1.0, 0, 0, 0
    if quant:
        if y_scale is None:
            raise ValueError(f"{name}: out_dtype={out_dtype} (requantized output) needs y_scale")
        s, zp, qmin, qmax = check_grid(name, out_dtype, y_scale, y_zp, y_qmin, y_qmax)
        inv = float_reciprocal(s)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}: bias must be a tensor or None, got {type(bias).__name__}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: bias must be float16/bfloat16/float32, got {bias.dtype}")
        if bias.dim() != 1 or bias.numel() != n:
            raise ValueError(f"{name}: bias must have shape [{n}] (one per output channel), "
                             f"got {tuple(bias.shape)}")
        if bias.stride(0) != 1:
            bias = bias.contiguous()
    code, a0, a1 = act_code(act, act_args)
    return dict(bias_ptr=dummy if bias is None else bias, act_a0=a0, act_a1=a1,
                y_inv_scale=inv, y_zp=float(zp), y_qmin=float(qmin), y_qmax=float(qmax),
                HAS_BIAS=bias is not None, ACT=code, QUANT_OUT=quant)


def check_residual(name: str, residual, shape: tuple) -> None:
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{name}: residual must be a tensor or None, got "
                        f"{type(residual).__name__}")
    if residual.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: residual must be float16/bfloat16/float32, got {residual.dtype}")
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(f"{name}: residual shape {tuple(residual.shape)} does not match the "
                         f"output shape {tuple(shape)}")


@device_fn
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (row tile, column tile) of program ``pid`` in grouped order: ``GROUP_M`` row tiles
    share their column tiles while those are in L2 (Triton's matmul tutorial)."""
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@device_fn
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1), exponent capped (tanh(40) == 1 in float32) so exp never overflows
    return 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * x, 80.0)) + 1.0)


@device_fn
def apply_act(y, ACT: tl.constexpr, a0, a1):
    """``y`` (float32) through activation ``ACT`` (a code of ``ACTIVATIONS``)."""
    # One branch per row of ACTIVATIONS, by its code (0, none: no branch). The branch must be
    # on the constexpr, so the device math cannot sit in the table: a new row needs one here.
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:  # relu6: constant bounds (a0, a1 unused)
        y = tl.minimum(tl.maximum(y, 0.0), 6.0)
    elif ACT == 3:
        y = tl.where(y > 0.0, y, y * a0)
    elif ACT == 4 or ACT == 5:
        y = tl.minimum(tl.maximum(y, a0), a1)
    elif ACT == 6:
        y = tl.where(y > 0.0, y, a0 * (tl.exp(tl.minimum(y, 0.0)) - 1.0))
    elif ACT == 7:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 8:
        y = 0.5 * y * (1.0 + _tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
    elif ACT == 9:
        y = y / (1.0 + tl.exp(tl.minimum(-y, 80.0)))
    elif ACT == 10:
        # mish = y * tanh(softplus(y)) = y * n / (n + 2), n = e^y (e^y + 2); exact form that
        # keeps relative accuracy for negative y; y > 20: tanh(softplus) == 1 in float32
        e = tl.exp(tl.minimum(y, 20.0))
        n = e * (e + 2.0)
        y = tl.where(y > 20.0, y, y * n / (n + 2.0))
    elif ACT == 11:
        y = y * (tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0)
    elif ACT == 12:
        y = tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 13:
        y = 1.0 / (1.0 + tl.exp(tl.minimum(-y, 80.0)))
    elif ACT == 14:
        y = _tanh(y)
    return y


@device_fn
def requantize(y, inv_scale, zp, qmin, qmax):
    """float32 ``y`` -> integer-valued float32 codes: clamp(rint(y * inv_scale) + zp)."""
    v = y * inv_scale
    # the clamp sits between the multiply and the rounding add, so the compiler cannot fuse
    # them into one FMA (PyTorch rounds the product to float32 first); it does not change the
    # result: |codes| stay far below 2**22
    v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
    # 1.5 * 2**23: adding then subtracting it rounds float32 |v| < 2**22 to an integer, ties
    # to even (the hardware rounding mode); portable to the interpreter, unlike libdevice.rint
    v = (v + 12582912.0) - 12582912.0
    v = v + zp
    return tl.minimum(tl.maximum(v, qmin), qmax)


@device_fn
def store_epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on,
                   scale_ptr, bias_ptr, res_ptr, stride_rm, stride_rn,
                   act_a0, act_a1, y_inv_scale, y_zp, y_qmin, y_qmax,
                   HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   ACT: tl.constexpr, QUANT_OUT: tl.constexpr):
    """Apply the epilogue to the float32 tile ``acc`` [BM, BN] and store it (masked)."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    y = acc
    if HAS_SCALE:
        s = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        y = y * s[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = y + b[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                    mask=mask, other=0.0).to(tl.float32)
        y = y + r
    y = apply_act(y, ACT, act_a0, act_a1)
    if QUANT_OUT:
        y = requantize(y, y_inv_scale, y_zp, y_qmin, y_qmax)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# -- the reference: plain PyTorch ---------------------------------------------------------------
def quantize_reference(y: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """PyTorch's arithmetic: round_half_even(y.float() * (1/scale)) + zp, clamped, as codes."""
    inv = torch.reciprocal(torch.tensor(scale, dtype=torch.float32, device=y.device))
    q = torch.round(y.float() * inv) + zp
    return q.clamp_(qmin, qmax).to(dtype)


def epilogue_reference(acc: torch.Tensor, scale, bias, residual, act: str, act_args,
                       out_dtype: torch.dtype, y_scale: float | None = None, y_zp: int = 0,
                       y_qmin: int = 0, y_qmax: int = 255, channel_dim: int = -1) -> torch.Tensor:
    """The epilogue in PyTorch, in ``acc``'s float dtype (float32 mirrors the kernels, float64
    is the test reference); ``channel_dim`` is the output-channel axis of ``acc``."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    y = acc
    if scale is not None:
        y = y * scale.to(acc.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(acc.dtype).reshape(shape)
    if residual is not None:
        y = y + residual.to(acc.dtype)
    y = activation_reference(y, act, act_args)
    if out_dtype in (torch.uint8, torch.int8):
        return quantize_reference(y, y_scale, y_zp, y_qmin, y_qmax, out_dtype)
    return y if acc.dtype == torch.float64 else y.to(out_dtype)
