"""Views between fxopt's plain uint8 codes and PyTorch's ``quint8`` tensors (no copies).

fxopt's CPU int8 ops (``fxopt.ops.cpu``) take and return plain uint8 codes; PyTorch's quantized
kernels take ``quint8`` tensors. ``as_quantized`` views codes as one on a grid, ``codes_of``
views one's memory as codes. ``QuantizedKernel`` is a layer's packed quantized kernel as a
function of the codes, and ``quantized`` the same kernel from ``quint8`` to ``quint8``: what
linked layers of the direct twin pass each other (``fxopt.infra.direct``); ``on_grid`` and
``plain_codes`` let an op take either.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["as_quantized", "codes_of", "on_grid", "plain_codes", "QuantizedKernel", "CodesKernel",
           "CODES", "linkable", "spend_deprecation_warning"]


_DEPRECATION = {"spent": False}


def spend_deprecation_warning() -> None:
    """PyTorch warns once per process that creating quantized tensors is deprecated (the kernels
    stay); these ops create them only as views inside, so the warning is spent here, unseen."""
    if not _DEPRECATION["spent"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
        _DEPRECATION["spent"] = True


def as_quantized(codes: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """A ``quint8`` tensor over ``codes``' memory (uint8, no copy) on the grid (scale, zp)."""
    if not _DEPRECATION["spent"]:
        spend_deprecation_warning()
    q = _EMPTY_QUANTIZED([0], scale=float(scale), zero_point=int(zp), dtype=torch.quint8)
    return q.set_(codes.untyped_storage(), codes.storage_offset(), codes.shape, codes.stride())


_EMPTY_QUANTIZED = torch._empty_affine_quantized


def codes_of(q: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of a ``quint8`` tensor, over its memory (no copy, unlike ``int_repr``)."""
    return torch.empty(0, dtype=torch.uint8, device=q.device).set_(
        q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


CODES = (torch.uint8, torch.quint8)


def plain_codes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s uint8 codes: ``t`` itself, or a view of a ``quint8`` tensor's (a linked layer's
    output, ``QuantizedKernel.quantized``)."""
    return codes_of(t) if t.dtype is torch.quint8 else t


def on_grid(t: torch.Tensor, scale, zp) -> torch.Tensor:
    """``t``'s codes (uint8, or a ``quint8`` tensor a linked layer passed) as a ``quint8`` view
    on the grid (scale, zp): the tensor itself where it is on that grid already."""
    s, z = float(scale), int(zp)
    if t.dtype is torch.quint8:
        if t.q_scale() == s and t.q_zero_point() == z:
            return t
        t = codes_of(t)
    return as_quantized(t, s, z)


class QuantizedKernel:
    """A layer's packed PyTorch quantized kernel as a function of the codes (run on a view of
    them; a clamp-like activation is a clamp of the quantized output, exact). ``quantized``
    runs it on a ``quint8`` tensor already on the ``x`` grid and returns the ``quint8`` output:
    what a chain of bound layers passes along (``fxopt.infra.direct``), saving the two views a
    layer (~20 us of a 30-100 us call at batch 1, where PyTorch's own modules pass quantized
    tensors)."""

    __slots__ = ("fn", "packed", "x_grid", "y_grid", "bounds")

    def __init__(self, fn, packed, x_grid: tuple, y_grid: tuple, bounds):
        self.fn, self.packed, self.x_grid, self.y_grid, self.bounds = \
            fn, packed, x_grid, y_grid, bounds

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return codes_of(self.quantized(as_quantized(q, *self.x_grid)))

    def quantized(self, q: torch.Tensor) -> torch.Tensor:
        y = self.fn(q, self.packed, *self.y_grid)
        return y if self.bounds is None else torch.clamp(y, *self.bounds)


class CodesKernel:
    """A layer's kernel call on plain codes (oneDNN's) and the grid of the codes it returns:
    where every user of the layer takes a quint8 tensor and would otherwise view the codes
    itself (a concat reads each input up to once per later layer in a DenseNet block), the
    direct twin views them once, on ``y_grid`` (``fxopt.infra.direct``)."""

    __slots__ = ("fn", "y_grid")

    def __init__(self, fn, y_grid: tuple):
        self.fn, self.y_grid = fn, y_grid

    def __call__(self, q: torch.Tensor) -> torch.Tensor | None:
        return self.fn(q)


def linkable(inputs: tuple = (0,)):
    """Marks an op's CPU kernel as one the direct twin links (``fxopt.infra.direct``): the
    arguments at ``inputs`` may be a quint8 tensor (a list argument's elements too), and the
    keyword ``quantized_out=True`` (the twin's, never the op's) returns its quint8 result
    instead of a view of the codes."""
    def mark(fn):
        fn.quantized_inputs, fn.quantized_output = inputs, True
        return fn
    return mark
