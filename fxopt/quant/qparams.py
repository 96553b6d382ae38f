"""Int8 quantization parameters: the affine grid, and how a float range becomes one.

A :class:`QParams` is one affine grid ``x ≈ (q - zero_point) * scale`` with ``q`` clamped to
``[qmin, qmax]``, per tensor (scalar scale) or per channel (a 1-D scale along ``axis``).
Its arithmetic is PyTorch's, step for step (``inv_scale = 1/scale`` in float32, multiply,
round half to even, add the zero point, clamp), so :meth:`QParams.fake_quantize` equals
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine`` bit for
bit. That is what lets the simulated (fake-quant) reference of DESIGN.md section 4 stand for
the int8 kernels: both round the same way.

:func:`qparams_from_range` is torch.ao's ``_calculate_qparams`` (the range is widened to hold
0, so a zero padding value is exact), with one deliberate difference: a *symmetric* grid uses
the restricted range ``[-127, 127]`` (``[1, 255]`` around 128 for uint8), never -128. Then
``x`` and ``-x`` quantize to ``±q`` exactly, the scale is ``max|x| / 127`` (TensorRT's
convention, and what the GPU issue's int8 GEMMs assume), and a product of two symmetric int8
values never reaches ``128 * 128``, so int8 x int8 pair sums cannot saturate int16 (the x86
``vpmaddubsw`` hazard).

Worked example (values -1..3)::

    >>> qp = qparams_from_range(-1.0, 3.0, dtype=torch.uint8)     # asymmetric uint8
    >>> round(qp.scale.item() * 255, 5), qp.zero_point.item()     # scale 4/255, zp 64
    (4.0, 64)
    >>> qp.quantize(torch.tensor([-1.0, 0.0, 3.0])).tolist()
    [0, 64, 255]
    >>> qs = qparams_from_range(-1.0, 3.0, symmetric=True)          # symmetric int8
    >>> round(qs.scale.item() * 127, 5), qs.qmin, qs.qmax          # scale 3/127
    (3.0, -127, 127)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.errors import InputError

__all__ = ["QParams", "qparams_from_range", "quant_range", "on_accumulator_grid", "DEFAULT_EPS"]

# Smallest scale allowed (torch.ao's choice): an all-zero tensor still gets a usable grid.
DEFAULT_EPS = float(torch.finfo(torch.float32).eps)

_SUPPORTED = (torch.int8, torch.uint8)


def quant_range(dtype: torch.dtype = torch.int8, *, symmetric: bool = False,
                reduce_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` for ``dtype``. ``reduce_range`` drops one bit (7-bit grids), which
    fbgemm's non-VNNI kernels need for activations to keep u8*s8 pair sums inside int16."""
    if dtype not in _SUPPORTED:
        raise InputError(f"int8 quantization supports torch.int8 and torch.uint8, not {dtype}",
                         hint="pass dtype=torch.int8 or dtype=torch.uint8")
    bits = 7 if reduce_range else 8
    levels = 1 << bits
    if dtype == torch.int8:
        qmin, qmax = -(levels // 2), levels // 2 - 1
    else:
        qmin, qmax = 0, levels - 1
    if symmetric:
        # Restricted range: drop the lowest code so the grid is symmetric around the zero point.
        qmin += 1
    return qmin, qmax


@dataclass
class QParams:
    """One affine int8 grid. ``scale`` float32 (0-d, or 1-D along ``axis``), ``zero_point``
    int64 of the same shape, codes clamped to ``[qmin, qmax]`` and stored as ``dtype``."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    dtype: torch.dtype = torch.int8
    axis: int | None = None
    symmetric: bool = False

    def __post_init__(self):
        self.scale = torch.as_tensor(self.scale, dtype=torch.float32)
        self.zero_point = torch.as_tensor(self.zero_point).to(torch.int64)
        if self.dtype not in _SUPPORTED:
            raise InputError(f"QParams dtype must be torch.int8 or torch.uint8, not {self.dtype}")
        want = 0 if self.axis is None else 1
        if self.scale.dim() != want or self.zero_point.shape != self.scale.shape:
            raise InputError(
                f"QParams with axis={self.axis} needs a {want}-d scale and a zero point of the "
                f"same shape; got scale {tuple(self.scale.shape)}, zero point "
                f"{tuple(self.zero_point.shape)}")
        if not bool((self.scale > 0).all()) or not bool(torch.isfinite(self.scale).all()):
            raise InputError("QParams scale must be finite and > 0")
        if not self.qmin < self.qmax:
            raise InputError(f"QParams needs qmin < qmax, got [{self.qmin}, {self.qmax}]")

    # -- layout ----------------------------------------------------------------------------
    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` (scale or zero point) on ``x``'s device, shaped to broadcast against ``x``."""
        t = t.to(x.device)
        if self.axis is None:
            return t
        axis = self.axis % x.dim()
        if x.shape[axis] != t.numel():
            raise InputError(f"per-channel QParams has {t.numel()} channels, but the tensor has "
                             f"{x.shape[axis]} along axis {self.axis} (shape {tuple(x.shape)})")
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)

    def to(self, device) -> QParams:
        return QParams(self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax,
                       self.dtype, self.axis, self.symmetric)

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float interval the grid represents: ``[(qmin - zp) * s, (qmax - zp) * s]``."""
        return ((self.qmin - self.zero_point).float() * self.scale,
                (self.qmax - self.zero_point).float() * self.scale)

    # -- arithmetic (PyTorch's, step for step) -----------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Float -> codes of ``self.dtype``: ``clamp(round_half_even(x * (1/s)) + zp)``."""
        scale, zp = self._view(self.scale, x), self._view(self.zero_point, x)
        # Multiply by a float32 reciprocal, as ATen's kernels do; dividing by the scale
        # rounds differently on a few inputs and would break bit-equality with torch.
        q = torch.round(x.float() * torch.reciprocal(scale)) + zp
        return q.clamp_(self.qmin, self.qmax).to(self.dtype)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Codes -> float32: ``(q - zp) * s``."""
        scale, zp = self._view(self.scale, q), self._view(self.zero_point, q)
        return (q.to(torch.int64) - zp).float() * scale

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(x))`` in ``x``'s dtype; equals torch's fake_quantize ops."""
        return self.dequantize(self.quantize(x)).to(x.dtype if x.is_floating_point()
                                                    else torch.float32)

    def __repr__(self) -> str:
        kind = "per_tensor" if self.axis is None else f"per_channel(axis={self.axis})"
        sym = "symmetric" if self.symmetric else "affine"
        if self.axis is None:
            body = f"scale={self.scale.item():.6g}, zero_point={self.zero_point.item()}"
        else:
            body = f"{self.scale.numel()} channels"
        return f"QParams({kind} {sym} {self.dtype} [{self.qmin}, {self.qmax}], {body})"


