"""Zero point 0 on every activation grid: ``QuantConfig(activation_symmetric="auto")``.

OpenVINO's int8 kernels (and NNCF's default preset, which targets them) take a zero point of 0
as is; a non-zero one costs a compensation step: a Subtract after each fully connected layer, a
PowerStatic before each gate multiply (~15% of convnext_tiny's int8 latency on OpenVINO,
measured 2026-12-06 against NNCF's graph, node by node). So on ``target="openvino"`` every
activation grid is either uint8 ``[0, 255]`` with zero point 0 (data that never went below 0)
or int8 ``[-128, 127]`` with zero point 0:

    >>> obs = ZeroPointZeroObserver("mse", label="x")     # two observers of that kind inside
    >>> _ = obs.observe(x); qp = obs.qparams()            # uint8 if x >= 0 seen, else int8
    >>> signed_like(pooled_grid, input_grid)               # an own-grid op keeps its input's kind

The observers themselves are ``fxopt.quant.observers``; this module only chooses between them.
"""
from __future__ import annotations

import torch

from fxopt.quant.observers import make_observer
from fxopt.quant.qparams import DEFAULT_EPS, QParams, qparams_from_range

__all__ = ["ZeroPointZeroObserver", "signed_zero_point_zero", "signed_like"]


class ZeroPointZeroObserver:
    """``QuantConfig(activation_symmetric="auto")``: a grid with zero point 0 for every value,
    unsigned (uint8 ``[0, 255]``) where the calibration data never went below 0, else int8
    (``[-128, 127]``, :func:`signed_zero_point_zero`). The scheme of OpenVINO's int8 pipeline
    (NNCF's default preset): its kernels take a zero point of 0 as is, while a non-zero one
    costs a compensation step (an extra subtract per fully connected layer or gate multiply:
    ~15% of convnext_tiny's int8 latency on OpenVINO, measured 2026-12-06). Two observers of
    the chosen kind (``name``) watch the same batches; ``qparams`` keeps the unsigned one's
    grid when the data was non-negative (its zero point is then 0), else the signed one's
    clipping range on :func:`signed_zero_point_zero`'s grid."""

    def __init__(self, name: str, *, label: str | None = None, reduce_range: bool = False,
                 **kw):
        self.unsigned = make_observer(name, label=label, dtype=torch.uint8,
                                      reduce_range=reduce_range, **kw)
        self.signed = make_observer(name, label=label, dtype=torch.int8, symmetric=True,
                                    reduce_range=reduce_range, **kw)
        self.label = self.unsigned.label

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        self.unsigned.observe(x)
        self.signed.observe(x)
        return x

    __call__ = observe

    @property
    def batches(self) -> int:
        return self.unsigned.batches

    def qparams(self) -> QParams:
        self.unsigned._require_data()
        if self.unsigned.min_val >= 0.0:
            return self.unsigned.qparams()
        lo, hi = self.signed.range()  # the symmetric clipping range the observer chose
        return signed_zero_point_zero(max(-lo, hi))

    def __repr__(self) -> str:
        return f"ZeroPointZeroObserver(label={self.label!r}, batches={self.batches})"


def signed_zero_point_zero(amax: float) -> QParams:
    """int8 codes ``[-128, 127]`` with zero point 0 and ``scale = amax / 127``: the signed
    grid of ``activation_symmetric="auto"``. The full int8 range, not the restricted
    ``[-127, 127]`` of a symmetric grid, so that an exported QuantizeLinear needs no Clip before
    it (a Clip is one more post-op on every OpenVINO convolution writing it: ~5% of
    efficientnet_b0's int8 latency)."""
    scale = torch.tensor(max(float(amax), DEFAULT_EPS) / 127.0, dtype=torch.float32)
    return QParams(scale, torch.zeros((), dtype=torch.int64), -128, 127, torch.int8)


def signed_like(grid: QParams, like: QParams) -> QParams:
    """``grid`` on ``like``'s kind of codes (``activation_symmetric="auto"`` picks uint8 or
    int8 per value: an average of signed codes may have come out non-negative): the same
    float range on ``like``'s kind of int8 grid when ``like`` is int8, else as it is."""
    if grid.dtype == like.dtype or like.dtype != torch.int8:
        return grid
    lo, hi = (float(t) for t in grid.clip_range())
    if like.symmetric:
        return qparams_from_range(lo, hi, dtype=torch.int8, symmetric=True)
    return signed_zero_point_zero(max(-lo, hi))

