"""The fused epilogue every GEMM/conv kernel shares, and its PyTorch reference.

Order (the same as ``fxopt``'s fused ops)::

    y = acc * scale[n]            # int8 paths: scale = a_scale * w_scale[n] (float32); float: none
    y = y + bias[n]               # optional
    y = y + residual[m, n]        # optional, float
    y = act(y, arg0, arg1)        # ACTIVATIONS below
    out = y                       # float output (fp16/bf16/fp32), or requantized codes:
    out = clamp(rint(y * inv_y_scale) + y_zp, qmin, qmax)   # uint8 / int8

``inv_y_scale`` is ``torch.reciprocal(y_scale)`` in float32 and ``rint`` rounds half to even,
as ``torch.round`` does, so the codes match PyTorch's quantization.

Example (reference side)::

    y = epilogue_reference(acc, scale, bias, residual, "leaky_relu", (0.1,), torch.float32)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import triton.language as tl

from fxopt.triton_kernels._runtime import (CODE_DTYPES, FLOAT_DTYPES, as_float, as_int, code_range, device_fn, float_reciprocal)

__all__ = ["ACTIVATIONS", "act_code", "epilogue_kwargs", "check_residual", "apply_act",
           "requantize", "store_epilogue",
           "activation_reference", "epilogue_reference", "quantize_reference"]

# name -> (code, number of arguments); argument meaning as in fxopt.ops
ACTIVATIONS: dict[str, tuple[int, int]] = {
    "none": (0, 0), "relu": (1, 0), "relu6": (2, 0), "leaky_relu": (3, 1), "hardtanh": (4, 2),
    "clamp": (5, 2), "elu": (6, 1), "gelu": (7, 0), "gelu_tanh": (8, 0), "silu": (9, 0),
    "mish": (10, 0), "hardswish": (11, 0), "hardsigmoid": (12, 0), "sigmoid": (13, 0),
    "tanh": (14, 0),
}

def act_code(act: str, act_args: Sequence[float] = ()) -> tuple[int, float, float]:
    """(code, arg0, arg1) for the kernels; checks the name and the number of arguments."""
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")
    code, n = ACTIVATIONS[act]
    args = [float(a) for a in act_args]
    if len(args) != n:
        raise ValueError(f"activation '{act}' takes {n} argument(s), got {list(act_args)}")
    if act == "relu6":
        args = [0.0, 6.0]
    args += [0.0] * (2 - len(args))
    return code, args[0], args[1]


def epilogue_kwargs(name: str, *, n: int, out_dtype: torch.dtype, bias, act: str, act_args,
                    y_scale, y_zp, y_qmin, y_qmax, dummy: torch.Tensor) -> dict:
    """Check the epilogue arguments of a launcher and turn them into kernel arguments."""
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES + CODE_DTYPES:
        raise TypeError(f"{name}: out_dtype must be one of float16, bfloat16, float32 (float output) "
                        f"or uint8, int8 (requantized codes), got {out_dtype}")
    quant = out_dtype in CODE_DTYPES
    inv, zp, qmin, qmax = 1.0, 0, 0, 0
    if quant:
        if y_scale is None:
            raise ValueError(f"{name}: out_dtype={out_dtype} (requantized output) needs y_scale")
        s = as_float(y_scale, f"{name}: y_scale")
        if not s > 0:
            raise ValueError(f"{name}: y_scale must be positive, got {s}")
        inv = float_reciprocal(s)
        zp = as_int(y_zp, f"{name}: y_zp")
        lo, hi = code_range(out_dtype)
        qmin = lo if y_qmin is None else as_int(y_qmin, f"{name}: y_qmin")
        qmax = hi if y_qmax is None else as_int(y_qmax, f"{name}: y_qmax")
        if not lo <= qmin <= qmax <= hi:
            raise ValueError(f"{name}: need {lo} <= y_qmin <= y_qmax <= {hi} for {out_dtype}, "
                             f"got {qmin}, {qmax}")
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
        raise TypeError(f"{name}: residual must be a tensor or None, got {type(residual).__name__}")
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
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
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
def activation_reference(y: torch.Tensor, act: str, act_args: Sequence[float] = ()) -> torch.Tensor:
    """The activation as PyTorch computes it (any float dtype; float64 for test references)."""
    a = list(act_args)
    if act == "none":
        return y
    if act == "relu":
        return torch.relu(y)
    if act == "relu6":
        return F.hardtanh(y, 0.0, 6.0)
    if act == "leaky_relu":
        return F.leaky_relu(y, a[0])
    if act == "hardtanh":
        return F.hardtanh(y, a[0], a[1])
    if act == "clamp":
        return y.clamp(None if a[0] == -math.inf else a[0], None if a[1] == math.inf else a[1])
    if act == "elu":
        return F.elu(y, a[0])
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "silu":
        return F.silu(y)
    if act == "mish":
        return F.mish(y)
    if act == "hardswish":
        return F.hardswish(y)
    if act == "hardsigmoid":
        return F.hardsigmoid(y)
    if act == "sigmoid":
        return torch.sigmoid(y)
    if act == "tanh":
        return torch.tanh(y)
    raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")


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
