"""Dynamic int8 linear: int8 weights, the input quantized at run time from its own range.

For models with no calibration data (transformer blocks and the like). The weight is stored
as per-channel symmetric int8 codes (``w_q``, ``w_scale`` per output channel, zero point 0);
each call measures the input's min and max, widens that range to hold 0, and picks a
per-tensor asymmetric uint8 grid for it exactly as PyTorch's dynamic quantized linear does
(:func:`dynamic_qparams`, fbgemm's ``ChooseQuantizationParams(min, max, 0, 255,
preserve_sparsity=false, force_scale_power_of_two=false, reduce_range)``). The output is float:
``int32 accumulator * (x_scale * w_scale) + bias``, then the residual and the activation.

    y = torch.ops.fxopt.linear_int8_dynamic(x, w_q, w_scale, b, None, act="relu")
    # == relu(F.linear(fq(x), w_q * w_scale[:, None], b)),  fq: the run-time uint8 grid

``reduce_range=True`` (the default, as torch.ao's x86 dynamic linear) makes the grid 7-bit
(codes 0..127) so that fbgemm's u8 x s8 pair sums stay inside int16 on CPUs without VNNI.
Like fbgemm, the codes are clamped to the uint8 storage range 0..255, not to the reduced
range: when the zero point was rounded up, the input's maximum can land on code 128.

``per_token=True``: one grid per row of the input (a token of a transformer: every index but
the last), ``token_qparams``: the row's range widened to hold 0, ``scale = (max - min) / 255``
(127 with ``reduce_range``), ``zp = round(-min / scale)``. A row of large values then no longer
coarsens every other row's grid (torchvision vit_b_16 at 224, every Linear int8: 29.9 dB per
tensor, 31.9 simulated per token). Codes ``q`` minus 128 as int8 go through ``torch._int_mm``
(int32, exact; on a CPU without VNNI or AMX, where it is 20x slower than a float32 GEMM,
float32 GEMMs over slices short enough to be exact: ``codes_mm``), the zero points come back
as ``(128 - zp_row) * colsum(w_q)`` (exact), then one float32 epilogue
``acc * scale_row * w_scale + bias`` shared by the reference (which accumulates in float64,
also exact): the two paths are bit-identical by construction.

CPU: ``torch.ops.quantized.linear_dynamic`` / ``linear_relu_dynamic`` (fbgemm, engines
``x86``/``fbgemm``) with the weights prepacked once and cached, when the input (and residual)
is float32; a residual and an activation other than relu follow fbgemm's float32 output in
the reference's order (GELU after fc1, the residual add after fc2 of a transformer MLP).
Everything else (other dtypes, other engines, CUDA) runs the reference: integer codes, exact
accumulation (float32 while every partial sum stays below 2**24, else float64), then fbgemm's
epilogue ``fma(acc, float32(x_scale * w_scale), bias)`` rounded once to float32, then the
residual and the activation in float32. The two paths use the same grid, the same integer
products and the same epilogue rounding: on an AVX-512 machine they were bit-identical on
every shape tried (tests/passes/quant/test_dynamic.py checks this to 1e-7 relative).
"""
from __future__ import annotations

import contextlib
import math
import struct
import warnings
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F

from fxopt.ir.activations import apply_activation, check_activation
from fxopt.ops.isa import int8_dot_product_isa
from fxopt.ops.saturation import saturating_weights
from fxopt.ops.schema import define_op, weight_macs
from fxopt.ops.unversioned import on_written

__all__ = ["dynamic_qparams", "fake_quantize_dynamic", "linear_int8_dynamic_reference",
           "token_qparams", "fake_quantize_token", "codes_mm",
           "dynamic_fast_path_available", "SMALL_SCALE_THRESHOLD", "LINEAR_INT8_DYNAMIC",
           "LinearInt8Dynamic"]