def on_accumulator_grid(bias: torch.Tensor, x_scale: torch.Tensor,
                        w_scale: torch.Tensor) -> torch.Tensor:
    """``bias`` (one value per output channel) rounded onto the int32 grid of the layer's
    accumulator, ``x_scale * w_scale[c]`` (float32, as the epilogue multiplies them): what
    every int8 kernel adds. ONNX Runtime's QLinearConv / QGemm (the QDQ export's float bias
    becomes ``round(bias / (x_scale * w_scale))``, saturated to int32) and fbgemm quantize a
    float bias this way; a bias already on the grid passes through them unchanged, so the
    int8 IR, its lowerings and the exported file add the same bias. The change is at most half
    an accumulator step per channel (far below one output step)."""
    step = (x_scale.float() * w_scale.float()).reshape(-1)
    codes = torch.round(bias.float() / step).clamp_(-2.0 ** 31, 2.0 ** 31 - 1)
    return (codes * step).to(bias.dtype)


def qparams_from_range(min_val, max_val, *, dtype: torch.dtype = torch.int8,
                       symmetric: bool = False, axis: int | None = None,
                       eps: float = DEFAULT_EPS, reduce_range: bool = False) -> QParams:
    """The grid for the float range ``[min_val, max_val]`` (scalars, or 1-D per channel).

    The range is first widened to hold 0. Asymmetric: ``scale = (max - min) / (qmax - qmin)``,
    ``zero_point = clamp(qmin - round(min / scale))``. Symmetric: ``scale = max|.| / 127``
    (restricted range, see the module docstring), zero point 0 for int8 and 128 for uint8.
    The scale is floored at ``eps``. ``min_val``/``max_val`` of shape ``[K]`` with ``axis=None``
    are not allowed; pass ``axis`` for per-channel grids.
    """
    mn = torch.as_tensor(min_val, dtype=torch.float32).detach().cpu()
    mx = torch.as_tensor(max_val, dtype=torch.float32).detach().cpu()
    if axis is None and (mn.numel() != 1 or mx.numel() != 1):
        raise InputError(f"a per-tensor range needs scalar min/max, got shapes "
                         f"{tuple(mn.shape)} and {tuple(mx.shape)}",
                         hint="pass axis=<channel axis> for per-channel ranges")
    mn = mn.reshape(()) if axis is None else mn.reshape(-1)
    mx = mx.reshape(()) if axis is None else mx.reshape(-1)
    if mn.shape != mx.shape:
        raise InputError(f"min and max have different shapes: {tuple(mn.shape)} vs "
                         f"{tuple(mx.shape)}")
    if not (bool(torch.isfinite(mn).all()) and bool(torch.isfinite(mx).all())):
        raise InputError("cannot build quantization parameters from a non-finite range",
                         hint="the calibration data holds NaN or inf; check the model and data")
    if bool((mn > mx).any()):
        raise InputError(f"min_val > max_val in the quantization range ({mn.tolist()} > "
                         f"{mx.tolist()})")
    qmin, qmax = quant_range(dtype, symmetric=symmetric, reduce_range=reduce_range)
    mn_neg = torch.minimum(mn, torch.zeros_like(mn))
    mx_pos = torch.maximum(mx, torch.zeros_like(mx))
    eps_t = torch.tensor(eps, dtype=torch.float32)
    if symmetric:
        amax = torch.maximum(-mn_neg, mx_pos)
        scale = torch.maximum(amax / float((qmax - qmin) // 2), eps_t)
        zp = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int64)  # 0 / 128
    else:
        scale = torch.maximum((mx_pos - mn_neg) / float(qmax - qmin), eps_t)
        zp = (qmin - torch.round(mn_neg / scale)).to(torch.int64).clamp(qmin, qmax)
    return QParams(scale, zp, qmin, qmax, dtype, axis, symmetric)
