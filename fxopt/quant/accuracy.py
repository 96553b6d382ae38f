"""Whether an int8 model is good enough: its figures measured on data held out of calibration,
and a warning, with the worst layers and the fix, when they fall under a floor.

A grid fitted to a few calibration batches fits those batches: measured on them, an int8 model
looks better than it is on fresh data (a grid from 3 batches clipped a fresh batch to 11.1 dB
while its own batches said 39.2 dB). :func:`split_held_out` therefore keeps data apart for the
report's figures:

- ``QuantConfig.holdout_fraction`` (default 0.2) of the calibration batches, the last ones, when
  that is at least one batch and leaves ``min_batches`` to calibrate on (5 batches or more by
  default): calibrated on the rest, measured on these (``measured_on="held_out"``);
- else the example inputs, when they are not one of the calibration batches
  (``"example_inputs"``);
- else the calibration batches themselves (``"calibration"``), and the report says so in a note.

:func:`check_floor` compares the measured SQNR with the floor (``QuantConfig.min_sqnr_db`` when
set, else ``QuantConfig.warn_sqnr_db``, default 20 dB: the CNNs the project measures reach
30-35 dB, ``bench/results/``; 20 dB is a noise 10% of the signal's rms, where the top-1 class
starts to flip) and, under it, warns with :class:`fxopt.errors.Int8AccuracyWarning`, naming the
layers that hurt most (each one's sensitivity: the SQNR with only that layer int8) and the fix.

    >>> calib, held, on = split_held_out(batches, example_inputs, cfg)
    >>> check_floor(stats, cfg, worst_layers)        # warns under the floor
"""
from __future__ import annotations

import warnings

import torch

from fxopt.errors import Int8AccuracyWarning
from fxopt.quant.config import QuantConfig

__all__ = ["split_held_out", "batches_needed", "sqnr_floor", "check_floor", "NOT_HELD_OUT_NOTE",
           "not_held_out_note"]

NOT_HELD_OUT_NOTE = (
    "int8 figures measured on the calibration batches themselves (no data held out: {how}): "
    "they overstate the accuracy on fresh data")


def not_held_out_note(cfg: QuantConfig) -> str:
    """The report's note when the figures come from the calibration batches."""
    need = batches_needed(cfg)
    how = (f"pass at least {need} calibration batches, or example inputs that are not one of "
           f"them" if need else "QuantConfig.holdout_fraction=0; example inputs that are not a "
           "calibration batch would be measured on")
    return NOT_HELD_OUT_NOTE.format(how=how)


def _same_batch(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
        and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def split_held_out(batches: list[tuple], example_inputs: tuple,
                   cfg: QuantConfig) -> tuple[list[tuple], list[tuple], str]:
    """``(calibration batches, measurement batches, measured_on)``: see the module doc."""
    k = int(len(batches) * cfg.holdout_fraction)
    if k >= 1 and len(batches) - k >= cfg.min_batches:
        return batches[:-k], batches[-k:], "held_out"
    example = tuple(example_inputs)
    if example and all(isinstance(x, torch.Tensor) for x in example) and \
            not any(_same_batch(example, b) for b in batches):
        return batches, [example], "example_inputs"
    return batches, batches, "calibration"


def batches_needed(cfg: QuantConfig) -> int:
    """How many calibration batches make :func:`split_held_out` hold one out."""
    if cfg.holdout_fraction <= 0:
        return 0
    n = max(cfg.min_batches + 1, 1)
    while int(n * cfg.holdout_fraction) < 1 or n - int(n * cfg.holdout_fraction) < cfg.min_batches:
        n += 1
    return n


def sqnr_floor(cfg: QuantConfig) -> float | None:
    """The SQNR (dB) under which an int8 run warns: ``min_sqnr_db`` when it is a number,
    else ``warn_sqnr_db`` (``"auto"``'s target is a best effort within a MAC budget: the
    report says when it is not reached); None: never."""
    return cfg.warn_sqnr_db if cfg.min_sqnr_db in (None, "auto") else cfg.min_sqnr_db


def check_floor(sqnr_db: float, measured_on: str, cfg: QuantConfig,
                worst: list[tuple[str, float]]) -> Int8AccuracyWarning | None:
    """Warns (and returns the warning) when ``sqnr_db`` is under :func:`sqnr_floor`.
    ``worst``: ``(module path, SQNR dB with only that layer int8)``, worst first."""
    floor = sqnr_floor(cfg)
    if floor is None or not sqnr_db < floor:
        return None
    where = {"held_out": "on batches held out of calibration",
             "example_inputs": "on the example inputs",
             "calibration": "on the calibration batches"}[measured_on]
    layers = ", ".join(f"{p} ({db:.1f} dB)" for p, db in worst) or "none found"
    paths = ", ".join(repr(p) for p, _ in worst[:2])
    numbered = cfg.min_sqnr_db not in (None, "auto")
    if not numbered:
        fix = (f"quantize=fxopt.QuantConfig(min_sqnr_db={floor:g}) keeps the most sensitive "
               f"layers in float until {floor:g} dB is met"
               + (" with no limit on their share of the MACs" if cfg.min_sqnr_db == "auto"
                  else "") + f" (or keep_float=[{paths}])")
    else:
        fix = (f"raise QuantConfig.max_float_layers (now {cfg.max_float_layers}) so that the "
               f"fallback can keep more layers in float, or keep_float=[{paths}]")
    hint = f"{fix}; more calibration batches help when the grids clip fresh data"
    msg = (f"fxopt: int8 SQNR {sqnr_db:.1f} dB {where} is under the floor of {floor:g} dB "
           f"(QuantConfig.{'min_sqnr_db' if numbered else 'warn_sqnr_db'})"
           f"; the layers that hurt most (SQNR with only that layer int8): {layers}")
    w = Int8AccuracyWarning(msg, sqnr_db=sqnr_db, floor_db=floor, worst_layers=worst, hint=hint)
    warnings.warn(w, stacklevel=2)
    return w