# fbgemm / ATen quant_utils: scales below fp16's smallest normal are raised to it.
SMALL_SCALE_THRESHOLD = 6.1e-5


def _f32(v: float) -> float:
    """``v`` rounded to float32 (C's ``float`` conversion), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


_SMALL = _f32(SMALL_SCALE_THRESHOLD)


def _choose(x_min: float, x_max: float, qmin: int, qmax: int, reduce_range: bool):
    """ATen's ``quant_utils::ChooseQuantizationParams`` (QuantUtils.h), preserve_sparsity and
    force_scale_power_of_two off, step for step: float32 range, double scale and zero point
    (Python floats are doubles; ``_f32`` marks where C++ rounds to ``float``)."""
    if not (math.isfinite(x_min) and math.isfinite(x_max)):
        raise ValueError(f"fxopt.linear_int8_dynamic: the input holds non-finite values "
                         f"(min {x_min}, max {x_max}); a run-time int8 grid needs a finite range")
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    x_min, x_max = min(x_min, 0.0), max(x_max, 0.0)
    scale = (x_max - x_min) / (qmax - qmin)
    if _f32(scale) == 0.0 or math.isinf(_f32(1.0 / _f32(scale))):
        scale = 0.1
    if scale < _SMALL:
        org_scale = _f32(scale)
        scale = _SMALL
        if x_min == 0.0:
            x_max = _f32(_SMALL * (qmax - qmin))
        elif x_max == 0.0:
            x_min = _f32(-_SMALL * (qmax - qmin))
        else:
            amplifier = _f32(_SMALL / org_scale)
            x_min, x_max = _f32(x_min * amplifier), _f32(x_max * amplifier)
    zp_from_min = qmin - x_min / scale
    zp_from_max = qmax - x_max / scale
    # (sic) ATen compares |q| - |x/scale|, not the sum its comment describes; kept as is.
    err_min = abs(qmin) - abs(x_min / scale)
    err_max = abs(qmax) - abs(x_max / scale)
    initial = zp_from_min if err_min < err_max else zp_from_max
    if initial < qmin:
        zp = qmin
    elif initial > qmax:
        zp = qmax
    else:
        zp = int(round(initial))  # nearbyint: round half to even, like Python's round
    return _f32(scale), zp  # fbgemm takes the scale as float


def dynamic_qparams(x: torch.Tensor, reduce_range: bool = True) -> tuple[float, int]:
    """``(scale, zero_point)`` of the run-time uint8 grid for ``x`` (whole tensor), as PyTorch's
    dynamic quantized linear picks it; ``scale`` is a float32 value."""
    if x.numel() == 0:
        return _choose(0.0, 0.0, 0, 255, reduce_range)
    lo, hi = torch.aminmax(x.detach().float())
    return _choose(float(lo), float(hi), 0, 255, reduce_range)


def _codes(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """``clamp(round(x * (1/scale)) + zp, 0, 255)`` as float32 integers (fbgemm's Quantize:
    multiply by the float32 reciprocal, round half to even, add the zero point, clamp to the
    uint8 storage range)."""
    inv = torch.reciprocal(torch.tensor(scale, dtype=torch.float32, device=x.device))
    return (torch.round(x.float() * inv) + zp).clamp_(0, 255)


def fake_quantize_dynamic(x: torch.Tensor, reduce_range: bool = True) -> torch.Tensor:
    """``x`` on its own run-time grid, dequantized (the simulated form of the op's input),
    through ``torch.fake_quantize_per_tensor_affine``: an independent rounding of the codes."""
    scale, zp = dynamic_qparams(x, reduce_range)
    y = torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, 0, 255)
    return y.to(x.dtype)


def token_qparams(x: torch.Tensor, reduce_range: bool = True) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """``(scale, zp)`` of each row's run-time uint8 grid (float32, shape ``[..., 1]``): the
    row's range widened to hold 0 over 255 steps (127 with ``reduce_range``), a zero point that
    puts 0 on a code; an all-zero row gets scale 1."""
    qmax = 127 if reduce_range else 255
    xf = x.detach().float()
    # amin and amax: 2 x 22 us on a [197, 3072] input here; aminmax(dim=) 670, isfinite 640
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)  # both propagate NaN
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        raise ValueError("fxopt.linear_int8_dynamic: the input holds non-finite values; a "
                         "run-time int8 grid needs a finite range")
    lo, hi = lo.clamp_(max=0.0), hi.clamp_(min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.round(-lo / scale).clamp_(0, qmax)
    return scale, zp


def _token_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                 reduce_range: bool) -> torch.Tensor:
    """Each row's codes on its own grid, as float32 integers."""
    return (torch.round(x.float() / scale) + zp).clamp_(0, 127 if reduce_range else 255)


def fake_quantize_token(x: torch.Tensor, reduce_range: bool = True) -> torch.Tensor:
    """``x`` on each row's run-time grid, dequantized (the simulated form of a per-token op's
    input)."""
    scale, zp = token_qparams(x, reduce_range)
    return ((_token_codes(x, scale, zp, reduce_range) - zp) * scale).to(x.dtype)


_COLSUMS: dict[int, tuple] = {}  # id(w_q) -> (weakref to w_q, its version, int32 row sums)
on_written(_COLSUMS.clear)


def _colsum(w_q: torch.Tensor) -> torch.Tensor:
    """``w_q.sum(1)`` in int32, cached per weight tensor (an in-place update recomputes it)."""
    hit = _COLSUMS.get(id(w_q))
    if hit is not None and hit[0]() is w_q and hit[1] == _version(w_q):
        return hit[2]
    out = w_q.detach().sum(1, dtype=torch.int32)
    if len(_COLSUMS) > 4096:  # many models in one process: start over
        _COLSUMS.clear()
    _COLSUMS[id(w_q)] = (weakref.ref(w_q), _version(w_q), out)
    return out


# float32 holds every integer up to 2**24: a sum of products of codes in [-128, 127] by
# weights in [-128, 127] over this many terms is exact in any order
_EXACT_F32_TERMS = 2 ** 24 // (128 * 128)


def codes_mm(a: torch.Tensor, w_q: torch.Tensor, how: str) -> torch.Tensor:
    """``a @ w_q.T`` of int8 codes as int32, exactly: ``how="int"`` with ``torch._int_mm``
    (int8 dot products: VNNI, AMX, GPUs), ``"float32"`` as float32 GEMMs over slices of
    ``_EXACT_F32_TERMS`` terms each (exact; a CPU without VNNI or AMX, where ``torch._int_mm``
    took 167 ms against 8.3 for this on a 197x768 by 768x3072 product on the AVX2 EPYC,
    2026-12-07), ``"float64"`` in one float64 product (the reference)."""
    if how == "int":
        return torch._int_mm(a, w_q.t())
    if how == "float64":
        return F.linear(a.double(), w_q.double()).to(torch.int32)
    k = a.shape[1]
    acc = None
    for i in range(0, k, _EXACT_F32_TERMS):
        part = F.linear(a[:, i:i + _EXACT_F32_TERMS].float(),
                        w_q[:, i:i + _EXACT_F32_TERMS].float()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc if acc is not None else a.new_zeros((a.shape[0], w_q.shape[0]), dtype=torch.int32)


def _token_linear(x, w_q, w_scale, bias, residual, act, act_args, reduce_range, mm):
    """The per-token linear: the codes minus 128 against ``w_q`` (``codes_mm(..., mm)``),
    then the shared integer correction and epilogue."""
    check_activation(act, act_args)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    scale, zp = token_qparams(x2, reduce_range)
    a = (_token_codes(x2, scale, zp, reduce_range) - 128).to(torch.int8)
    acc = codes_mm(a, w_q, mm if x2.shape[0] > 0 else "float64")
    # sum over k of (q - zp) w = acc + (128 - zp) * colsum(w), exactly in int32
    colsum = _colsum(w_q)
    acc = acc.add_((128 - zp.to(torch.int32)) * colsum)
    y = acc.float().mul_(scale).mul_(w_scale.float())
    if bias is not None:
        y = y.add_(bias.float())
    y = y.reshape(*lead, w_q.shape[0])
    if residual is not None:
        y = y + residual.float()
    y = apply_activation(y, act, act_args, inplace=True)
    return y.to(x.dtype).contiguous()


def linear_int8_dynamic_reference(x, w_q, w_scale, bias, residual=None, *, act="none",
                                  act_args: Sequence[float] = (), reduce_range=True,
                                  per_token=False) -> torch.Tensor:
    """Exact integer linear on the run-time grid: codes ``q - zp`` times ``w_q`` accumulated
    exactly, then ``fma(acc, x_scale * w_scale, bias)`` (+ residual), then the activation
    (``per_token``: one grid per row, ``_token_linear``'s epilogue)."""
    if per_token:
        return _token_linear(x, w_q, w_scale, bias, residual, act, act_args, reduce_range,
                             mm="float64")
    check_activation(act, act_args)
    scale, zp = dynamic_qparams(x, reduce_range)
    xq = _codes(x, scale, zp) - zp
    # Every partial sum is bounded by k * max|x code| * 128; below 2**24 float32 is exact in
    # any summation order (TF32 too: codes need at most 9 significant bits).
    bound = w_q.shape[1] * (int(xq.abs().max()) if xq.numel() else 0) * 128
    dt = torch.float32 if bound < 2 ** 24 else torch.float64
    acc = F.linear(xq.to(dt), w_q.to(dt))
    # fbgemm's epilogue: m = float32(x_scale * w_scale) per channel, then one fused
    # multiply-add acc * m + bias, rounded once to float32. In float64 the product of the
    # integer acc (< 2**26) and m is exact, so float32(acc * m + bias) is that FMA (up to a
    # double rounding, which needs the sum to fall within 2**-29 of a float32 tie).
    m = torch.tensor(scale, dtype=torch.float32, device=x.device) * w_scale.float()
    y = acc.double() * m.double()
    if bias is not None:
        y = y + bias.double()
    y = y.float()
    if residual is not None:
        y = y + residual.float()
    y = apply_activation(y, act, act_args, inplace=True)
    return y.to(x.dtype).contiguous()


# -- CPU: fbgemm's dynamic quantized linear -----------------------------------------------------
# (id(w_q), act) -> (weakrefs to w_q, w_scale, bias; their versions; packed params)
_PACKED: dict[tuple, tuple] = {}
on_written(_PACKED.clear)
_fast_state: dict[str, bool] = {}


def _version(t) -> int:
    if t is None:
        return 0
    return -1 if t.is_inference() else t._version


@contextlib.contextmanager
def _quiet():
    """PyTorch deprecates quantized tensor creation (the kernels stay); keep that warning out."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        yield


def _prepack(w_q, w_scale, bias):
    with _quiet():
        wq = torch._make_per_channel_quantized_tensor(
            w_q.detach().to(torch.int8), w_scale.detach().double(),
            torch.zeros(w_scale.shape, dtype=torch.int64), 0)
        return torch.ops.quantized.linear_prepack(
            wq, None if bias is None else bias.detach().float().contiguous())


def _forget(key, ref) -> None:
    hit = _PACKED.get(key)
    if hit is not None and hit[0][0] is ref:
        del _PACKED[key]


def _packed(w_q, w_scale, bias, act: str):
    """Prepacked fbgemm weights, cached per weight tensor, keyed on the tensors' identities and
    versions, the engine and the activation (an in-place update of the weight repacks)."""
    key = (id(w_q), act, torch.backends.quantized.engine)
    versions = (_version(w_q), _version(w_scale), _version(bias))
    hit = _PACKED.get(key)
    if hit is not None:
        refs, vers, packed = hit
        if (refs[0]() is w_q and refs[1]() is w_scale
                and (refs[2] is None if bias is None else refs[2]() is bias) and vers == versions):
            return packed
    packed = _prepack(w_q, w_scale, bias)
    ref = weakref.ref(w_q, lambda r, k=key: _forget(k, r))
    _PACKED[key] = ((ref, weakref.ref(w_scale), None if bias is None else weakref.ref(bias)),
                    versions, packed)
    return packed


def dynamic_fast_path_available() -> bool:
    """Whether ``linear_int8_dynamic`` can run on fbgemm here (engine ``x86``/``fbgemm`` and a
    CPU fbgemm supports); probed once per engine with a tiny call."""
    engine = torch.backends.quantized.engine
    if engine not in ("x86", "fbgemm"):
        return False
    if engine not in _fast_state:
        try:
            w = torch.ones(2, 2, dtype=torch.int8)
            packed = _prepack(w, torch.ones(2), None)
            torch.ops.quantized.linear_dynamic(torch.ones(1, 2), packed, True)
            _fast_state[engine] = True
        except (RuntimeError, AttributeError):
            _fast_state[engine] = False
    return _fast_state[engine]


def _linear_int8_dynamic_cpu(x, w_q, w_scale, bias, residual=None, *, act="none", act_args=(),
                             reduce_range=True, per_token=False):
    if per_token:
        fast = x.dim() > 0 and w_q.dtype == torch.int8
        mm = ("int" if int8_dot_product_isa() else "float32") if fast else "float64"
        return _token_linear(x, w_q, w_scale, bias, residual, act, act_args, reduce_range, mm)
    if (x.dtype != torch.float32 or x.dim() == 0 or x.numel() == 0 or w_q.dtype != torch.int8
            or (bias is not None and bias.dtype != torch.float32)
            or (residual is not None and residual.dtype != torch.float32)
            or not dynamic_fast_path_available()
            # 8-bit run-time codes times wide weights: fbgemm's sums would saturate here
            or (not reduce_range and saturating_weights(w_q))):
        return linear_int8_dynamic_reference(x, w_q, w_scale, bias, residual, act=act,
                                             act_args=act_args, reduce_range=reduce_range)
    check_activation(act, act_args)
    # fbgemm fuses relu only; a residual or another activation follows its float32 output in
    # the reference's order (epilogue, + residual, activation): the same float32 operations
    fused = act == "relu" and residual is None
    packed = _packed(w_q, w_scale, bias, "relu" if fused else "none")
    fn = torch.ops.quantized.linear_relu_dynamic if fused else torch.ops.quantized.linear_dynamic
    x2 = x.contiguous()
    if x2.dim() == 1:  # fbgemm wants a matrix
        y = fn(x2.unsqueeze(0), packed, bool(reduce_range)).squeeze(0)
    else:
        y = fn(x2, packed, bool(reduce_range))
    if fused:
        return y
    if residual is not None:
        y = y.add_(residual) if residual.shape == y.shape else y + residual
    if act != "none":
        y = apply_activation(y, act, act_args, inplace=True)
    return y.contiguous()


def _linear_int8_dynamic_fake(x, w_q, w_scale, bias, residual=None, *, act="none", act_args=(),
                              reduce_range=True, per_token=False):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


LINEAR_INT8_DYNAMIC = define_op(
    "linear_int8_dynamic(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, "
    "Tensor? residual=None, *, str act='none', float[] act_args=[], "
    "bool reduce_range=True, bool per_token=False) -> Tensor",
    family="int8", reference=linear_int8_dynamic_reference, fake=_linear_int8_dynamic_fake,
    cpu=_linear_int8_dynamic_cpu, macs=weight_macs("w_q"))
LinearInt8Dynamic = LINEAR_INT8_DYNAMIC.view
