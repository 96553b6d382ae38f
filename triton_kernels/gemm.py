"""GEMM (``linear``: ``x @ W.T``) with a fused epilogue: int8 x int8 -> int32 accumulation,
and fp16/bf16/fp32 -> fp32 accumulation.

``out[m, n] = epilogue(sum_k A[m, k] * W[n, k])``: W is stored [N, K] with K contiguous (the
layout of ``nn.Linear.weight``, and the K-major operand Hopper's int8 wgmma wants). The
epilogue (``epilogue.py``): scale (int8), bias, residual, activation, then a float output or
requantized uint8/int8 codes.

int8: A holds activation codes (uint8 or int8) on a per-tensor grid (``a_scale``, ``a_zp``);
W is symmetric per output channel (``w_scale[n]``, zero point 0). The kernel accumulates raw
codes exactly in int32 and corrects the zero point afterwards with the weight's column sums:
``acc - a_zp * sum_k W[n, k]``. uint8 codes are shifted to int8 in registers (``u ^ 0x80`` is
``u - 128``; the correction uses ``a_zp - 128``), since ``tl.dot`` multiplies int8 only.

    y = linear_int8(a_codes, w_q, w_scale, bias, a_scale=0.02, a_zp=3, act="relu",
                  out_dtype=torch.uint8, y_scale=0.05, y_zp=0)     # next layer's codes
    y = linear(x_fp16, w_fp16, bias, act="gelu")                     # x @ w.T + bias, then gelu
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxopt.triton_kernels._runtime import (CODE_DTYPES, FLOAT_DTYPES, Kernel, as_float, as_int,
                                           check_device, interpreting)
from fxopt.triton_kernels.epilogue import (COMPILE_EPILOGUE, COMPILE_FLOAT_EPILOGUE,
                                           check_residual, epilogue_kwargs, epilogue_reference,
                                           grouped_tile, store_epilogue)

__all__ = ["linear", "linear_int8", "linear_reference", "linear_int8_reference", "weight_colsum",
           "gemm_int8_configs", "gemm_float_configs"]


@triton.jit
def _gemm_kernel(a_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, res_ptr, corr_ptr,
                 M, N, K, stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
                 stride_rm, stride_rn, act_a0, act_a1, y_inv_scale, y_zp, y_qmin, y_qmax,
                 IS_INT8: tl.constexpr, A_UNSIGNED: tl.constexpr, HAS_CORR: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                 ACT: tl.constexpr, QUANT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST_DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/columns past the edge wrap around (loads stay in bounds without masks); the
    # epilogue's store is masked
    offs_am = offs_m % M
    offs_wn = offs_n % N
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_wn[:, None] * stride_wn + offs_k[None, :] * stride_wk
    if IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k[None, :] < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_mask, other=0)
        w = tl.load(w_ptrs, mask=k_mask, other=0)
        if IS_INT8:
            if A_UNSIGNED:
                a = a.to(tl.int8, bitcast=True) ^ -128
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            if UPCAST_DOT:
                # the interpreter's dot multiplies bf16's raw bits (numpy has no bf16);
                # bf16 products are exact in fp32, so this is the same math
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if IS_INT8:
        if HAS_CORR:
            corr = tl.load(corr_ptr + offs_n, mask=offs_n < N, other=0)
            acc = acc - corr[None, :]
    store_epilogue(acc.to(tl.float32), offs_m, offs_n, M, N, out_ptr, stride_om, stride_on,
                   scale_ptr, bias_ptr, res_ptr, stride_rm, stride_rn,
                   act_a0, act_a1, y_inv_scale, y_zp, y_qmin, y_qmax,
                   HAS_SCALE, HAS_BIAS, HAS_RES, ACT, QUANT_OUT)


def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


def gemm_int8_configs() -> list:
    """Autotune candidates for int8 (Hopper-sized tiles; BLOCK_K 128 feeds int8 wgmma)."""
    return [_cfg(128, 256, 128, 3, 8), _cfg(256, 128, 128, 3, 8), _cfg(128, 128, 128, 4, 8),
            _cfg(128, 128, 64, 4, 4), _cfg(64, 128, 128, 4, 4), _cfg(128, 64, 128, 4, 4),
            _cfg(64, 64, 128, 4, 4)]


def gemm_float_configs() -> list:
    """Autotune candidates for fp16/bf16 (fp32 inputs use the smaller BLOCK_K ones)."""
    return [_cfg(128, 256, 64, 3, 8), _cfg(128, 128, 64, 4, 8), _cfg(128, 128, 32, 4, 4),
            _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 64, 64, 4, 4),
            _cfg(64, 64, 32, 4, 4)]


def _gemm_fp32_configs() -> list:
    return [_cfg(128, 128, 32, 3, 8), _cfg(64, 128, 32, 4, 4), _cfg(128, 64, 32, 4, 4),
            _cfg(64, 64, 32, 4, 4)]


_INTERPRET_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
_KEY = ["M", "N", "K"]
_TILE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)  # compile cases
_gemm_int8_kernel = Kernel(_gemm_kernel, gemm_int8_configs, _KEY, _INTERPRET_META, compile_cases={
    "gemm_int8_u8out": (dict(a_ptr="*u8", w_ptr="*i8", out_ptr="*u8", res_ptr="*bf16"),
                        dict(IS_INT8=True, A_UNSIGNED=True, HAS_CORR=True, **COMPILE_EPILOGUE,
                             **_TILE))})
_gemm_half_kernel = Kernel(_gemm_kernel, gemm_float_configs, _KEY, _INTERPRET_META, compile_cases={
    "gemm_bf16": (dict(a_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", res_ptr="*bf16"),
                  dict(IS_INT8=False, A_UNSIGNED=False, HAS_CORR=False,
                       **COMPILE_FLOAT_EPILOGUE, **_TILE))})
_gemm_fp32_kernel = Kernel(_gemm_kernel, _gemm_fp32_configs, _KEY, _INTERPRET_META, compile_cases={
    "gemm_fp32": (dict(a_ptr="*fp32", w_ptr="*fp32", out_ptr="*fp32", res_ptr="*fp32"),
                  dict(IS_INT8=False, A_UNSIGNED=False, HAS_CORR=False,
                       **COMPILE_FLOAT_EPILOGUE, **dict(_TILE, BLOCK_K=32)))})


def _grid(M, N):
    return lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)


def _out_tensor(name, out, shape, dtype, device):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: out must be a tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name}: out must be a {dtype} tensor of shape {tuple(shape)} on "
                         f"{device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name}: out must be contiguous")
    return out


def _check_weight(name, w, k, dtypes):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: weight must be a tensor, got {type(w).__name__}")
    if w.dtype not in dtypes:
        raise TypeError(f"{name}: weight must be {' or '.join(str(d) for d in dtypes)}, got "
                        f"{w.dtype}")
    if w.dim() != 2 or w.shape[1] != k:
        raise ValueError(f"{name}: weight must have shape [N, K] with K={k} (the input's last "
                         f"dimension), got {tuple(w.shape)}")
    if w.stride(1) != 1:
        raise ValueError(f"{name}: weight must be [N, K] with K contiguous (stride "
                         f"{tuple(w.stride())}); pass weight.contiguous() (prepare it once)")


def _as_rows(name, x, k_dim_name="K"):
    """[..., K] -> [M, K] view (a copy only when the leading dims cannot be flattened)."""
    if x.dim() < 2:
        raise ValueError(f"{name}: input must have at least 2 dimensions [..., {k_dim_name}], "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def _launch(name, kernel, a2, w, out, *, scale, corr, residual, ep, is_int8, a_unsigned,
            dot_precision):
    M, K = a2.shape
    N = w.shape[0]
    out2 = out.view(M, N)
    res2 = residual.reshape(M, N) if residual is not None else None
    if max(a2.numel(), out2.numel(), w.numel()) >= 2 ** 31:
        raise ValueError(f"{name}: tensors with 2**31 or more elements are not supported "
                         "(int32 offsets)")
    if M == 0 or N == 0:
        return
    if K == 0:
        raise ValueError(f"{name}: K (the reduction size) must be at least 1")
    kernel[_grid(M, N)](
        a_ptr=a2, w_ptr=w, out_ptr=out2, scale_ptr=out2 if scale is None else scale,
        res_ptr=out2 if res2 is None else res2, corr_ptr=out2 if corr is None else corr,
        M=M, N=N, K=K, stride_am=a2.stride(0), stride_ak=a2.stride(1),
        stride_wn=w.stride(0), stride_wk=w.stride(1),
        stride_om=out2.stride(0), stride_on=out2.stride(1),
        stride_rm=res2.stride(0) if res2 is not None else 0,
        stride_rn=res2.stride(1) if res2 is not None else 0,
        IS_INT8=is_int8, A_UNSIGNED=a_unsigned, HAS_CORR=corr is not None,
        HAS_SCALE=scale is not None, HAS_RES=res2 is not None, DOT_PRECISION=dot_precision,
        UPCAST_DOT=interpreting() and w.dtype == torch.bfloat16, **ep)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, *, act: str = "none", act_args=(),
         out_dtype: torch.dtype | None = None, y_scale=None, y_zp=0, y_qmin=None, y_qmax=None,
         allow_tf32: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x @ weight.T + bias + residual)`` for float ``x`` [..., K] and ``weight`` [N, K]
    (same dtype: fp16, bf16 or fp32), accumulated in fp32. Output [..., N] in ``out_dtype``
    (default ``x.dtype``), or requantized uint8/int8 codes with ``y_scale``/``y_zp``.
    fp32 inputs multiply in full fp32 unless ``allow_tf32``."""
    name = "linear"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype} "
                        "(int8 codes go to linear_int8)")
    _check_weight(name, weight, x.shape[-1] if x.dim() else -1, FLOAT_DTYPES)
    if weight.dtype != x.dtype:
        raise TypeError(f"{name}: x and weight must have the same dtype, got {x.dtype} and "
                        f"{weight.dtype}")
    a2 = _as_rows(name, x)
    N = weight.shape[0]
    out_shape = tuple(x.shape[:-1]) + (N,)
    check_residual(name, residual, out_shape)
    device = check_device(name, {"x": x, "weight": weight, "bias": bias, "residual": residual,
                                 "out": out})
    out_dtype = x.dtype if out_dtype is None else out_dtype
    ep = epilogue_kwargs(name, n=N, out_dtype=out_dtype, bias=bias, act=act, act_args=act_args,
                         y_scale=y_scale, y_zp=y_zp, y_qmin=y_qmin, y_qmax=y_qmax, dummy=weight)
    out = _out_tensor(name, out, out_shape, out_dtype, device)
    kernel = _gemm_fp32_kernel if x.dtype == torch.float32 else _gemm_half_kernel
    _launch(name, kernel, a2, weight, out, scale=None, corr=None, residual=residual, ep=ep,
            is_int8=False, a_unsigned=False, dot_precision="tf32" if allow_tf32 else "ieee")
    return out


def weight_colsum(w_q: torch.Tensor) -> torch.Tensor:
    """int32 sums of an int8 weight over all but its first (output-channel) dimension: the
    zero-point correction of ``linear_int8``/``conv2d_int8`` (compute once per weight)."""
    return w_q.reshape(w_q.shape[0], -1).sum(1, dtype=torch.int32)


def int8_scale_and_correction(name, w_q, w_scale, a, a_scale, a_zp, w_colsum):
    """(float32 scale[N] = a_scale * w_scale, int32 correction[N] or None, zp) for the int8
    kernels."""
    n = w_q.shape[0]
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: w_scale must be a float tensor of shape [{n}]")
    if w_scale.numel() != n:
        raise ValueError(f"{name}: w_scale must have {n} elements (one per output channel), "
                         f"got shape {tuple(w_scale.shape)}")
    s = as_float(a_scale, f"{name}: a_scale")
    zp = as_int(a_zp, f"{name}: a_zp")
    lo, hi = (0, 255) if a.dtype == torch.uint8 else (-128, 127)
    if not lo <= zp <= hi:
        raise ValueError(f"{name}: a_zp={zp} is outside the {a.dtype} code range [{lo}, {hi}]")
    # float32 product, as PyTorch's reference computes x_scale.float() * w_scale.float()
    # (a Python scalar multiplies a float32 tensor in float32: no host-to-device copy)
    scale = (w_scale.reshape(-1).float() * s).contiguous()
    zp_eff = zp - 128 if a.dtype == torch.uint8 else zp
    corr = None
    if zp_eff != 0:
        if w_colsum is None:
            w_colsum = weight_colsum(w_q)
        elif w_colsum.dtype != torch.int32 or w_colsum.numel() != n:
            raise ValueError(f"{name}: w_colsum must be int32 with {n} elements "
                             "(weight_colsum(w_q))")
        corr = (w_colsum.reshape(-1) * zp_eff).to(torch.int32).contiguous()
    return scale, corr, zp_eff


def linear_int8(a: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, *,
              a_scale, a_zp=0, act: str = "none", act_args=(),
              out_dtype: torch.dtype = torch.float32, y_scale=None, y_zp=0, y_qmin=None,
              y_qmax=None, w_colsum: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 linear: ``epilogue(((a - a_zp) @ w_q.T) * a_scale * w_scale)`` with ``a`` [..., K]
    uint8/int8 codes, ``w_q`` [N, K] int8 (K contiguous), ``w_scale`` [N]. Output [..., N]:
    float (``out_dtype`` fp16/bf16/fp32) or requantized codes (uint8/int8, ``y_scale``,
    ``y_zp``, ``y_qmin``/``y_qmax`` default to the dtype's range). ``w_colsum`` (int32 [N],
    ``weight_colsum(w_q)``) saves recomputing the zero-point correction each call."""
    name = "linear_int8"
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name}: a must be a tensor, got {type(a).__name__}")
    if a.dtype not in CODE_DTYPES:
        raise TypeError(f"{name}: a must hold uint8 or int8 codes, got {a.dtype} "
                        "(quantize it first, or use linear for float inputs)")
    _check_weight(name, w_q, a.shape[-1] if a.dim() else -1, (torch.int8,))
    a2 = _as_rows(name, a)
    N = w_q.shape[0]
    out_shape = tuple(a.shape[:-1]) + (N,)
    check_residual(name, residual, out_shape)
    device = check_device(name, {"a": a, "w_q": w_q, "w_scale": w_scale, "bias": bias,
                                 "residual": residual, "out": out, "w_colsum": w_colsum})
    scale, corr, _ = int8_scale_and_correction(name, w_q, w_scale, a, a_scale, a_zp, w_colsum)
    ep = epilogue_kwargs(name, n=N, out_dtype=out_dtype, bias=bias, act=act, act_args=act_args,
                         y_scale=y_scale, y_zp=y_zp, y_qmin=y_qmin, y_qmax=y_qmax, dummy=scale)
    out = _out_tensor(name, out, out_shape, out_dtype, device)
    _launch(name, _gemm_int8_kernel, a2, w_q, out, scale=scale, corr=corr, residual=residual,
            ep=ep, is_int8=True, a_unsigned=a.dtype == torch.uint8, dot_precision="ieee")
    return out


# -- references: plain PyTorch ------------------------------------------------------------------
def linear_reference(x, weight, bias=None, residual=None, *, act="none", act_args=(),
                   out_dtype=None, y_scale=None, y_zp=0, y_qmin=None, y_qmax=None,
                   compute_dtype=torch.float64):
    """``linear``'s math in ``compute_dtype`` (float64: the test reference); float outputs are
    returned in ``compute_dtype``, codes as codes."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    acc = x.to(compute_dtype) @ weight.to(compute_dtype).T
    lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
    return epilogue_reference(acc, None, bias, residual, act, act_args, out_dtype, y_scale, y_zp,
                              lo if y_qmin is None else y_qmin, hi if y_qmax is None else y_qmax)


def linear_int8_reference(a, w_q, w_scale, bias=None, residual=None, *, a_scale, a_zp=0,
                        act="none", act_args=(), out_dtype=torch.float32, y_scale=None, y_zp=0,
                        y_qmin=None, y_qmax=None, compute_dtype=torch.float64):
    """``linear_int8``'s math: exact integer accumulation (float64 holds it exactly), the scale
    product in float32 as the kernel forms it, the rest of the epilogue in ``compute_dtype``."""
    acc = (a.to(torch.float64) - float(a_zp)) @ w_q.to(torch.float64).T
    a_scale32 = torch.tensor(float(a_scale), dtype=torch.float32, device=w_scale.device)
    scale = a_scale32 * w_scale.float()
    lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
    return epilogue_reference(acc.to(compute_dtype), scale, bias, residual, act, act_args,
                              out_dtype, y_scale, y_zp, lo if y_qmin is None else y_qmin,
                              hi if y_qmax is None else y_qmax)
